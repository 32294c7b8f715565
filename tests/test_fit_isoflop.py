"""IsoFLOP (Approach 2) against Porian et al.'s published compute-optimal exponents."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.checks import NotEnoughPointsError
from analysis.chinchilla import HOFFMANN_2022
from analysis.isoflop import fit_frontier, frontier_exponent_ci, isoflop_optima


@pytest.fixture(scope="module")
def porian(scaling_data):
    curves = pd.read_csv(scaling_data / "porian2024_isoflop_curves.csv")
    published = pd.read_csv(scaling_data / "porian2024_published_fits.csv")
    return curves, published


def test_parabola_exponents_are_within_004_of_porian(porian):
    curves, published = porian
    for _, row in published.iterrows():
        optima = isoflop_optima(curves[curves["config_id"] == row["config_id"]])
        a = fit_frontier(optima)["n"].a
        assert a == pytest.approx(row["n_exponent_basic"], abs=0.04), row["config_id"]


def test_reference_table_rows(porian):
    # reference/scaling-laws.md §4.2: parabola a for the Kaplan-like and the tuned configs
    curves, _ = porian
    for config, want in (("summary_df:0", 0.864), ("summary_df:4", 0.501)):
        a = fit_frontier(isoflop_optima(curves[curves["config_id"] == config]))["n"].a
        assert a == pytest.approx(want, abs=5e-4)


def test_recovers_the_closed_form_frontier_of_a_known_law():
    rows = []
    for c in np.geomspace(1e18, 1e21, 7):
        n_opt = HOFFMANN_2022.compute_optimal(c)[0]
        for n in n_opt * np.geomspace(0.5, 2.0, 7):
            rows.append({"flops": c, "n": n, "loss": float(HOFFMANN_2022(n, c / (6 * n)))})
    optima = isoflop_optima(pd.DataFrame(rows), k_nearest=7)
    assert optima["valid"].all()
    frontier = fit_frontier(optima)
    assert frontier["n"].a == pytest.approx(HOFFMANN_2022.a, abs=0.01)
    assert frontier["n"].a + frontier["d"].a == pytest.approx(1.0, abs=1e-12)  # D* = C/(6N*)
    ci = frontier_exponent_ci(optima, n_boot=200)
    assert ci.lo <= frontier["n"].a <= ci.hi


def test_vertex_outside_the_sampled_sizes_is_rejected():
    n = np.geomspace(1e7, 1e8, 5)
    df = pd.DataFrame({"flops": 1e19, "n": n, "loss": 3.0 - 0.1 * np.log(n / 1e7)})  # still falling at the edge
    optima = isoflop_optima(df)
    assert not optima["valid"].iloc[0] and optima["why"].iloc[0]
    with pytest.raises(NotEnoughPointsError, match="valid IsoFLOP budgets"):
        fit_frontier(optima)
