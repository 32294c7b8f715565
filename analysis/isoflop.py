"""IsoFLOP profiles (Hoffmann et al. 2022, Approach 2) and the compute-optimal frontier N*(C), D*(C).

For each FLOP budget C, loss is fitted by a parabola in ln N over the `k_nearest` points closest (in ln N) to the
observed minimum, N* = exp(−p1/(2·p2)); a vertex outside those points' range, or a parabola opening downwards, is
rejected rather than extrapolated (the parabola is a symmetric local approximation of an asymmetric curve). Then
ln N* is regressed on ln C by OLS: N* = k·C^a (Porian et al.'s `power_law_fit`; D* = C/(6N*) likewise).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.bootstrap import Estimate, estimate
from analysis.checks import FitError, positive_array, require_columns, require_points
from analysis.fit import PurePowerLaw, fit_pure_power_law


def isoflop_optima(df: pd.DataFrame, *, flops_col: str = "flops", n_col: str = "n", loss_col: str = "loss",
                   k_nearest: int = 5, source: str = "<table>") -> pd.DataFrame:
    """One row per budget: flops, n_star, d_star (= C/6N*), loss_star (the parabola's minimum), n_points, valid.

    `valid` is False (with the reason in `why`) where the budget has fewer than 3 sizes, the parabola opens
    downwards, or its vertex lies outside the fitted points.
    """
    require_columns(df, [flops_col, n_col, loss_col], source)
    rows = []
    for c, g in df.groupby(flops_col, sort=True):
        x = np.log(positive_array(g[n_col], n_col, source))
        y = g[loss_col].to_numpy(float)
        row = {"flops": float(c), "n_star": math.nan, "d_star": math.nan, "loss_star": math.nan,
               "n_points": len(g), "valid": False, "why": ""}
        rows.append(row)
        if len(np.unique(x)) < 3:
            row["why"] = f"{len(np.unique(x))} sizes (need 3)"
            continue
        near = np.argsort(np.abs(x - x[np.argmin(y)]), kind="stable")[:k_nearest]
        p2, p1, p0 = np.polyfit(x[near], y[near], 2)
        vertex = -p1 / (2 * p2) if p2 > 0 else math.nan
        if not (p2 > 0 and x[near].min() <= vertex <= x[near].max()):
            row["why"] = "parabola opens downwards" if p2 <= 0 else "vertex outside the sampled sizes"
            continue
        n_star = math.exp(vertex)
        row.update(n_star=n_star, d_star=float(c) / (6 * n_star), loss_star=p0 - p1**2 / (4 * p2), valid=True)
    return pd.DataFrame(rows)


def parabola(df: pd.DataFrame, flops: float, *, flops_col: str = "flops", n_col: str = "n",
             loss_col: str = "loss", k_nearest: int = 5) -> np.ndarray:
    """Coefficients (p2, p1, p0) of the budget's parabola in ln N (for plotting the profile)."""
    g = df[df[flops_col] == flops]
    x, y = np.log(g[n_col].to_numpy(float)), g[loss_col].to_numpy(float)
    near = np.argsort(np.abs(x - x[np.argmin(y)]), kind="stable")[:k_nearest]
    return np.polyfit(x[near], y[near], 2)


def fit_frontier(optima: pd.DataFrame, source: str = "<table>") -> dict[str, PurePowerLaw]:
    """N*(C) = k·C^a and D*(C) = k'·C^b by OLS on the valid budgets (a + b = 1 by construction of D* = C/6N*)."""
    ok = optima[optima["valid"]]
    require_points(len(ok), 3, "the compute-optimal frontier N*(C) (valid IsoFLOP budgets)", source)
    return {"n": fit_pure_power_law(ok["flops"], ok["n_star"], x_name="C", y_name="N*", source=source),
            "d": fit_pure_power_law(ok["flops"], ok["d_star"], x_name="C", y_name="D*", source=source)}


def frontier_exponent_ci(optima: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Exponent a of N*(C) with a bootstrap over budgets (each budget's vertex is one observation)."""
    ok = optima[optima["valid"]]
    if len(ok) < 3:
        raise FitError(f"not enough points for the frontier: {len(ok)} valid IsoFLOP budgets, need at least 3")
    lc, ln = np.log(ok["flops"].to_numpy(float)), np.log(ok["n_star"].to_numpy(float))
    a = float(np.polyfit(lc, ln, 1)[0])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(lc), len(lc))
        if len(np.unique(lc[idx])) >= 2:
            draws.append(np.polyfit(lc[idx], ln[idx], 1)[0])
    return estimate(a, np.array(draws), level)
