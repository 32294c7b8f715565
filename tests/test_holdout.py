"""Held-out predictions of L(N, D) (issue 27: "the laws predict what they did not see"): on a synthetic IsoFLOP
study drawn from a known law, the refit without the largest budget (or size) predicts the held-out means within
its intervals and near the generating law; on one whose largest size departs from the law by a known step, the
prediction misses there, and says so."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.chinchilla import ChinchillaLaw
from analysis.holdout import predict_holdout, seed_sd, split

LAW = ChinchillaLaw(E=1.2, A=40.0, B=60.0, alpha=0.35, beta=0.3)


def study(seed: int = 0, bump_at_largest: float = 0.0, seeds: int = 3) -> pd.DataFrame:
    """6 budgets x the 5 sizes nearest each budget's optimum on a 10-rung ladder, `seeds` seeds; every size x seed
    is one unit (a trunk) with its own offset, plus independent noise per run."""
    rng = np.random.default_rng(seed)
    ladder = np.geomspace(1e4, 3e5, 10)
    rows = []
    offsets = {(i, s): rng.normal(0, 0.01) for i in range(len(ladder)) for s in range(seeds)}
    for c in np.geomspace(1e11, 1e13, 6):
        opt = np.sqrt(c / 6 / 20)  # ~20 tokens per parameter
        near = np.argsort(np.abs(np.log(ladder / opt)))[:5]
        for i in sorted(near):
            n = ladder[i]
            d = c / (6 * n)
            for s in range(seeds):
                loss = float(LAW(n, d)) + offsets[(i, s)] + rng.normal(0, 0.005)
                loss += bump_at_largest if i == len(ladder) - 1 else 0.0
                rows.append({"budget": c, "flops": c, "n": n, "d": d, "loss": loss, "seed": s,
                             "cluster": f"{n:.0f}|{d:.0f}", "unit": f"{n:.0f}|s{s}"})
    return pd.DataFrame(rows)


def test_split_takes_the_largest_budget_or_size():
    pts = study()
    fit, held = split(pts, "largest budget")
    assert set(held["budget"]) == {pts["budget"].max()} and pts["budget"].max() not in set(fit["budget"])
    fit, held = split(pts, "largest size")
    assert set(held["n"]) == {pts["n"].max()} and len(fit) + len(held) == len(pts)


def test_pooled_seed_sd_matches_numpy():
    pts = study()
    s, dof = seed_sd(pts)
    by_hand = np.sqrt(sum(((g - g.mean()) ** 2).sum() for _, g in pts.groupby("cluster")["loss"]) /
                      sum(len(g) - 1 for _, g in pts.groupby("cluster")["loss"]))
    assert s == pytest.approx(by_hand) and dof == len(pts) - pts["cluster"].nunique()


@pytest.mark.parametrize("held_out", ["largest budget", "largest size"])
def test_a_law_that_holds_predicts_its_held_out_points(held_out):
    pts = study()
    h = predict_holdout(pts, "dense", held_out, n_boot=200)
    assert not h.why and len(h.table) >= 2
    truth = LAW(h.table["n"].to_numpy(), h.table["d"].to_numpy())
    assert np.abs(h.table["predicted"] - truth).max() < 0.03  # near the generating law
    assert h.coverage >= 0.8  # and the measured means inside the intervals
    assert (h.table["lo"] < h.table["predicted"]).all() and (h.table["predicted"] < h.table["hi"]).all()


def test_a_law_that_breaks_at_the_largest_size_is_caught_there():
    """+0.08 nats at the largest size only: the law fitted below it cannot know, and its prediction misses."""
    pts = study(bump_at_largest=0.08)
    h = predict_holdout(pts, "dense", "largest size", n_boot=200)
    assert h.coverage == 0.0 and (h.table["error"] > 0.04).all()
    ok = predict_holdout(pts, "dense", "largest budget", n_boot=200)
    assert (ok.table["n"] < pts["n"].max()).any()  # the budget slice mostly lies below the bump


def test_too_little_left_to_fit_says_why():
    pts = study()
    pts = pts[pts["budget"] >= sorted(pts["budget"].unique())[-2]]  # two budgets: one left after holding out
    h = predict_holdout(pts[pts["n"] == pts["n"].min()], "dense", "largest budget", n_boot=50)
    assert h.table.empty and "too few" in h.why
