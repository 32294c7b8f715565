"""Fit a scaling law to any table (CSV or parquet) and print the parameters with bootstrap confidence intervals.

  ultramem fit runs.csv --law power --x-col flops --loss-col val_loss
        L = E + A·x^(−α), fitted in log space from Porian et al.'s grid of starts; --no-floor: A·x^(−α) by OLS
  ultramem fit chinchilla.csv --law chinchilla --n-col "Model Size" --flops-col "Training FLOP" --format json
        L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, Approach 3); D = C/(6N) when only FLOPs are given
  --bootstrap K       resamples for the intervals (rows, or whole runs with --group-col); 0 = point fit only
  --at VALUE          power: also the loss at x = VALUE; chinchilla: N_opt and D_opt at compute C = VALUE

JSON output: {"law", "formula", "n_points", "n_boot", "n_failed", "level", <param>: {value, lo, hi, se}, ...,
"derived": {name: {value, lo, hi, se}}} with the parameters E, A, alpha (power) or E, A, B, alpha, beta.
"""

from __future__ import annotations

import argparse
import json
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
    from analysis.checks import FitError, require_columns
    from analysis.collect import load_table

    if args.bootstrap < 0 or not 0 < args.level < 1:
        raise FitError("--bootstrap must be >= 0 and --level in (0, 1)")
    df = load_table(args.table)
    source = str(args.table)
    groups = None
    if args.group_col is not None:
        require_columns(df, [args.group_col], source)
        groups = df[args.group_col].to_numpy()
    kw = dict(groups=groups, n_boot=args.bootstrap, seed=args.seed, level=args.level, source=source)
    if args.law == "power":
        # lazy: scipy, only when fitting
        from analysis.fit import fit_power_law_ci

        require_columns(df, [args.x_col, args.loss_col], source)
        fit = fit_power_law_ci(df[args.x_col], df[args.loss_col], floor=not args.no_floor, solver=args.solver,
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
           "n_boot": len(fit.boot), "n_failed": fit.n_failed, "level": fit.level}
    out.update({p: fit.estimates[p].to_dict() for p in params})
    out["derived"] = {k: e.to_dict() for k, e in fit.estimates.items() if k not in params}
    return out


def _text(result: dict) -> str:
    pct = f"{result['level']:.0%}"
    lines = [result["formula"], f"{result['n_points']} points, {result['n_runs']} runs; bootstrap: "
                                f"{result['n_boot']} resamples ({result['n_failed']} unidentifiable)", ""]
    rows = [(k, result[k]) for k in ("E", "A", "B", "alpha", "beta") if k in result]
    rows += list(result["derived"].items())
    width = max(len(k) for k, _ in rows)
    lines.append(f"{'':{width}}  {'value':>12}  {pct + ' interval':>27}")
    for k, e in rows:
        ci = f"[{e['lo']:.6g}, {e['hi']:.6g}]" if e["lo"] is not None else "—"
        lines.append(f"{k:{width}}  {e['value']:>12.6g}  {ci:>27}")
    return "\n".join(lines)
