"""Plan, run and watch a sweep (a YAML grid of runs; see docs/sweeps.md).

  ultramem sweep plan sweeps/tiny_cpu.yaml              every run: id, params, tokens, FLOPs, GPU-hours, resources
  ultramem sweep run sweeps/tiny_cpu.yaml               train every unfinished run on a fresh local Ray
  ultramem sweep run FILE --address HEAD:6379           ... on an existing Ray cluster (or set RAY_ADDRESS)
  ultramem sweep run FILE --backend local               ... on this machine without Ray
  ultramem sweep run FILE --seeds 0                     ... only the runs of these seeds (a study in parts)
  ultramem sweep run FILE --done TABLE                  ... less the runs finished in a committed runs table
  ultramem sweep status sweeps/tiny_cpu.yaml            state, step, loss, tokens/s, ETA from the run folders
  ultramem sweep status FILE --watch                    the live progress view of a sweep started elsewhere
  ultramem sweep refine STUDY.yaml --out REFINED.yaml   an IsoFLOP study plus the runs most worth their compute

`sweep run` and `status --watch` show live progress (experiments/progress.py): on a terminal a view redrawn in place,
otherwise one line every --progress-every seconds (first at once): runs done / running / pending / failed, planned
FLOPs done, throughput, ETA, and per running run its name, step/total and latest loss.

`sweep refine` reads a finished IsoFLOP study (its run folders, or --runs TABLE) and writes REFINED.yaml: the study
file verbatim plus `isoflop.extra` entries (analysis/refine.py): the next sizes beyond an edge where a budget's
vertex is not bracketed, seeds at the sizes around a vertex the runs do not resolve, seeds at the minimum sizes
where two families' comparison is least resolved; each after a `# why; cost` comment, highest priority first
(--max-flops keeps those within X trained FLOPs). `sweep run REFINED.yaml` then trains only the new runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments.textfmt import decimal as _num
from experiments.textfmt import duration as _duration
from experiments.textfmt import format_table, human
from ultramem.config import ConfigError

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
    r.add_argument("--done", type=Path, default=None, metavar="TABLE",
                   help="skip the runs whose ids are in this runs table (runs.csv from `ultramem plots`): a study "
                        "continued on another machine from its committed table; a trunk with a branch still to "
                        "train trains again")
    r.add_argument("--progress-every", type=_seconds, default=EVERY_S, metavar="S",
                   help=f"without a terminal, print a progress line every S seconds (default {EVERY_S:g}; the first "
                        "at once)")

    f = sub.add_parser("refine", help="write an IsoFLOP study plus the runs most worth their compute (a new YAML)")
    f.add_argument("file", help="the study's sweep YAML (method: isoflop)")
    f.add_argument("--out", type=Path, required=True,
                   help="the refined sweep YAML to write (beside the study: base, output_dir and hparams_file are "
                        "relative to the file's folder)")
    f.add_argument("--runs", type=Path, default=None,
                   help="the study's runs table (runs.csv / .parquet from `ultramem plots`) or runs directory "
                        "(default: the study's run folders)")
    f.add_argument("--max-flops", type=_flops, default=None, metavar="X",
                   help="add the highest-priority additions while their trained FLOPs (as `sweep plan` counts "
                        "them) stay within X, e.g. 1e15")
    f.add_argument("--min-seeds", type=int, default=5, metavar="K",
                   help="seeds per size that a seed addition brings the sizes around a minimum to (default 5)")
    f.add_argument("--bootstrap", type=int, default=1000, metavar="K", help="bootstrap resamples (default 1000)")
    f.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    f.add_argument("--force", action="store_true", help="overwrite --out if it exists")

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
    if args.action == "refine":
        return _refine(plan, args)
    if args.action == "run":
        from experiments.scheduler import run_sweep

        if args.seeds is not None:
            plan = plan.only_seeds(args.seeds)
        if args.done is not None:
            plan = _without_done(plan, args.done)
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


def _without_done(plan: Any, table: Path) -> Any:
    """`plan` less the runs finished in `table` (`sweep run --done`); the count goes to stdout."""
    from analysis.checks import FitError  # lazy: pandas only with --done
    from analysis.collect import load_table

    try:
        runs = load_table(table)
    except FitError as err:
        raise ConfigError(f"--done: {err}") from None
    if "run_id" not in runs.columns:
        raise ConfigError(f"--done: {table}: no run_id column; give the runs.csv that `ultramem plots` writes")
    done = set(runs["run_id"].astype(str))
    left = plan.without_done(done)
    retrain = sum(1 for r in left.runs if r.run_id in done)
    print(f"--done {table}: {len(plan.runs) - len(left.runs)} of the {len(plan.runs)} runs finished there"
          + (f"; {retrain} trunk(s) train again for a branch still to train" if retrain else ""))
    return left


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


def _flops(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"give a number of FLOPs > 0, e.g. 1e15 (got {text!r})")
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


# ---- refine ------------------------------------------------------------------------------------------------------


def _refine(plan: Any, args: argparse.Namespace) -> int:
    from analysis.checks import FitError
    from analysis.refine import refine, within_budget

    _refine_checks(plan, args)
    try:
        runs, source = _study_runs(plan, args.runs)
        result = refine(runs, _study(plan, args.file), min_seeds=args.min_seeds, n_boot=args.bootstrap,
                        seed=args.seed, source=source)
    except FitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}")
    if not result.additions:
        print(f"{args.file}: nothing to add" + (" now (see the notes)" if result.notes else
              f": every budget's vertex is bracketed and resolved, and every comparison of families, as the runs in "
              f"{source} show") + f"; {args.out} not written")
        return 0
    costs = _price(plan, args, result.additions)
    kept = within_budget(result.additions, [c[0] for c in costs], args.max_flops)
    if not kept:
        raise ConfigError(f"--max-flops {args.max_flops:g}: below the cost of the first addition "
                          f"({costs[0][0]:.3g} FLOPs: {result.additions[0].why}); raise it")
    refined = _write_refined(plan, args, kept, costs)
    _refine_summary(plan, refined, result.additions, kept, costs, args)
    return 0


def _refine_checks(plan: Any, args: argparse.Namespace) -> None:
    """Refuse what cannot be refined before reading any run: a non-isoflop sweep, an existing --out, a bad
    --min-seeds or --bootstrap, or an --out elsewhere when the study names paths relative to its own folder."""
    spec, file, out = plan.sweep.isoflop, Path(args.file), Path(args.out)
    if spec is None:
        raise ConfigError(f"{file}: method is {plan.sweep.method}; `sweep refine` refines an IsoFLOP study "
                          "(method: isoflop)")
    if out.exists() and not args.force:
        raise ConfigError(f"{out}: exists; pass --force to overwrite it, or choose another --out")
    if not out.absolute().parent.is_dir():
        raise ConfigError(f"{out}: its folder {out.absolute().parent} does not exist; create it or choose another --out")
    if args.min_seeds < 1 or args.bootstrap < 1:
        raise ConfigError(f"--min-seeds {args.min_seeds} / --bootstrap {args.bootstrap}: give numbers >= 1")
    relative = [name for name, value in (("base", plan.sweep.base if isinstance(plan.sweep.base, str) else None),
                                         ("output_dir", plan.sweep.output_dir), ("isoflop.hparams_file",
                                                                                spec.hparams_file))
                if value and not Path(os.path.expandvars(value)).expanduser().is_absolute()]
    if relative and out.absolute().parent.resolve() != file.absolute().parent.resolve():
        raise ConfigError(f"{out}: {file} gives {', '.join(relative)} relative to its folder, so the refined file "
                          f"must lie there too (--out {file.parent / out.name})")


def _study_runs(plan: Any, given: Path | None) -> tuple[Any, str]:
    """The study's runs table: --runs (a table or a runs directory), else its run folders, as `ultramem plots`
    collects them."""
    from analysis.checks import FitError
    from analysis.collect import load_collected, load_table
    from analysis.refine import RUNS_COLUMNS

    src = Path(given) if given is not None else plan.runs_dir
    if not src.exists():
        hint = "" if given is not None else f" (run the study first: ultramem sweep run {plan.path})"
        raise FitError(f"{src}: not found; no finished runs to refine from{hint}")
    if src.is_file():
        missing = [c for c in RUNS_COLUMNS if c not in load_table(src).columns]
        if missing:
            raise FitError(f"{src}: missing column(s) {', '.join(missing)}; give the runs table `ultramem plots` "
                           "writes (runs.csv) or a runs directory")
    return load_collected(src).runs, str(src)


def _study(plan: Any, path: str) -> Any:
    """The Study of analysis/refine.py: budgets, seeds, every planned run, and per family the rungs it may add:
    the ladder's presets, sweep-local presets and the registered presets of the ladder's own ladders (same source
    in `ultramem models`, named alike: dense-o<k>), as the sweep trains them (experiments.sweep.plan.isoflop_sizes)."""
    import pandas as pd

    from analysis.refine import Rung, Study, named_like, rungs_of
    from experiments.sweep.plan import isoflop_sizes
    from ultramem.presets import PRESETS, preset_source

    spec, local = plan.sweep.isoflop, plan.sweep.presets
    planned = pd.DataFrame([{"run_id": r.run_id, "family": r.family, "preset": r.preset,
                             "budget": r.values["isoflop.budget"], "seed": int(r.config["seed"])} for r in plan.runs])
    twice = planned[planned.duplicated(["preset", "budget", "seed"])]
    if len(twice):
        r = twice.iloc[0]
        raise ConfigError(f"{path}: {r['preset']} at C={r['budget']:g}, seed {r['seed']} is several runs (a swept "
                          "parameter); `sweep refine` needs one run per (preset, budget, seed)")
    families = set(planned["family"])
    sources = {preset_source(p) for p in spec.ladder if p in PRESETS and p not in local}
    registered = [n for n, cfg in PRESETS.items() if n not in local and cfg.family in families
                  and preset_source(n) in sources and named_like(n, list(spec.ladder))]
    names = list(dict.fromkeys([*spec.ladder, *(e.preset for e in spec.extra), *local, *registered]))
    rungs = [Rung(s.preset, s.family, s.n, s.flops_per_token) for s in isoflop_sizes(path, names).values()
             if s.family in families]
    return Study(list(spec.budgets), list(plan.sweep.seeds or sorted(set(planned["seed"]))),
                 rungs_of(rungs, list(spec.ladder)), planned, spec.max_tokens)


def _entries(additions: list[Any], costs: list[tuple[float, int]] | None) -> list[str]:
    """The additions as isoflop.extra items, each after its `# why; cost` comment."""
    from experiments.sweep.isoflop import extra_entry_text

    out = []
    for i, a in enumerate(additions):
        cost = f"; cost: {costs[i][0]:.3g} FLOPs, {costs[i][1]} runs" if costs else ""
        entry = {"preset": a.preset, "budgets": a.budgets, "seeds": a.seeds, "why": f"{a.kind}: {a.why}"}
        out.append(extra_entry_text(entry, f"{a.kind} (priority {a.priority:.2f}): {a.why}{cost}"))
    return out


def _planned_with(plan: Any, args: argparse.Namespace, items: list[str], header: str) -> tuple[Any, str]:
    """The plan of the study file with `items` appended to its isoflop.extra (a file beside --out, removed after),
    and the text."""
    from experiments.sweep import plan_sweep
    from experiments.sweep.isoflop import add_extra_text

    text = add_extra_text(Path(args.file).read_text(encoding="utf-8"), [header, *items], str(args.file))
    out = Path(args.out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".yaml", dir=out.absolute().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return plan_sweep(tmp), text
    finally:
        os.unlink(tmp)


def _price(plan: Any, args: argparse.Namespace, additions: list[Any]) -> list[tuple[float, int]]:
    """(trained FLOPs, runs) of each addition as `sweep plan` counts them (a branch: its cooldown only)."""
    first = len(plan.sweep.isoflop.extra)
    priced, _ = _planned_with(plan, args, _entries(additions, None), "# (pricing)\n")
    costs = [(0.0, 0)] * len(additions)
    for r in priced.runs:
        i = r.values.get("isoflop.extra", -1) - first
        if i >= 0:
            costs[i] = (costs[i][0] + r.trained_flops, costs[i][1] + 1)
    return costs


def _write_refined(plan: Any, args: argparse.Namespace, kept: list[Any], costs: list[tuple[float, int]]) -> Any:
    """Write --out (the study file plus the kept additions) once its plan keeps every run id of the study and its
    runs folder; returns that plan."""
    from runfolder import atomic_write_text

    header = (f"# added by `ultramem sweep refine` from the runs of this study ({len(kept)} "
              f"entr{'y' if len(kept) == 1 else 'ies'}, "
              f"{sum(c[0] for c in costs[:len(kept)]):.3g} FLOPs; analysis/refine.py)\n")
    refined, text = _planned_with(plan, args, _entries(kept, costs), header)
    ids = {r.run_id for r in refined.runs}
    lost = [r.run_id for r in plan.runs if r.run_id not in ids]
    if refined.runs_dir != plan.runs_dir or lost:
        raise ConfigError(f"{args.out}: the refined file would " + (f"lose {len(lost)} run(s) of the study ({lost[0]}, "
                          "...)" if lost else f"write to {refined.runs_dir}, not {plan.runs_dir}")
                          + "; this is a bug in `sweep refine`: refine by hand with isoflop.extra")
    atomic_write_text(Path(args.out), text)
    return refined


def _refine_summary(plan: Any, refined: Any, additions: list[Any], kept: list[Any], costs: list[tuple[float, int]],
                    args: argparse.Namespace) -> None:
    rows = [[str(i), a.kind, a.preset, ", ".join(human(c) for c in a.budgets), ",".join(map(str, a.seeds)),
             str(costs[i][1]), human(costs[i][0]), a.why] for i, a in enumerate(kept)]
    print(format_table(["#", "addition", "preset", "budget C", "seeds", "runs", "FLOPs", "why"], rows))
    study = {r.run_id for r in plan.runs}
    new = [r for r in refined.runs if r.run_id not in study]
    total = sum(r.trained_flops for r in new)
    print(f"total: {len(kept)} addition(s), {len(new)} new run(s), {human(total)} FLOPs ({total:.3g}; the study: "
          f"{human(plan.totals()['flops'])}) -> {args.out}")
    if len(kept) < len(additions):
        left = additions[len(kept):]
        print(f"--max-flops {args.max_flops:g}: {len(left)} lower-priority addition(s) left out "
              f"({human(sum(c[0] for c in costs[len(kept):]))} FLOPs), the first: {left[0].kind} {left[0].preset}")
    print(f"next: ultramem sweep run {args.out}   (trains only the new runs; the study's finished runs are skipped)")
