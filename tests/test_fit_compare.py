"""Family comparison against closed forms and synthetic studies drawn from known laws."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.collect import collect_runs
from analysis.compare import (
    compute_multiplier,
    exponent_differences,
    fit_families,
    fit_family,
    knowledge_table,
    loss_gap,
    memory_laws,
)
from analysis.fit import PowerLaw
from analysis.synthetic import SyntheticTruth, write_synthetic_ladder, write_synthetic_memory_sweep


def _runs(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["state"] = "done"
    df["run_id"] = [f"{r['family']}-{i}" for i, r in enumerate(rows)]
    return df


def test_multiplier_equals_the_closed_form_on_an_exact_dense_law():
    dense = PowerLaw(E=1.7, A=80.0, alpha=0.15)
    cs = np.geomspace(1e12, 1e16, 6)
    rows = [{"family": "dense", "flops": c, "val_loss": float(dense(c))} for c in cs]
    # a sparse run reaching the loss dense models reach with 3x (and 0.5x) its compute
    rows += [{"family": "ultramem", "flops": 1e14, "val_loss": float(dense(3e14))},
             {"family": "moe", "flops": 1e14, "val_loss": float(dense(0.5e14))},
             {"family": "moe", "flops": 1e15, "val_loss": 1.6}]  # below the dense floor E
    runs = _runs(rows)
    fits = fit_families(runs, "flops", n_boot=50)
    assert fits["dense"].fit.law.alpha == pytest.approx(0.15, rel=1e-5)
    pts = compute_multiplier(runs, fits["dense"]).points.set_index("family")
    assert pts.loc["ultramem", "multiplier"] == pytest.approx(3.0, rel=1e-4)
    moe = pts.loc["moe"].sort_values("flops")
    assert moe["multiplier"].iloc[0] == pytest.approx(0.5, rel=1e-4)
    assert math.isnan(moe["multiplier"].iloc[1]) and "floor" in moe["note"].iloc[1]


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    truth = write_synthetic_ladder(root, sizes=5, seed=0)
    return collect_runs(root, cache=False).runs, truth


def test_recovers_the_multipliers_of_a_synthetic_study(ladder):
    runs, truth = ladder
    fits = fit_families(runs, "flops", n_boot=300)
    assert all(ff.floor for ff in fits.values())  # five sizes: a floor is fitted
    summary = compute_multiplier(runs, fits["dense"]).summary.set_index("family")
    for fam, m in truth.multipliers.items():
        row = summary.loc[fam]
        assert row["lo"] <= m <= row["hi"], fam
        assert row["multiplier"] == pytest.approx(m, rel=0.15), fam
    # the law's exponent is the truth's: every family is the dense law shifted in compute
    for fam, ff in fits.items():
        est = ff.fit.estimates["alpha"]
        assert est.lo <= truth.dense.alpha <= est.hi, fam
    diffs = exponent_differences(fits)
    assert len(diffs) == 2 and (diffs["lo"] <= 0).all() and (diffs["hi"] >= 0).all()
    at, gap = loss_gap(fits, "ultramem", "moe")
    assert gap.hi < 0  # 2.5x beats 1.8x: UltraMem reaches lower loss at equal compute


def test_few_sizes_degrade_to_a_pure_law_then_to_a_reason(ladder):
    runs, _ = ladder
    three = runs[runs["run_id"].isin(["dense-0", "dense-2", "dense-4"])]
    ff = fit_family(three, "dense", "flops", n_boot=100)
    assert ff.fit is not None and ff.fit.law.E == 0 and "pure power law" in ff.fit.note
    e = ff.fit.estimates["alpha"]
    assert e.has_ci and e.hi > e.lo  # a 3-run bootstrap still gives an interval, not a point
    two = runs[runs["run_id"].isin(["dense-0", "dense-4"]) | (runs["family"] == "ultramem")]
    ff = fit_family(two, "dense", "flops")
    assert ff.fit is None and ff.reason.startswith("not enough points: 2 distinct flops")
    mult = compute_multiplier(two, ff)
    assert mult.points.empty and list(mult.summary["family"]) == ["ultramem"]
    assert "no dense law: not enough points" in mult.summary["note"].iloc[0]


def test_exponents_of_laws_of_different_form_are_not_compared(ladder):
    runs, _ = ladder
    sub = runs[~runs["run_id"].isin(["moe-1", "moe-3"])]  # moe keeps 3 sizes: no floor
    diffs = exponent_differences(fit_families(sub, "flops", n_boot=50)).set_index("family")
    assert "not comparable" in diffs.loc["moe", "note"] and math.isnan(diffs.loc["moe", "diff"])


def test_memory_law_recovers_the_log_linear_slope(tmp_path):
    truth = write_synthetic_memory_sweep(tmp_path, sizes=5, seed=1, truth=SyntheticTruth(noise=0.002))
    runs = collect_runs(tmp_path, cache=False).runs
    (law,) = memory_laws(runs, n_boot=300)
    k = law.log_linear.estimates["k"]
    assert law.backbone == "L2-d64 top-m 16" and law.n_runs == 5
    assert k.lo <= truth.memory_k <= k.hi and k.value == pytest.approx(truth.memory_k, rel=0.1)
    assert law.power is not None and law.power.law.alpha > 0
    (few,) = memory_laws(runs[runs["memory_slots"] <= 4096], n_boot=50)
    assert few.log_linear is None and few.reason.startswith("not enough points: 2 memory size")


def test_knowledge_table_counts_recalled_facts(ladder):
    runs, _ = ladder
    table = knowledge_table(runs)
    assert len(table) == len(runs)
    np.testing.assert_allclose(table["facts_recalled"], table["knowledge_recall"] * table["knowledge_facts"])


def test_a_memory_sweep_in_the_same_directory_stays_out_of_the_family_law(tmp_path):
    write_synthetic_ladder(tmp_path, sizes=4, seed=0)
    alone = fit_family(collect_runs(tmp_path, cache=False).runs, "ultramem", "flops", n_boot=0)
    write_synthetic_memory_sweep(tmp_path, sizes=4, seed=0)  # 4 more UltraMem runs on the smallest backbone
    runs = collect_runs(tmp_path, cache=False).runs
    mixed = fit_family(runs, "ultramem", "flops", n_boot=0)
    assert mixed.set_aside == 4 and mixed.n_runs == 4
    assert mixed.fit.law == alone.fit.law
    assert len(memory_laws(runs, n_boot=0)[0].run_ids) == 5  # the ladder's run joins its backbone's memory law


def test_seeds_of_one_configuration_do_not_narrow_the_intervals(ladder):
    # Ten seeds that land on the same loss are one configuration, not ten points: the bootstrap draws configurations
    # whole, so the intervals equal those of the single-seed ladder (a run-level bootstrap would shrink them ~3x).
    runs, _ = ladder
    one = runs[runs["family"] == "dense"]
    ten = pd.concat([one.assign(run_id=one["run_id"] + f"-s{s}", seed=s) for s in range(10)], ignore_index=True)
    a = fit_family(one, "dense", "flops", n_boot=200).fit.estimates["alpha"]
    b = fit_family(ten, "dense", "flops", n_boot=200).fit.estimates["alpha"]
    assert b.value == pytest.approx(a.value, rel=1e-6)
    assert (b.lo, b.hi) == (pytest.approx(a.lo, rel=1e-4), pytest.approx(a.hi, rel=1e-4))
