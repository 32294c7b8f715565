"""Scheduler benchmark: planning speed and the makespan of a sweep against the ideal packing of its runs.

  ultramem bench scheduler [--runs 12] [--steps 100] [--cpus 2] [--backends ray,local] [--format table|json]
                           [--out DIR]

Planning: two 1,000-run sweeps (5 presets x 10 LRs x 20 seeds, and 5 presets x 200 LRs: 1,000 distinct
configurations) are expanded, resolved, counted and priced by `experiments.sweep.plan_sweep`, in a fresh process
(imports included) and in-process (median of 3). Target (issue 4): < 2 s.

Makespan: `--runs` identical short training runs (dense-t1, `--steps` steps of 8 x 256 tokens, the real trainer on
the embedded corpus) through `run_sweep` on `--cpus` CPUs, one CPU per run. Each run's time is measured by the
task that launched it (claim, status write, training process start to exit), so
    ideal    = max(sum(run times) / cpus, longest run)      (perfect packing of the same runs)
    overhead = makespan / ideal
where the makespan is `run_sweep`'s wall time (planning excluded, run-folder setup and pre-flight included). A
fresh local Ray's start-up (`ray.init`) is reported on its own and in a second ratio, since a cluster pays it once
for many sweeps. Target (issue 4): makespan <= 1.15 x ideal with Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, format_table, header, write_json
from experiments.scheduler import ray_temp_dir, run_sweep
from experiments.sweep import plan_sweep

HELP = "planning time of 1,000 runs and the makespan of 12 short runs vs the ideal (Ray and local backends)"
TARGET_PLAN_S = 2.0
TARGET_MAKESPAN_RATIO = 1.15


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=12, help="training runs in the makespan sweep (default 12)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs given to the scheduler, one per run (default 2)")
    parser.add_argument("--backends", default="ray,local", help="comma-separated backends to time (default ray,local)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"folder for scheduler.json ({RESULTS_DIR})")


# ---- planning ----------------------------------------------------------------------------------------------------

PRESETS = "[dense-t1, dense-t2, dense-t3, moe-tiny, ultramem-tiny]"
PLAN_SWEEPS = {
    # 50 configurations x 20 seeds: seeds of one configuration resolve once
    "5 presets x 10 LRs x 20 seeds": f"""
name: plan-seeds
parameters:
  model.preset: {{values: {PRESETS}}}
  train.lr: {{values: [{", ".join(f"{1e-3 * (i + 1):.1e}" for i in range(10))}]}}
seeds: [{", ".join(str(i) for i in range(20))}]
""",
    # 1,000 configurations that each need their own resolution
    "5 presets x 200 LRs": f"""
name: plan-distinct
parameters:
  model.preset: {{values: {PRESETS}}}
  train.lr: {{values: [{", ".join(f"{1e-4 * (i + 1):.6g}" for i in range(200))}]}}
""",
}


def bench_plan(tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for i, (label, text) in enumerate(PLAN_SWEEPS.items()):
        path = tmp / f"plan_{i}.yaml"
        path.write_text(text)
        code = ("import sys, time; t = time.perf_counter(); from experiments.sweep import plan_sweep; "
                "p = plan_sweep(sys.argv[1]); print(len(p.runs), time.perf_counter() - t)")
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
        plan_sweep(path)
        warm = []
        for _ in range(3):
            t = time.perf_counter()
            plan = plan_sweep(path)
            warm.append(time.perf_counter() - t)
        rows.append({"sweep": label, "runs": len(plan.runs), "cold_s": float(out.stdout.split()[1]),
                     "warm_median_s": statistics.median(warm), "warm_s": warm, "target_s": TARGET_PLAN_S})
    return rows


# ---- makespan ----------------------------------------------------------------------------------------------------


def makespan_sweep(tmp: Path, backend: str, runs: int, steps: int) -> Path:
    path = tmp / f"makespan_{backend}.yaml"
    path.write_text(textwrap.dedent(f"""
        name: makespan-{backend}
        output_dir: {tmp / "runs" / backend}
        base:
          data: {{source: embedded}}
          train: {{steps: {steps}, batch_size: 8, log_every: 10, eval_every: 100000, eval_batches: 1,
                  ckpt_every: 100000, knowledge_probe: false}}
        parameters: {{model.preset: {{value: dense-t1}}}}
        seeds: {list(range(runs))}
        resources: {{default: {{cpus: 1}}}}
        """))
    return path


def bench_makespan(tmp: Path, backend: str, runs: int, steps: int, cpus: int) -> dict[str, Any]:
    plan = plan_sweep(makespan_sweep(tmp, backend, runs, steps))
    init_s = 0.0
    if backend == "ray":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback; read when ray is imported
        import ray  # lazy: only the ray backend needs it (--backends local runs without Ray)

        t = time.perf_counter()
        ray.init(address="local", num_cpus=cpus, num_gpus=0, include_dashboard=False, _temp_dir=ray_temp_dir(),
                 object_store_memory=128 * 2**20, log_to_driver=False, logging_level=logging.WARNING)
        init_s = time.perf_counter() - t
    try:
        report = run_sweep(plan, backend=backend, max_concurrent=cpus, log=lambda s: None)
    finally:
        if backend == "ray":
            ray.shutdown()
    if not report.ok:
        raise SystemExit(f"error: the {backend} sweep did not finish: {report.counts()}")
    times = [o.wall_s for o in report.outcomes]
    ideal = max(sum(times) / cpus, max(times))
    return {
        "backend": backend, "runs": len(times), "cpus": cpus, "steps": steps, "init_s": init_s,
        "makespan_s": report.wall_s, "ideal_s": ideal, "ratio": report.wall_s / ideal,
        "ratio_with_init": (report.wall_s + init_s) / ideal, "run_s_median": statistics.median(times),
        "run_s_min": min(times), "run_s_max": max(times), "target_ratio": TARGET_MAKESPAN_RATIO,
    }


def run(args: argparse.Namespace) -> int:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"ray", "local"}
    if unknown or args.runs < 1 or args.steps < 1 or args.cpus < 1:
        raise SystemExit(f"error: --backends takes ray,local (got {args.backends}); --runs/--steps/--cpus >= 1")

    with tempfile.TemporaryDirectory(prefix="bench-sched-") as tmp_name:
        tmp = Path(tmp_name)
        plan = bench_plan(tmp)
        rows = [bench_makespan(tmp, b, args.runs, args.steps, args.cpus) for b in backends]
    payload = header("scheduler", torch.device("cpu"), vars(args) | {"out": str(args.out)})
    payload.update(plan=plan, makespan=rows)
    path = write_json(payload, args.out / "scheduler.json")
    if args.format == "json":
        print(path.read_text())
        return 0
    print(format_table(plan, [("sweep", "plan sweep"), ("runs", "runs"), ("warm_median_s", "s (median of 3)"),
                              ("cold_s", "s in a fresh process")]) + f"\ntarget: < {TARGET_PLAN_S} s\n")
    print(format_table(rows, [("backend", "backend"), ("runs", "runs"), ("cpus", "cpus"),
                              ("run_s_median", "run s (median)"), ("ideal_s", "ideal s"),
                              ("makespan_s", "makespan s"), ("ratio", "makespan/ideal"), ("init_s", "ray.init s"),
                              ("ratio_with_init", "incl. init")]))
    print(f"target: makespan/ideal <= {TARGET_MAKESPAN_RATIO} (ray); written {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
