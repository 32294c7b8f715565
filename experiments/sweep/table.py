"""The plan as a text table (`ultramem sweep plan`): one row per run, then the totals."""

from __future__ import annotations

from experiments.sweep.plan import Plan
from experiments.textfmt import format_table, hours, human


def plan_table(plan: Plan) -> str:
    branched = any(r.branch_of for r in plan.runs)
    headers = ["run_id", "family", "preset", "total", "active", "tokens", "FLOPs",
               "A100 h@30%", "A100 h@50%", "H100 h@30%", "H100 h@50%", "cpus", "gpus", "mem GB", "nproc",
               "strategy", "GB/GPU", "name"]
    rows = [[
        ("  " if r.branch_of else "") + r.run_id, r.family, r.preset or "-", human(r.total_params),
        human(r.active_params), human(r.tokens), human(r.trained_flops), hours(r.gpu_hours("a100", 0.3)), hours(r.gpu_hours("a100", 0.5)),
        hours(r.gpu_hours("h100", 0.3)), hours(r.gpu_hours("h100", 0.5)), f"{r.resources.cpus:g}",
        f"{r.resources.gpus:g}", "-" if r.resources.memory_gb is None else f"{r.resources.memory_gb:g}",
        str(r.resources.nproc), r.strategy, "-" if r.memory_per_gpu_gb is None else f"{r.memory_per_gpu_gb:.1f}",
        r.name,
    ] for r in plan.runs]
    t = plan.totals()
    rows.append(["TOTAL", f"{t['runs']} runs", "", "", "", human(t["tokens"]), human(t["flops"]),
                 hours(t["gpu_hours_a100_mfu30"]), hours(t["gpu_hours_a100_mfu50"]),
                 hours(t["gpu_hours_h100_mfu30"]), hours(t["gpu_hours_h100_mfu50"]), "", "", "", "", "", "", ""])
    if branched:  # which run each branch leaves, where, and its tokens per parameter
        headers[6:6] = ["D/N", "branch of", "from step"]
        for r, row in zip(plan.runs, rows, strict=False):
            row[6:6] = [f"{r.tokens_per_param:.3g}", r.branch_of or "-",
                        f"{r.branch_step}/{r.steps}" if r.branch_of else "-"]
        rows[-1][6:6] = ["", "", ""]
    if plan.isoflop is not None:  # the FLOP budget each run is a point of
        at = headers.index("tokens") + 1
        headers.insert(at, "budget C")
        for r, row in zip(plan.runs, rows, strict=False):
            row.insert(at, human(r.values["isoflop.budget"]))
        rows[-1].insert(at, "")
    text = f"sweep {plan.sweep.name} -> {plan.runs_dir}\n" + format_table(headers, rows)
    if branched:
        saved = t["saved_flops"] / t["independent_flops"] if t["independent_flops"] else 0.0
        text += (f"\ncooldown branches: {t['branches']} branch(es) of {t['trunks']} trunk(s) (indented; FLOPs: what "
                 f"each run trains itself, a branch only its cooldown). As independent runs the sweep would train "
                 f"{human(t['independent_flops'])} FLOPs; with branches {human(t['flops'])}: "
                 f"{human(t['saved_flops'])} saved ({saved:.0%}).")
    if plan.isoflop is not None:
        text += "\n\n" + isoflop_table(plan)
    return text


def isoflop_table(plan: Plan) -> str:
    """The IsoFLOP grid: per family and budget, the sizes laid there, their D and tokens/param; then warnings."""
    grid = plan.isoflop
    assert grid is not None
    rows = []
    for fam in grid.families():
        for c in grid.budgets:
            cells = grid.at(fam, c)
            rows.append([fam, human(c), str(len(cells)), ", ".join(human(x.size.n) for x in cells) or "-",
                         ", ".join(human(x.tokens) for x in cells) or "-",
                         ", ".join(f"{x.tokens_per_param:.3g}" for x in cells) or "-"])
    text = ("IsoFLOP grid (C = ultramem.accounting.flops_per_token x D, the project's FLOPs, not 6ND; each size is "
            + ("one WSD trunk at its largest budget, its smaller budgets cooldown branches" if plan.sweep.isoflop
               and plan.sweep.isoflop.branches else "one run per budget")
            + f"; hparams: {plan.sweep.isoflop.hparams if plan.sweep.isoflop else '-'}):\n")
    text += format_table(["family", "budget C", "sizes", "N (active)", "D (tokens)", "D/N"], rows)
    if grid.warnings:
        text += f"\n{len(grid.warnings)} warning(s):\n" + "\n".join(f"  - {w}" for w in grid.warnings)
    return text
