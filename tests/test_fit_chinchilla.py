"""L(N, D) fits against Epoch AI's published reproduction of Hoffmann et al. (2022) and against known synthetic laws."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import check_grad

from analysis import lse
from analysis.checks import FitError, NotEnoughPointsError
from analysis.chinchilla import (
    EPOCH_2024,
    HOFFMANN_2022,
    ChinchillaLaw,
    chinchilla_columns,
    fit_chinchilla,
    fit_chinchilla_ci,
)

# Epoch AI, analyzing-chinchilla data_analysis.ipynb (reference/scaling-laws.md §1.3-1.4)
EPOCH_MLE = {"E": 1.81686, "A": 482.01, "B": 2085.43, "alpha": 0.34781, "beta": 0.36585}
EPOCH_NLL, EPOCH_LOG_SIGMA = -879.7731, -12.2666
GRID_FIT = {"E": 1.8172, "A": 477.8, "B": 2143.4, "alpha": 0.3473, "beta": 0.3672}
GRID_OBJECTIVE = 0.0010182740  # printed to 10 decimals
EPOCH_SE = {"E": 0.02566, "A": 124.52, "alpha": 0.01540, "beta": 0.02060}


@pytest.fixture(scope="module")
def epoch_data(scaling_data):
    df = pd.read_csv(scaling_data / "chinchilla_svg_extracted_data.csv")
    df = df[df["loss"] < sorted(df["loss"])[-5]]  # Epoch drops the 5 highest-loss points
    assert len(df) == 240
    return chinchilla_columns(df, n_col="Model Size", d_col=None, flops_col="Training FLOP", loss_col="loss")


def _close(law: ChinchillaLaw, ref: dict, rel: float) -> None:
    for k, v in ref.items():
        assert getattr(law, k) == pytest.approx(v, rel=rel), k


def test_mle_reproduces_epoch_headline_estimate(epoch_data):
    fit = fit_chinchilla(*epoch_data, estimator="mle", x0=HOFFMANN_2022)  # Epoch's start
    _close(fit.law, EPOCH_MLE, 1e-3)
    assert fit.objective == pytest.approx(EPOCH_NLL, abs=1e-3)
    assert fit.log_sigma == pytest.approx(EPOCH_LOG_SIGMA, abs=1e-3)


def test_mle_from_the_grid_fit_reaches_the_same_optimum(epoch_data):
    _close(fit_chinchilla(*epoch_data, estimator="mle").law, EPOCH_MLE, 1e-3)


@pytest.mark.slow
def test_hoffmann_grid_lbfgs_reproduces_epoch_replication(epoch_data):
    fit = fit_chinchilla(*epoch_data, optimizer="lbfgs")
    _close(fit.law, GRID_FIT, 2e-4)
    assert fit.objective == pytest.approx(GRID_OBJECTIVE, abs=5e-11)


def test_batched_optimizer_reproduces_epoch_replication(epoch_data):
    fit = fit_chinchilla(*epoch_data)  # default: top-32 grid starts, batched Levenberg-Marquardt
    _close(fit.law, GRID_FIT, 2e-4)
    assert fit.objective == pytest.approx(GRID_OBJECTIVE, abs=5e-11)


def test_analytic_gradients_pass_check_grad():
    rng = np.random.default_rng(0)
    n, d = 10 ** rng.uniform(7, 10, 50), 10 ** rng.uniform(9, 12, 50)
    logx = np.log(np.vstack([n, d]))
    logy = np.log(HOFFMANN_2022(n, d)) + rng.normal(0, 0.02, 50)
    for _ in range(3):
        theta = HOFFMANN_2022.theta() + rng.normal(0, 0.05, 5)
        f = lambda t: lse.huber_objective(t, logx, logy, 1e-3)[0]
        g = lambda t: lse.huber_objective(t, logx, logy, 1e-3)[1]
        assert check_grad(f, g, theta) < 1e-6 * max(1.0, np.linalg.norm(g(theta)))
        phi = np.append(theta, rng.normal(-3, 0.5))  # log σ where residuals straddle both Huber regimes
        f = lambda p: lse.huber_nll(p, logx, logy, 1e-3)[0]
        g = lambda p: lse.huber_nll(p, logx, logy, 1e-3)[1]
        assert check_grad(f, g, phi) < 1e-5 * max(1.0, np.linalg.norm(g(phi)))


def test_batch_objective_equals_a_naive_loop():
    rng = np.random.default_rng(1)
    n, d = 10 ** rng.uniform(7, 10, 30), 10 ** rng.uniform(9, 12, 30)
    loss = HOFFMANN_2022(n, d)
    thetas = HOFFMANN_2022.theta() + rng.normal(0, 0.3, (7, 5))
    naive = []
    for t in thetas:
        pred = np.log(np.exp(t[0] - t[3] * np.log(n)) + np.exp(t[1] - t[4] * np.log(d)) + np.exp(t[2]))
        r = pred - np.log(loss)
        naive.append(np.sum(np.where(np.abs(r) <= 1e-3, 0.5 * r**2, 1e-3 * (np.abs(r) - 0.5e-3))))
    got = lse.huber_objective_batch(thetas, np.log(np.vstack([n, d])), np.log(loss), 1e-3)
    np.testing.assert_allclose(got, naive, rtol=1e-10)


def test_frontier_matches_the_published_allocation():
    # reference/scaling-laws.md §4.1, at the Gopher/Chinchilla budget C = 6 · 70e9 · 1.4e12
    c = 6 * 70e9 * 1.4e12
    n, d, _ = EPOCH_2024.compute_optimal(c)
    assert EPOCH_2024.a == pytest.approx(0.5126, abs=5e-4)
    assert n == pytest.approx(73.1e9, rel=5e-3) and d == pytest.approx(1.34e12, rel=5e-3)
    assert d / n == pytest.approx(18.3, abs=0.1)
    n, d, _ = HOFFMANN_2022.compute_optimal(c)
    assert HOFFMANN_2022.a == pytest.approx(0.4565, abs=5e-4)
    assert n == pytest.approx(40.7e9, rel=5e-3) and d / n == pytest.approx(59, abs=1)


def test_frontier_is_the_minimum_of_the_law_along_the_isoflop():
    c = 1e21
    n_grid = np.geomspace(1e8, 1e11, 20001)
    loss = HOFFMANN_2022(n_grid, c / (6 * n_grid))  # brute force along C = 6ND
    n_opt, _, l_opt = HOFFMANN_2022.compute_optimal(c)
    assert n_opt == pytest.approx(n_grid[np.argmin(loss)], rel=1e-3)
    assert l_opt == pytest.approx(loss.min(), rel=1e-9)
    assert HOFFMANN_2022.compute_for_loss(loss.min()) == pytest.approx(c, rel=1e-6)


def test_recovers_a_known_law_from_noisy_synthetic_runs():
    rng = np.random.default_rng(3)
    n, d = np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 8))
    n, d = n.ravel(), d.ravel()
    loss = HOFFMANN_2022(n, d) * np.exp(rng.normal(0, 0.005, n.size))
    law = fit_chinchilla(n, d, loss).law
    assert law.alpha == pytest.approx(HOFFMANN_2022.alpha, abs=0.03)
    assert law.beta == pytest.approx(HOFFMANN_2022.beta, abs=0.03)
    assert abs(law.E - HOFFMANN_2022.E) < 0.05
    assert law.a == pytest.approx(HOFFMANN_2022.a, abs=0.02)


@pytest.mark.slow
def test_bootstrap_standard_errors_match_epoch(epoch_data):
    # Epoch: 4,000 case resamples (their seed); ours: 400 with another seed, so a Monte-Carlo tolerance of 25%
    fit = fit_chinchilla_ci(*epoch_data, estimator="mle", n_boot=400, seed=0, budgets=[5.88e23])
    assert fit.n_failed == 0
    for k, se in EPOCH_SE.items():
        assert fit.estimates[k].se == pytest.approx(se, rel=0.25), k
    a = fit.estimates["a"]
    assert a.lo < 0.5126 < a.hi and a.hi - a.lo < 0.12  # Epoch: sd 0.020
    assert fit.estimates["E"].lo == pytest.approx(1.769, abs=0.02)
    assert fit.estimates["E"].hi == pytest.approx(1.871, abs=0.02)


def test_cluster_bootstrap_resamples_whole_runs(epoch_data):
    n, d, loss = epoch_data
    runs = np.arange(n.size) // 4  # pretend every 4 rows are checkpoints of one run
    fit = fit_chinchilla_ci(n, d, loss, groups=runs, n_boot=20, seed=1)
    assert fit.n_groups == 60 and len(fit.boot) + fit.n_failed == 20


def test_errors_name_the_column_and_the_file(tmp_path):
    path = tmp_path / "runs.csv"
    df = pd.DataFrame({"N": [1e7, 2e7], "loss": [3.0, 2.9]})
    with pytest.raises(FitError, match=r"runs\.csv.*'D'"):
        chinchilla_columns(df, n_col="N", d_col="D", flops_col=None, loss_col="loss", source=str(path))
    with pytest.raises(FitError, match=r"--d-col or --flops-col"):
        chinchilla_columns(df, n_col="N", d_col=None, flops_col=None, loss_col="loss", source=str(path))
    df = pd.DataFrame({"N": [1e7, -2e7], "D": [1e9, 1e9], "loss": [3.0, 2.9]})
    with pytest.raises(FitError, match=r"runs\.csv: column 'N' has 1 non-positive"):
        chinchilla_columns(df, n_col="N", d_col="D", flops_col=None, loss_col="loss", source=str(path))
    with pytest.raises(NotEnoughPointsError, match="not enough points"):
        fit_chinchilla([1e7, 2e7, 3e7], [1e9, 1e9, 1e9], [3.0, 2.9, 2.8])


def test_numerical_frontier_under_flops_per_token_matches_the_closed_form():
    """analysis.chinchilla.frontier with F(N) = k·N equals compute_optimal's closed form at C·6/k, and
    compute_for_loss inverts it (the effective-compute multiplier's building blocks)."""
    from analysis.chinchilla import compute_for_loss, frontier, frontier_curve

    k = 7.5
    c = np.geomspace(1e18, 1e22, 5)
    n, d, loss = frontier(HOFFMANN_2022, lambda x: k * np.asarray(x), c, (1e7, 1e10))
    n0, d0, l0 = HOFFMANN_2022.compute_optimal(c * 6 / k)
    assert np.allclose(n, n0, rtol=1e-4) and np.allclose(d, d0, rtol=1e-4) and np.allclose(loss, l0, rtol=1e-9)
    curve = frontier_curve(HOFFMANN_2022, lambda x: k * np.asarray(x), (1e7, 1e10), (1e18, 1e22))
    want = HOFFMANN_2022.compute_for_loss(l0) * k / 6
    assert np.allclose(compute_for_loss(curve, l0), want, rtol=1e-3)
    assert np.isnan(compute_for_loss(curve, HOFFMANN_2022.E - 0.01)).all()  # below the floor: never reached
