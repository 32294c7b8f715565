"""WSD (trunk + cooldown branches) against cosine at the same token budget, run by run.

Pairs are matched on (preset, corpus, seed, steps): a WSD run (a trunk at its own end, or a cooldown branch) and a
cosine run of the same model, data and seed trained for the same number of steps. Same seed means same
initialisation and data order, so a pair differs only in its learning-rate schedule; the relative difference
(L_wsd - L_cos) / L_cos is then summarised per (preset, steps) over seeds and over all pairs (mean with a
Student-t 95% interval over the pairs). Hägele et al. (2024) report WSD with a 20% 1-sqrt cooldown matches or
beats cosine. `branch_vs_trunk` checks the other claim: a branch ends below its trunk's loss at the same step.
Input: the per-run table (and curves) of `analysis.seeds.read_runs` (which carries schedule, branch_of, steps).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats


def wsd_vs_cosine(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per matched pair: preset, corpus, seed, steps, tokens, loss_wsd, loss_cos, rel_diff, kind."""
    keys = ["preset", "corpus", "seed", "steps"]
    wsd = runs[runs.schedule == "wsd"].assign(kind=lambda d: np.where(d.branch_of.notna(), "branch", "trunk"))
    cos = runs[runs.schedule == "cosine"]
    pairs = wsd.merge(cos, on=keys, suffixes=("_wsd", "_cos"))
    out = pairs[keys + ["tokens_wsd", "kind", "val_loss_wsd", "val_loss_cos"]].rename(
        columns={"tokens_wsd": "tokens", "val_loss_wsd": "loss_wsd", "val_loss_cos": "loss_cos"})
    out["rel_diff"] = (out.loss_wsd - out.loss_cos) / out.loss_cos
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


def mean_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of the mean (NaN bounds with fewer than 2 values)."""
    m = float(np.mean(x))
    if len(x) < 2:
        return m, math.nan, math.nan
    h = stats.t.ppf((1 + level) / 2, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
    return m, m - h, m + h


def summarise(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per (preset, corpus, steps, kind) and over all pairs: n, mean rel_diff with its 95% interval, max |rel_diff|."""
    rows = []
    groups = [*pairs.groupby(["preset", "corpus", "steps", "kind"], sort=True), (("all", "", math.nan, ""), pairs)]
    for (preset, corpus, steps, kind), g in groups:
        m, lo, hi = mean_interval(g.rel_diff.to_numpy(float))
        rows.append({"preset": preset, "corpus": corpus, "steps": steps, "kind": kind, "tokens": g.tokens.mean(),
                     "pairs": len(g), "rel_diff": m, "lo": lo, "hi": hi, "max_abs": g.rel_diff.abs().max()})
    return pd.DataFrame(rows)


def branch_vs_trunk(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """One row per finished branch whose trunk evaluated at the branch's last step: the branch's final val loss and
    the trunk's val loss at that step (`runs`, `curves` as `analysis.seeds.read_runs` returns them)."""
    at = {(r.run_id, r.step): r.loss for r in curves.itertuples(index=False)}
    rows = []
    for b in runs[runs.branch_of.isin(runs.run_id)].itertuples(index=False):
        trunk_loss = at.get((b.branch_of, b.steps))
        if trunk_loss is not None:
            rows.append({"run_id": b.run_id, "trunk": b.branch_of, "step": b.steps, "branch_loss": b.val_loss,
                         "trunk_loss": trunk_loss, "below": b.val_loss < trunk_loss})
    return pd.DataFrame(rows, columns=["run_id", "trunk", "step", "branch_loss", "trunk_loss", "below"])
