"""Regenerate every plot and the report of a sweep from what is on disk.

  ultramem plots sweeps/tiny_cpu.yaml          the sweep's runs directory -> runs/tiny-cpu_report/ (<name>_report)
  ultramem plots runs/tiny-cpu --out DIR       a runs directory (report in DIR)
  ultramem plots docs/results/study/runs.csv   a saved runs table (curves.csv beside it): regenerates the committed
                                               figures and report in that folder, byte for byte
  ultramem plots docs/results/study_v3/runs.csv sweeps/study_v3.yaml --out docs/results/study_v3
                                               several sources, merged: a study trained in parts over several
                                               sessions (the committed table of the parts so far + the run folders
                                               of the part just trained; a run id found twice comes from the later)

Writes report.md, report.html, fits.json, runs.csv, curves.csv and figures/*.png|svg (see analysis/report.py).
The latency figure uses benchmarks/results/inference.json when present (or --bench).
--wandb also logs the analysis to W&B beside the sweep's runs (same project and group, one run of job_type
`analysis`: figures, fits and runs tables, the report as a versioned artifact; analysis/wandb_report.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.fit import SOLVERS

HELP = "regenerate the plots and the Markdown/HTML report of a sweep"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SWEEP_FILE_OR_RUNS_DIR", nargs="+",
                        help="sweep YAML, runs directory, or saved runs table (runs.csv / runs.parquet); several are "
                             "merged (a run id found twice is taken from the later one; --out required)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default <runs_dir>/../<name>_report, or the table's folder)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="K",
                        help="bootstrap resamples for every interval (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--bench", type=Path, default=None, help="inference benchmark JSON for the latency figure")
    parser.add_argument("--solver", choices=SOLVERS, default="lsq",
                        help="how the family laws are fitted: lsq (least squares in log space, default), huber "
                             "(robust to an outlying run, e.g. one seed that trained late), porian (Porian et al.)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the analysis to W&B (the runs' project and group, job_type analysis); "
                             "mode: $WANDB_MODE, else the runs' wandb.mode, else online")


def resolve_source(source: str | Path) -> Path:
    """A sweep YAML -> its runs directory; anything else as given."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        from experiments.sweep import sweep_runs_dir  # lazy: pydantic and the planner stay out of --help

        return sweep_runs_dir(path)
    return path


def run(args: argparse.Namespace) -> int:
    # first: a bad sweep file is refused before pandas and matplotlib load
    srcs = [resolve_source(s) for s in args.source]
    # lazy: pandas, scipy and matplotlib load only when plotting (cli/__init__.py)
    from analysis.checks import FitError
    from analysis.report import build_report

    for given, src in zip(args.source, srcs, strict=True):
        if not src.exists():
            hint = " (run the sweep first: ultramem sweep run FILE)" if src != Path(given) else ""
            print(f"error: {given}: {src} not found{hint}", file=sys.stderr)
            return 2
    try:
        report = build_report(srcs, args.out, n_boot=args.bootstrap, seed=args.seed, bench=args.bench,
                              solver=args.solver, log=print)
    except FitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    print(f"        {report.with_suffix('.html')}")
    # the W&B project and group come from run folders where one source has them
    return _log_to_wandb(report.parent, next((s for s in srcs if s.is_dir()), srcs[0])) if args.wandb else 0


def _log_to_wandb(report_dir: Path, src: Path) -> int:
    from analysis.wandb_report import log_analysis

    try:
        where = log_analysis(report_dir, src)
    except Exception as err:  # W&B's own errors (no API key, no network, ...): the report is written anyway
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"error: W&B: {type(err).__name__}: {first} (the report is written; set WANDB_MODE=offline to log "
              "without a connection and `wandb sync` later)", file=sys.stderr)
        return 1
    print(f"W&B:    {where}")
    return 0
