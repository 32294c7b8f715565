"""Plan, run and watch a sweep (a YAML grid of runs; see docs/sweeps.md).

  ultramem sweep plan sweeps/tiny_cpu.yaml              every run: id, params, tokens, FLOPs, GPU-hours, resources
  ultramem sweep run sweeps/tiny_cpu.yaml               train every unfinished run on a fresh local Ray
  ultramem sweep run FILE --address HEAD:6379           ... on an existing Ray cluster (or set RAY_ADDRESS)
  ultramem sweep run FILE --backend local               ... on this machine without Ray
  ultramem sweep run FILE --seeds 0                     ... only the runs of these seeds (a study in parts)
  ultramem sweep status sweeps/tiny_cpu.yaml            state, step, loss, tokens/s, ETA from the run folders
  ultramem sweep status FILE --watch                    the live progress view of a sweep started elsewhere

`sweep run` and `status --watch` show live progress (experiments/progress.py): on a terminal a view redrawn in place,
otherwise one line every --progress-every seconds (first at once): runs done / running / pending / failed, planned
FLOPs done, throughput, ETA, and per running run its name, step/total and latest loss.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from experiments.textfmt import decimal as _num
from experiments.textfmt import duration as _duration
from experiments.textfmt import format_table, human

HELP = "plan, run and watch a sweep of runs (Ray or local)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # (light: the run folder's records and text formats)
    from experiments.progress import EVERY_S, IDLE_EXIT_S

    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("plan", help="dry run: every run with its size, cost and resources")
    p.add_argument("file", help="sweep YAML")
    p.add_argument("--format", choices=("table", "json"), default="table")

    r = sub.add_parser("run", help="train every unfinished run of the sweep")
    r.add_argument("file", help="sweep YAML")
    r.add_argument("--backend", choices=("ray", "local"), default="ray",
                   help="ray (default): a fresh local Ray, or the cluster at --address / RAY_ADDRESS; "
                        "local: this machine, no Ray")
    r.add_argument("--address", default=None, help="Ray cluster address (HEAD_IP:PORT); default $RAY_ADDRESS")
    r.add_argument("--connect-timeout", type=float, default=30.0, metavar="S",
                   help="give up on a Ray cluster (--address / RAY_ADDRESS) that does not answer within S seconds "
                        "(default 30)")
    r.add_argument("--max-concurrent", type=int, default=None, help="at most this many runs at once")
    r.add_argument("--retries", type=int, default=2,
                   help="relaunches of a failed training process (each resumes from the newest checkpoint)")
    r.add_argument("--seeds", type=_seed_list, default=None, metavar="S[,S...]",
                   help="train only the runs of these seeds (each one of the file's `seeds`), e.g. to run a "
                        "study in parts; run ids are the same as in a run of the whole file")
    r.add_argument("--progress-every", type=_seconds, default=EVERY_S, metavar="S",
                   help=f"without a terminal, print a progress line every S seconds (default {EVERY_S:g}; the first "
                        "at once)")

    s = sub.add_parser("status", help="progress of every run, read from the run folders (no Ray needed)")
    s.add_argument("file", help="sweep YAML")
    s.add_argument("--format", choices=("table", "json"), default="table")
    s.add_argument("--watch", action="store_true",
                   help="show the live progress view until the sweep ends (every run ended, or none running or "
                        f"queued for {IDLE_EXIT_S:g} s)")
    s.add_argument("--progress-every", type=_seconds, default=EVERY_S, metavar="S",
                   help=f"with --watch and no terminal: a progress line every S seconds (default {EVERY_S:g})")


def run(args: argparse.Namespace) -> int:
    from experiments.sweep import plan_sweep

    plan = plan_sweep(args.file)
    if args.action == "plan":
        return _plan(plan, args.format)
    if args.action == "run":
        from experiments.scheduler import run_sweep

        if args.seeds is not None:
            plan = plan.only_seeds(args.seeds)
        with _view(plan, args.progress_every, background=True) as view:
            report = run_sweep(plan, backend=args.backend, address=args.address,
                               max_concurrent=args.max_concurrent, retries=args.retries,
                               connect_timeout=args.connect_timeout, log=view.log)
        return 0 if report.ok else 1
    if args.watch:
        from experiments.progress import watch

        with _view(plan, args.progress_every, background=False) as view:
            watch(view)
        return 0
    return _status(plan, args.format)


def _view(plan: Any, every: float, background: bool) -> Any:
    """The live progress view of `plan`, read from its run folders (experiments/progress.py)."""
    from experiments.progress import ProgressView, RunSpec, Tracker

    tracker = Tracker([RunSpec.from_planned(r) for r in plan.runs], plan.runs_dir)
    return ProgressView(plan.sweep.name, tracker, every=every, background=background)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"give a number of seconds > 0, e.g. 30 (got {text!r})")
    return value


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"give seeds as integers separated by commas, e.g. 0,1 (got {text!r})") from None


def _plan(plan: Any, fmt: str) -> int:
    from experiments.sweep import plan_table

    if fmt == "json":
        print(json.dumps({"sweep": plan.sweep.name, "runs_dir": str(plan.runs_dir),
                          "runs": [r.row() for r in plan.runs], "totals": plan.totals()}, indent=1))
    else:
        print(plan_table(plan))
    return 0


# ---- status ------------------------------------------------------------------------------------------------------


def status_rows(plan: Any) -> list[dict[str, Any]]:
    """One row per run of the sweep (and per stray run folder in its output dir), from the run folders only."""
    from runfolder import RecordError, RunDir, iter_run_dirs

    rows = [_row(RunDir(plan.runs_dir / r.run_id), r.name, int(r.tokens)) for r in plan.runs]
    known = {r.run_id for r in plan.runs}
    for rd in iter_run_dirs(plan.runs_dir):
        if rd.run_id not in known:
            try:
                tokens = ((rd.read_config() or {}).get("train") or {}).get("tokens")
            except RecordError:  # an unreadable config.yaml: the row still shows the folder's state
                tokens = None
            budget = int(tokens) if isinstance(tokens, int | float) and math.isfinite(tokens) else 0
            rows.append(_row(rd, "(not in the sweep file)", budget))
    return rows


def _row(rd: Any, name: str, budget: int) -> dict[str, Any]:
    from runfolder import Status, run_state

    now = run_state(rd)
    status = now.status or Status()
    metrics = rd.metrics()
    train = [m for m in metrics if m.get("kind") == "train"]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    last = train[-1] if train else {}
    tokens = last.get("tokens", status.tokens or 0) or 0
    tps = last.get("tokens_per_s")
    eta = (budget - tokens) / tps if now.state == "running" and tps and budget > tokens else None
    error = now.detail if now.state == "unreadable" else status.error if now.state == "failed" else None
    return {
        "run_id": rd.run_id, "name": name, "state": now.state,
        "step": max(status.step or 0, last.get("step", 0)), "total_steps": status.total_steps,
        "loss": last.get("loss"),
        "val_loss": now.final.val_loss if now.final else evals[-1].get("val_loss") if evals else None,
        "tokens": tokens, "budget": budget, "tokens_per_s": tps, "eta_s": eta, "attempts": status.attempts,
        "node": status.node, "error": error.splitlines()[0] if error else None,
    }


def _status(plan: Any, fmt: str) -> int:
    rows = status_rows(plan)
    if fmt == "json":
        print(json.dumps({"sweep": plan.sweep.name, "runs_dir": str(plan.runs_dir), "runs": rows}, indent=1))
        return 0
    headers = ["run_id", "state", "step", "loss", "val_loss", "tokens", "tok/s", "ETA", "tries", "node", "name"]
    table = [[
        r["run_id"], r["state"], f"{r['step']}/{r['total_steps'] or '?'}", _num(r["loss"]), _num(r["val_loss"]),
        f"{human(r['tokens'])}/{human(r['budget'])}", "-" if r["tokens_per_s"] is None else human(r["tokens_per_s"]),
        _duration(r["eta_s"]), str(r["attempts"]), r["node"] or "-", r["name"],
    ] for r in rows]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print(f"sweep {plan.sweep.name} ({plan.runs_dir}) at {time.strftime('%H:%M:%S')}: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print(format_table(headers, table))
    for r in rows:
        if r["error"]:
            print(f"{r['run_id']}: {r['error']} (see {plan.runs_dir / r['run_id'] / 'train.log'})")
    return 0

