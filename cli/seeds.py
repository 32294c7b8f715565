"""Summarise the seed distributions of finished runs: spread per configuration, late seeds, curve timing, row usage.

  ultramem seeds runs/seeds-tiny runs/seeds-ablation-tiny --out docs/results/seeds

A point is a run configuration up to its seed (its sweep name without `-s<seed>`), per data source. Writes
seeds.csv (one row per run), spread.csv (per point: mean, sd with a bootstrap interval over seeds, min/median/max,
late seeds, t_half, rows used, row entropy), compare.csv (each variant vs its preset, each family vs dense at the
same size: Welch and Brown-Forsythe p-values), figures and report.md. analysis/seeds.py has the definitions.
"""

from __future__ import annotations

import argparse

HELP = "seed spread of finished runs (per configuration), with tests between configurations"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="runs folders (a sweep's output_dir)")
    parser.add_argument("--out", default=None, help="write the tables, figures and report.md here")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path  # lazy: keeps `ultramem --help` fast

    from analysis.seeds import seed_runs, seed_table, write_report
    from ultramem.config import ConfigError

    for r in args.runs:
        if not Path(r).is_dir():
            raise ConfigError(f"{r}: runs folder not found (give a sweep's output_dir, e.g. runs/seeds-tiny)")
    try:
        if args.out:
            print(f"wrote {write_report(args.runs, args.out)}")
            return 0
        table = seed_table(seed_runs(args.runs))
    except ValueError as err:  # no finished runs below the folders
        raise ConfigError(str(err)) from None
    cols = ["corpus", "point", "seeds", "mean", "sd", "min", "median", "max", "outlier_seeds", "t_half", "rows_used"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0
