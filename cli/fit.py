"""Fit a scaling law to any table (CSV or parquet) and print the parameters with bootstrap confidence intervals.

  ultramem fit runs.csv --law power --x-col flops --loss-col val_loss
        L = E + A·x^(−α), fitted in log space from Porian et al.'s grid of starts; --no-floor: A·x^(−α) by OLS
  ultramem fit chinchilla.csv --law chinchilla --n-col "Model Size" --flops-col "Training FLOP" --format json
        L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, Approach 3); D = C/(6N) when only FLOPs are given
  --bootstrap K       resamples for the intervals (rows, or whole runs with --group-col); 0 = point fit only
  --at VALUE          power: also the loss at x = VALUE; chinchilla: N_opt and D_opt at compute C = VALUE

JSON output: {"law", "formula", "n_points", "n_boot" (usable resamples), "n_failed", "resamples" (drawn),
"usable_resamples", "reliable", "level", <param>: {value, lo, hi, se, reliable, usable_resamples, resamples}, ...,
"derived": {name: {...}}} with the parameters E, A, alpha (power) or E, A, B, alpha, beta. An interval is
"reliable": false (and printed as "[unreliable: ...]" in text) when fewer than half of the resamples were usable,
or when it has zero width because every usable resample gave the same value (analysis/bootstrap.py).

Bad input (a missing file or column, a cell that is text, empty/NaN or ≤ 0, too few points) is one line on stderr
naming the file, the column, the row and the fix, and exit code 2. Rows are data rows counted from 1 below the
header, with their line of the file (data row N is line N + 1 when the CSV has no blank lines).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

HELP = "fit a power law or the Chinchilla law to a CSV/parquet table, with bootstrap CIs"
SOLVERS = ("lsq", "porian", "huber")  # analysis.fit.SOLVERS, restated so that parsing arguments imports no scipy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help="CSV or parquet file, one row per run (or per checkpoint, with --group-col)")
    parser.add_argument("--law", choices=("power", "chinchilla"), required=True)
    parser.add_argument("--x-col", default="flops", help="power: the x column (default flops)")
    parser.add_argument("--n-col", default="N", help="chinchilla: parameter-count column (default N)")
    parser.add_argument("--d-col", default=None, help="chinchilla: token column (default D, unless --flops-col)")
    parser.add_argument("--flops-col", default=None, help="chinchilla: FLOPs column, D = C/(6N) when no --d-col")
    parser.add_argument("--loss-col", default="loss", help="loss column (default loss)")
    parser.add_argument("--group-col", default=None,
                        help="rows sharing this column's value are one run, resampled together (checkpoints)")
    parser.add_argument("--bootstrap", type=int, default=200, metavar="K", help="bootstrap resamples (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--at", type=float, action="append", default=[], metavar="VALUE",
                        help="power: loss at x = VALUE; chinchilla: N_opt, D_opt at C = VALUE (repeatable)")
    parser.add_argument("--no-floor", action="store_true", help="power: pure power law (E = 0) by log-log OLS")
    parser.add_argument("--solver", choices=SOLVERS, default="lsq",
                        help="power: lsq (default), porian (their published procedure, slower), huber")
    parser.add_argument("--estimator", choices=("huber", "mle"), default="huber",
                        help="chinchilla: huber (Hoffmann's objective, default) or mle (Epoch's Huber likelihood)")
    parser.add_argument("--format", choices=("text", "json"), default="text")


def run(args: argparse.Namespace) -> int:
    from analysis.checks import FitError  # lazy: numpy/scipy/pandas load only when fitting (cli/__init__.py)

    try:
        result = fit_table(args)
    except FitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(_text(result))
    return 0


def fit_table(args: argparse.Namespace) -> dict:
    # lazy: numpy/scipy/pandas load only when fitting (cli/__init__.py)
    from analysis.checks import FitError, filled_column, numeric_column, require_columns
    from analysis.collect import load_table

    if args.bootstrap < 0 or not 0 < args.level < 1:
        raise FitError(f"--bootstrap must be >= 0 and --level in (0, 1) (got {args.bootstrap}, {args.level})")
    bad_at = [v for v in args.at if not (math.isfinite(v) and v > 0)]
    if bad_at:
        raise FitError(f"--at must be a number > 0 (got {bad_at[0]:g})")
    df = load_table(args.table, lines=True)
    source = str(args.table)
    groups = None
    if args.group_col is not None:
        groups = filled_column(df, args.group_col, source)
    kw = dict(groups=groups, n_boot=args.bootstrap, seed=args.seed, level=args.level, source=source)
    if args.law == "power":
        # lazy: scipy, only when fitting
        from analysis.fit import fit_power_law_ci

        require_columns(df, [args.x_col, args.loss_col], source)
        x, loss = numeric_column(df, args.x_col, source), numeric_column(df, args.loss_col, source)
        fit = fit_power_law_ci(x, loss, floor=not args.no_floor, solver=args.solver,
                               targets=args.at, x_name=args.x_col, y_name=args.loss_col, **kw)
        params = ("E", "A", "alpha")
        formula = fit.law.formula(args.x_col)
    else:
        # lazy: scipy, only when fitting
        from analysis.chinchilla import chinchilla_columns, fit_chinchilla_ci

        d_col = args.d_col or (None if args.flops_col else "D")
        n, d, loss = chinchilla_columns(df, n_col=args.n_col, d_col=d_col, flops_col=args.flops_col,
                                        loss_col=args.loss_col, source=source)
        fit = fit_chinchilla_ci(n, d, loss, estimator=args.estimator, budgets=args.at, **kw)
        params = ("E", "A", "B", "alpha", "beta")
        formula = fit.law.formula()
    out = {"law": args.law, "formula": formula, "n_points": fit.n_points, "n_runs": fit.n_groups,
           "n_boot": len(fit.boot), "n_failed": fit.n_failed, "resamples": fit.resamples,
           "usable_resamples": len(fit.boot), "reliable": fit.reliable, "level": fit.level}
    out.update({p: fit.estimates[p].to_dict(full=True) for p in params})
    out["derived"] = {k: e.to_dict(full=True) for k, e in fit.estimates.items() if k not in params}
    return out


def _text(result: dict) -> str:
    pct = f"{result['level']:.0%}"
    boot = (f"{result['resamples']} resamples, {result['usable_resamples']} usable ({result['n_failed']} could not "
            f"be refitted)" + ("" if result["reliable"] else " — too few for trustworthy intervals"))
    lines = [result["formula"], f"{result['n_points']} points, {result['n_runs']} runs; bootstrap: {boot}", ""]
    rows = [(k, result[k]) for k in ("E", "A", "B", "alpha", "beta") if k in result]
    rows += list(result["derived"].items())
    width = max(len(k) for k, _ in rows)
    lines.append(f"{'':{width}}  {'value':>12}  {pct + ' interval':>27}")
    for k, e in rows:
        ci = f"[{e['lo']:.6g}, {e['hi']:.6g}]" if e["lo"] is not None else "—"
        if e.get("unreliable"):
            ci = f"[unreliable: {e['unreliable']}]"
        lines.append(f"{k:{width}}  {e['value']:>12.6g}  {ci:>27}")
    if any(e.get("unreliable") for _, e in rows):
        # lazy: numpy loads only when fitting (cli/__init__.py)
        from analysis.bootstrap import MIN_USABLE_SHARE

        lines.append(f"unreliable: an interval from fewer than {MIN_USABLE_SHARE:.0%} of the resamples, or of zero "
                     "width (a value the data do not identify, or noise-free data): do not quote it as a 95% "
                     "interval; more points or runs give real ones")
    return "\n".join(lines)
