"""Do the laws predict what they did not see? (issue 27: "a scaling law is only as good as its extrapolation").

For one family's IsoFLOP points (analysis/isoflop.py `family_points`), Approach 3's L(N, D) = E + A/N^alpha + B/D^beta
is refitted without a held-out slice, the largest budget or the largest size, exactly as the study fits it (Huber,
multi-start, the trunk-cluster bootstrap: a size x seed unit resampled whole), and predicts the seed-mean loss of
every held-out (N, D) point. Its prediction interval joins two parts in quadrature on each side:

  - the law's uncertainty: the bootstrap refits' percentile band at (N, D) (LawFit.band), around the point fit;
  - the measured mean's own noise: t(k - 1) x s / sqrt(k), with s the pooled within-point seed sd of the fitted
    runs and k the held-out point's seeds (the prediction is of a k-seed mean, not of the law's curve).

`covered` says whether the measured mean lies inside. A slice whose points fall outside says where the law fails
(a bend it cannot represent, a floor E it cannot see from below the held-out range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.checks import FitError
from analysis.chinchilla import fit_chinchilla_ci

HOLDOUTS = ("largest budget", "largest size")
COLUMNS = ["family", "held out", "n", "d", "budget", "seeds", "measured", "predicted", "lo", "hi", "error",
           "covered"]


@dataclass
class Holdout:
    """One family's prediction of one held-out slice."""

    family: str
    held_out: str  # "largest budget" | "largest size"
    table: pd.DataFrame  # COLUMNS, one row per held-out (N, D) point
    fitted_points: int
    why: str = ""  # why there is no prediction (too few points left to fit)

    @property
    def coverage(self) -> float:
        return float(self.table["covered"].mean()) if len(self.table) else math.nan

    @property
    def mean_abs_error(self) -> float:
        return float(self.table["error"].abs().mean()) if len(self.table) else math.nan


def split(pts: pd.DataFrame, held_out: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fitted, held out) rows of a family's points: the largest budget's runs, or the largest size's."""
    if held_out == "largest budget":
        mask = pts["budget"] == pts["budget"].max()
    elif held_out == "largest size":
        mask = pts["n"] == pts["n"].max()
    else:
        raise ValueError(f"held_out must be one of {HOLDOUTS}, got {held_out!r}")
    return pts[~mask].reset_index(drop=True), pts[mask].reset_index(drop=True)


def seed_sd(pts: pd.DataFrame) -> tuple[float, int]:
    """The pooled within-point standard deviation of the seeds, and its degrees of freedom."""
    g = pts.groupby("cluster")["loss"]
    dof = int((g.count() - 1).clip(lower=0).sum())
    if dof == 0:
        return math.nan, 0
    return float(math.sqrt(g.apply(lambda x: ((x - x.mean()) ** 2).sum()).sum() / dof)), dof


def predict_holdout(pts: pd.DataFrame, family: str, held_out: str, *, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> Holdout:
    """Refit L(N, D) on `pts` without `held_out` and predict its points (see the module docstring)."""
    from scipy.stats import t as student_t  # lazy: scipy only when predicting

    fit_pts, held = split(pts, held_out)
    empty = pd.DataFrame(columns=COLUMNS)
    if fit_pts["n"].nunique() < 2 or fit_pts["d"].nunique() < 2 or held.empty:
        return Holdout(family, held_out, empty, len(fit_pts), "too few sizes or token budgets left to fit")
    try:
        law = fit_chinchilla_ci(fit_pts["n"], fit_pts["d"], fit_pts["loss"], groups=fit_pts["unit"].to_numpy(),
                                n_boot=n_boot, seed=seed, level=level, source=f"{family} without its {held_out}")
    except FitError as err:
        return Holdout(family, held_out, empty, len(fit_pts), str(err))
    s, dof = seed_sd(fit_pts)
    means = held.groupby("cluster", sort=False).agg(n=("n", "first"), d=("d", "first"), budget=("budget", "first"),
                                                    seeds=("loss", "size"), measured=("loss", "mean"))
    pred = np.asarray(law.law(means["n"].to_numpy(float), means["d"].to_numpy(float)), dtype=float)
    lo_b, hi_b = law.band(means["n"].to_numpy(float), means["d"].to_numpy(float))
    k = means["seeds"].to_numpy(float)
    noise = (student_t.ppf((1 + level) / 2, dof) * s / np.sqrt(k)) if dof > 0 else np.zeros_like(k)
    lo = pred - np.sqrt(np.clip(pred - lo_b, 0, None) ** 2 + noise**2)
    hi = pred + np.sqrt(np.clip(hi_b - pred, 0, None) ** 2 + noise**2)
    table = pd.DataFrame({"family": family, "held out": held_out, "n": means["n"].to_numpy(),
                          "d": means["d"].to_numpy(), "budget": means["budget"].to_numpy(), "seeds": k.astype(int),
                          "measured": means["measured"].to_numpy(), "predicted": pred, "lo": lo, "hi": hi})
    table["error"] = table["measured"] - table["predicted"]
    table["covered"] = (table["lo"] <= table["measured"]) & (table["measured"] <= table["hi"])
    return Holdout(family, held_out, table.sort_values(["budget", "n"]).reset_index(drop=True), len(fit_pts))


def predict_family(pts: pd.DataFrame, family: str, *, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> list[Holdout]:
    return [predict_holdout(pts, family, h, n_boot=n_boot, seed=seed, level=level) for h in HOLDOUTS]
