"""Bootstrap intervals cover known truths in most of many synthetic repetitions (the honesty check of the CIs)."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.fit import PowerLaw, fit_log_linear_ci, fit_power_law_ci


@pytest.mark.slow
def test_power_law_95_intervals_cover_the_truth():
    truth = PowerLaw(E=2.0, A=300.0, alpha=0.3)
    x = np.geomspace(1e6, 1e10, 10)
    reps, hits = 100, {"E": 0, "alpha": 0, "L(x=1e+11)": 0}
    want = {"E": truth.E, "alpha": truth.alpha, "L(x=1e+11)": float(truth(1e11))}
    for r in range(reps):
        y = truth(x) * np.exp(np.random.default_rng(1000 + r).normal(0, 0.005, x.size))
        est = fit_power_law_ci(x, y, n_boot=200, seed=r, targets=[1e11]).estimates
        for k in hits:
            hits[k] += est[k].lo <= want[k] <= est[k].hi
    for k, h in hits.items():
        assert h / reps >= 0.85, (k, h / reps)


def test_clustered_checkpoints_need_the_cluster_bootstrap():
    # 8 runs, 5 rows each sharing a run-level offset: rows of a run are not independent evidence
    x = np.repeat(np.geomspace(1e3, 1e6, 8), 5)
    run = np.repeat(np.arange(8), 5)
    reps, hits_rows, hits_runs = 200, 0, 0
    for r in range(reps):
        rng = np.random.default_rng(r)
        y = 3.0 - 0.04 * np.log(x) + rng.normal(0, 0.02, 8)[run] + rng.normal(0, 0.002, x.size)
        rows = fit_log_linear_ci(x, y, n_boot=200, seed=r).estimates["k"]
        runs = fit_log_linear_ci(x, y, groups=run, n_boot=200, seed=r).estimates["k"]
        hits_rows += rows.lo <= 0.04 <= rows.hi
        hits_runs += runs.lo <= 0.04 <= runs.hi
    assert hits_runs / reps >= 0.85
    assert hits_rows / reps < 0.7  # treating checkpoints as independent gives dishonestly narrow intervals


@pytest.mark.slow
def test_chinchilla_95_intervals_cover_the_truth():
    from analysis.chinchilla import HOFFMANN_2022, fit_chinchilla_ci

    n, d = np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 8))
    n, d = n.ravel(), d.ravel()
    truth = {"alpha": HOFFMANN_2022.alpha, "beta": HOFFMANN_2022.beta, "E": HOFFMANN_2022.E, "a": HOFFMANN_2022.a}
    reps, hits = 40, dict.fromkeys(truth, 0)
    for r in range(reps):
        loss = HOFFMANN_2022(n, d) * np.exp(np.random.default_rng(10_000 + r).normal(0, 0.01, n.size))
        est = fit_chinchilla_ci(n, d, loss, n_boot=100, seed=r).estimates
        for k, v in truth.items():
            hits[k] += est[k].lo <= v <= est[k].hi
    for k, h in hits.items():
        assert h / reps >= 0.85, (k, h / reps)
