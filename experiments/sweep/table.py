"""The plan as a text table (`ultramem sweep plan`): one row per run, then the totals."""

from __future__ import annotations

from experiments.sweep.plan import Plan
from experiments.textfmt import format_table, hours, human


def plan_table(plan: Plan) -> str:
    headers = ["run_id", "family", "preset", "total", "active", "tokens", "FLOPs",
               "A100 h@30%", "A100 h@50%", "H100 h@30%", "H100 h@50%", "cpus", "gpus", "mem GB", "nproc",
               "strategy", "GB/GPU", "name"]
    rows = [[
        r.run_id, r.family, r.preset or "-", human(r.total_params), human(r.active_params), human(r.tokens),
        human(r.flops), hours(r.gpu_hours("a100", 0.3)), hours(r.gpu_hours("a100", 0.5)),
        hours(r.gpu_hours("h100", 0.3)), hours(r.gpu_hours("h100", 0.5)), f"{r.resources.cpus:g}",
        f"{r.resources.gpus:g}", "-" if r.resources.memory_gb is None else f"{r.resources.memory_gb:g}",
        str(r.resources.nproc), r.strategy, "-" if r.memory_per_gpu_gb is None else f"{r.memory_per_gpu_gb:.1f}",
        r.name,
    ] for r in plan.runs]
    t = plan.totals()
    rows.append(["TOTAL", f"{t['runs']} runs", "", "", "", human(t["tokens"]), human(t["flops"]),
                 hours(t["gpu_hours_a100_mfu30"]), hours(t["gpu_hours_a100_mfu50"]),
                 hours(t["gpu_hours_h100_mfu30"]), hours(t["gpu_hours_h100_mfu50"]), "", "", "", "", "", "", ""])
    return f"sweep {plan.sweep.name} -> {plan.runs_dir}\n" + format_table(headers, rows)
