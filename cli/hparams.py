"""Fit per-family peak-LR laws from an LR scan (a `method: lr_scan` sweep; docs/sweeps.md "LR scans").

  ultramem hparams sweeps/hparams_scan.yaml --out docs/results/hparams    the sweep's run folders
  ultramem hparams runs/hparams-scan --out DIR                           a runs directory
  ultramem hparams docs/results/hparams/runs.csv                         a saved runs table (writes beside it)

Per (family, size) the optimum of a parabola in log LR with a seed-cluster bootstrap interval, flagged when it sits
at the grid's edge; per family lr*(N) = A N^alpha with bootstrap bands (analysis/hparams.py). Writes:
  lr_rule.json     the fitted rule a sweep opts into: isoflop.hparams: fitted + isoflop.hparams_file: <it>
  optima.csv       one row per (family, size, variant): lr*, interval, edge flag, grid
  variants.csv     variants of one size (a rung with several presets or sweep-local variants): each at its own
                   best LR, minus the rung's MoE and its own preset, nats with paired seed-bootstrap intervals
  report.md        the laws, the optima, the loss at lr* against the loss at today's rule, scans to extend
  runs.csv         the runs table (when read from run folders)
  figures/loss_vs_lr.png|svg, figures/lr_law.png|svg
A grid of fewer than 3 LRs at some size is an error (exit 2).

  ultramem hparams sweeps/hparams_scan.yaml --refine sweeps/hparams_scan_r1.yaml [--min-seeds 3]
writes the sweep file again with `lr_scan.extra` entries appended (each under a comment: why, and its cost as
`sweep plan` prices it): LRs beyond an edge where the optimum is not bracketed, seeds up to --min-seeds at the 3
LRs around each optimum inside the grid. It keeps the sweep's name, so `ultramem sweep run` of it writes into the
same folder and trains only the added runs (the others' run ids are unchanged and finished).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "fit per-family LR laws lr*(N) from an LR scan (method: lr_scan)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SWEEP_OR_RUNS",
                        help="lr_scan sweep YAML, its runs directory, or a saved runs table (runs.csv / .parquet)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default <runs_dir>/../<name>_hparams, or the table's folder)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="K", help="seed resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--refine", type=Path, default=None, metavar="OUT.yaml",
                        help="write the sweep with the runs the scan needs next (lr_scan.extra) instead of fitting")
    parser.add_argument("--min-seeds", type=int, default=3, metavar="K",
                        help="--refine: seeds wanted at the 3 LRs around each optimum (default 3)")
    parser.add_argument("--force", action="store_true", help="--refine: overwrite OUT.yaml")


def run(args: argparse.Namespace) -> int:
    if args.refine is not None:
        return refine(args)
    # lazy: pandas, scipy and matplotlib load only when fitting
    import pandas as pd

    from analysis.checks import FitError
    from analysis.collect import load_collected, save_collected
    from analysis.hparams import (
        compare_variants,
        fit_law,
        fit_optima,
        fitted_rule,
        lr_table,
        plot_scan,
        report_md,
    )
    from cli.plots import resolve_source
    from experiments.hparams import learning_rate
    from runfolder import atomic_write_json, atomic_write_text

    src = resolve_source(args.source)
    if not src.exists():
        hint = " (run the sweep first: ultramem sweep run FILE)" if src != Path(args.source) else ""
        print(f"error: {args.source}: {src} not found{hint}", file=sys.stderr)
        return 2
    table = src.is_file()
    out = args.out or (src.parent if table else src.parent / f"{src.name}_hparams")
    try:
        collected = load_collected(src)
        groups = lr_table(collected.runs)
        optima = fit_optima(groups, args.bootstrap, args.seed)
        families = list(dict.fromkeys(g["family"] for g in groups))
        laws = {f: fit_law(f, groups, optima, args.bootstrap, args.seed) for f in families}
        variants = compare_variants(groups, optima, args.bootstrap, args.seed)
    except FitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if not table:
        save_collected(collected, out)
    rule = fitted_rule(optima, laws, source=str(args.source))
    atomic_write_json(out / "lr_rule.json", json.loads(json.dumps(rule, allow_nan=True).replace("NaN", "null")))
    atomic_write_text(out / "optima.csv", pd.DataFrame([o.to_dict() for o in optima]).to_csv(index=False))
    if variants:
        atomic_write_text(out / "variants.csv", pd.DataFrame(variants).to_csv(index=False))
    plot_scan(groups, optima, laws, out)
    atomic_write_text(out / "report.md", report_md(groups, optima, laws, str(args.source), learning_rate, variants))
    for fam, law in laws.items():
        text = (f"lr*(N) = {law.coef:.4g} N^{law.exponent:.3f}, alpha [{law.exponent_ci[0]:.3g}, "
                f"{law.exponent_ci[1]:.3g}], N {law.n_min:.3g}-{law.n_max:.3g}") if law else "not fitted"
        print(f"{fam}: {text}")
    flagged = [o for o in optima if o.edge]
    if flagged:
        print(f"{len(flagged)} scan(s) with the optimum at the grid's edge (see the report): "
              + ", ".join(f"{o.family} N={o.n:.3g} ({o.edge})" for o in flagged))
    print(f"report: {out / 'report.md'}\nrule:   {out / 'lr_rule.json'}")
    return 0


def refine(args: argparse.Namespace) -> int:
    """`--refine OUT.yaml`: the sweep file with the additions its finished runs call for (analysis/hparams.py)."""
    from analysis.checks import FitError
    from analysis.collect import load_collected
    from analysis.hparams import extra_yaml, lr_optimum, scan_additions
    from experiments.sweep.plan import plan_sweep
    from runfolder import atomic_write_text
    from ultramem.config import ConfigError

    src, out = Path(args.source), args.refine
    if src.suffix not in (".yaml", ".yml") or not src.is_file():
        print(f"error: {src}: --refine reads a method: lr_scan sweep file (.yaml), which it writes again with "
              "lr_scan.extra entries", file=sys.stderr)
        return 2
    if args.min_seeds < 1:
        print(f"error: --min-seeds {args.min_seeds}: give at least 1", file=sys.stderr)
        return 2
    if out.exists() and not args.force:
        print(f"error: {out} exists; give another path or --force to overwrite it", file=sys.stderr)
        return 2
    try:
        plan = plan_sweep(src)
        if plan.sweep.lr_scan is None:
            raise ConfigError(f"{src}: method is {plan.sweep.method!r}; --refine reads a method: lr_scan sweep")
        done = _finished(load_collected(plan.runs_dir).runs) if plan.runs_dir.is_dir() else {}
        additions = []
        for preset in dict.fromkeys(r.preset for r in plan.runs):
            mine = [r for r in plan.runs if r.preset == preset and r.run_id in done]
            if len({r.values["lr_scan.factor"] for r in mine}) < 3:
                continue  # not enough finished yet (or not run): nothing to refine from
            f = [r.values["lr_scan.factor"] for r in mine]
            seeds = [int(r.values.get("seed", 0)) for r in mine]
            opt = lr_optimum([r.config["train"]["lr"] for r in mine], [done[r.run_id] for r in mine], seeds,
                             family=mine[0].family, n=mine[0].active_params, n_boot=200, where=f"{src}: {preset}")
            additions += scan_additions(str(preset), opt, list(zip(f, seeds, strict=True)),
                                        min_seeds=args.min_seeds)
    except (ConfigError, FitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not done:
        print(f"error: {plan.runs_dir}: no finished runs of {src} (run it first: ultramem sweep run {src})",
              file=sys.stderr)
        return 2
    text = src.read_text()
    if not additions:
        print(f"{src}: every scan with >= 3 finished LRs has its optimum inside the grid and {args.min_seeds} "
              "seed(s) at the LRs around it; nothing to add")
        return 0
    draft = out.with_name(f".{out.name}.draft")
    try:
        atomic_write_text(draft, extra_yaml(text, additions))
        costs = _costs(plan, plan_sweep(draft), len(plan.sweep.lr_scan.extra), len(additions))
    except (ConfigError, FitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        draft.unlink(missing_ok=True)
    atomic_write_text(out, extra_yaml(text, additions, [f"{c / 1e12:.3g} TFLOPs, {n} runs" for n, c in costs]))
    for a, (n, c) in zip(additions, costs, strict=True):
        print(f"+ {a.preset} x{_f(a.lr_factors)} seeds {a.seeds}: {n} runs, {c / 1e12:.3g} TFLOPs  ({a.why})")
    print(f"{out}: {sum(n for n, _ in costs)} runs, {sum(c for _, c in costs) / 1e12:.3g} TFLOPs added; "
          f"run them with: ultramem sweep run {out}")
    return 0


def _finished(runs) -> dict[str, float]:  # noqa: ANN001 (a pandas frame)
    ok = runs[runs["val_loss"].notna()]
    return dict(zip(ok["run_id"], ok["val_loss"].astype(float), strict=True))


def _costs(before, after, first: int, count: int) -> list[tuple[int, float]]:  # noqa: ANN001 (plans)
    """(runs, FLOPs) of each new extra entry: the refined plan's runs that the sweep did not have, by entry."""
    old = {r.run_id for r in before.runs}
    out = [(0, 0.0)] * count
    for r in after.runs:
        i = r.values.get("lr_scan.extra")
        if r.run_id not in old and i is not None and i >= first:
            n, c = out[i - first]
            out[i - first] = (n + 1, c + r.flops)
    return out


def _f(fs: list[float]) -> str:
    return "[" + ", ".join(f"{f:g}" for f in fs) + "]"
