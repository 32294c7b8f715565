"""Fit per-family peak-LR laws from an LR scan (a `method: lr_scan` sweep; docs/sweeps.md "LR scans").

  ultramem hparams sweeps/hparams_scan.yaml --out docs/results/hparams    the sweep's run folders
  ultramem hparams runs/hparams-scan --out DIR                           a runs directory
  ultramem hparams docs/results/hparams/runs.csv                         a saved runs table (writes beside it)

Per (family, size) the optimum of a parabola in log LR with a seed-cluster bootstrap interval, flagged when it sits
at the grid's edge; per family lr*(N) = A N^alpha with bootstrap bands (analysis/hparams.py). Writes:
  lr_rule.json     the fitted rule a sweep opts into: isoflop.hparams: fitted + isoflop.hparams_file: <it>
  optima.csv       one row per (family, size): lr*, interval, edge flag, grid
  report.md        the laws, the optima, the loss at lr* against the loss at today's rule, scans to extend
  runs.csv         the runs table (when read from run folders)
  figures/loss_vs_lr.png|svg, figures/lr_law.png|svg
A grid of fewer than 3 LRs at some size is an error (exit 2).
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


def run(args: argparse.Namespace) -> int:
    # lazy: pandas, scipy and matplotlib load only when fitting
    import pandas as pd

    from analysis.checks import FitError
    from analysis.collect import load_collected, save_collected
    from analysis.hparams import fit_law, fit_optima, fitted_rule, lr_table, plot_scan, report_md
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
    except FitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if not table:
        save_collected(collected, out)
    rule = fitted_rule(optima, laws, source=str(args.source))
    atomic_write_json(out / "lr_rule.json", json.loads(json.dumps(rule, allow_nan=True).replace("NaN", "null")))
    atomic_write_text(out / "optima.csv", pd.DataFrame([o.to_dict() for o in optima]).to_csv(index=False))
    plot_scan(groups, optima, laws, out)
    atomic_write_text(out / "report.md", report_md(groups, optima, laws, str(args.source), learning_rate))
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
