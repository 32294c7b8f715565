"""Activation density (issue 13, UltraMemV2 §4.1): the values_per_token column, the loss-vs-density figure and
report section, the slope at fixed total parameters and its comparison with 4x sparse parameters, and the shipped
density sweep. Runs are written as real run folders (runfolder.RunDir + Final) from known laws plus small noise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.collect import DERIVED_COLUMNS, RUN_COLUMNS, collect_runs, load_collected, save_collected
from analysis.compare import density_laws, density_vs_sparse
from analysis.report import analyse, build_report, figures, report_blocks
from runfolder import EvalRow, Final, RunDir, TrainRow

REPO = Path(__file__).resolve().parents[1]
N_BOOT = 200


def _run(root: Path, run_id: str, family: str, loss: float, *, total: float = 2e6, active: float = 4e5,
         memory: dict | None = None, n_layers: int = 3, d_model: int = 96, seed: int = 0,
         sparse: float | None = None) -> None:
    """One finished run folder, as analysis/synthetic.py writes them."""
    tokens, fpt = 8e5, 6 * active
    rd = RunDir(root / run_id)
    rd.write_config({"name": run_id, "sweep": "density", "seed": seed,
                     "model": {"family": family, "n_layers": n_layers, "d_model": d_model}})
    at = {"step": 10, "tokens": tokens, "flops": fpt * tokens}
    rd.append_metrics(TrainRow(**at, loss=loss * 1.01, aux_loss=0.0, aux={}, lr=1e-3, grad_norm=1.0))
    rd.append_metrics(EvalRow(**at, val_loss=loss))
    sparse = total - active if sparse is None else sparse
    rd.write_final(Final(
        run_id=run_id, name=run_id, sweep="density", family=family, preset=None, seed=seed,
        train_loss=loss * 1.01, val_loss=loss,
        params={"total": total, "active": active, "embedding": 0, "non_embedding": total,
                "active_non_embedding": active, "sparse": sparse},
        total_params=total, active_params=active, non_embedding_params=total, flops_per_token=fpt, tokens=tokens,
        flops=fpt * tokens, steps=10, batch_size=8, seq_len=256, lr=1e-3, memory=memory, moe=None,
        tokenizer="byte", vocab_size=256, data_source="synthetic"))
    rd.update_status(state="done", step=10, total_steps=10)


def _memory(heads: int, top_m: int, layers: int, num_values: int = 4096) -> dict:
    return {"num_values": num_values, "top_m": top_m, "heads": heads, "value_expansion": 1, "num_layers": layers,
            "value_params": num_values * 48}


# truth: L = c0 + b·ln v at fixed total parameters (b < 0), L = c0 + b_s·ln P_sparse at fixed v
TRUTH = {"ultramem": (3.0, -0.040, 2, 1), "ultramem_v2": (3.1, -0.025, 1, 3)}  # c0, b, heads, memory layers
SPARSE_SLOPE = -0.015
NOISE = 0.001


def _density_sweep(root: Path, top_ms: tuple[int, ...], seeds: int = 3, rng_seed: int = 0) -> None:
    rng = np.random.default_rng(rng_seed)
    for fam, (c0, b, heads, layers) in TRUTH.items():
        for m in top_ms:
            for s in range(seeds):
                v = heads * m * layers
                loss = (c0 + b * math.log(v)) * math.exp(NOISE * rng.standard_normal())
                _run(root, f"{fam}-m{m}-s{s}", fam, loss, total=4e5 + 48 * 4096, memory=_memory(heads, m, layers),
                     seed=s, n_layers=layers)  # sparse params 48 x 4096, as _sparse_sweep's second size


def _sparse_sweep(root: Path, seeds: int = 3, rng_seed: int = 1) -> None:
    """UltraMem at the density sweep's backbone and one density (top-m 16): 4 memory sizes (total parameters)."""
    rng = np.random.default_rng(rng_seed)
    c0, b, heads, layers = TRUTH["ultramem"]
    v = heads * 16 * layers
    for j, n in enumerate((1024, 4096, 16384, 65536)):
        sparse = 48.0 * n
        base = c0 + b * math.log(v) - SPARSE_SLOPE * math.log(48 * 4096)  # meets the density sweep at 4096 values
        for s in range(seeds):
            loss = (base + SPARSE_SLOPE * math.log(sparse)) * math.exp(NOISE * rng.standard_normal())
            _run(root, f"ultramem-mem{j}-s{s}", "ultramem", loss, total=4e5 + sparse, sparse=sparse,
                 memory=_memory(heads, 16, layers, n), seed=s, n_layers=layers)


# ---- the column -------------------------------------------------------------------------------------------------


def test_values_per_token_is_heads_times_top_m_times_memory_layers(tmp_path):
    _run(tmp_path, "um", "ultramem", 2.5, memory=_memory(2, 16, 1))
    _run(tmp_path, "v2", "ultramem_v2", 2.5, memory={**_memory(1, 32, 3), "keys_per_side": 131, "share_ratio": 0.5})
    _run(tmp_path, "mp", "memory_plus", 2.5, memory={**_memory(8, 34, 1), "replace_ffn": True})
    _run(tmp_path, "dense", "dense", 2.9, total=4e5)
    runs = collect_runs(tmp_path, cache=False).runs.set_index("run_id")
    assert "values_per_token" in RUN_COLUMNS and "values_per_token" in DERIVED_COLUMNS
    assert runs.loc["um", "values_per_token"] == 32
    assert runs.loc["v2", "values_per_token"] == 96
    assert runs.loc["mp", "values_per_token"] == 272
    assert math.isnan(runs.loc["dense", "values_per_token"])


def test_values_per_token_is_derived_on_load_and_not_saved(tmp_path):
    _run(tmp_path / "runs", "um", "ultramem", 2.5, memory=_memory(2, 8, 2))
    _run(tmp_path / "runs", "dense", "dense", 2.9, total=4e5)
    c = collect_runs(tmp_path / "runs")
    save_collected(c, tmp_path / "out")
    header = (tmp_path / "out" / "runs.csv").read_text().splitlines()[0].split(",")
    assert header == [col for col in RUN_COLUMNS if col not in DERIVED_COLUMNS]  # the saved format is unchanged
    back = load_collected(tmp_path / "out" / "runs.csv").runs.set_index("run_id")
    assert back.loc["um", "values_per_token"] == 32 and math.isnan(back.loc["dense", "values_per_token"])
    cached = collect_runs(tmp_path / "runs").runs.set_index("run_id")  # from the parquet cache
    assert cached.loc["um", "values_per_token"] == 32
    # a committed study table, written before the column existed
    study = load_collected(REPO / "docs" / "results" / "study_shakespeare" / "runs.csv").runs
    um = study[study["family"] == "ultramem"]
    assert set(um["values_per_token"]) == {32.0, 64.0}  # 2 heads x top-16 x (1 or 2 memory layers)
    assert study.loc[study["family"] == "dense", "values_per_token"].isna().all()


# ---- the figure and the report section ---------------------------------------------------------------------------


def test_no_density_figure_with_one_density_per_total(tmp_path):
    """Several densities, but never two at one total parameter count (a size ladder): no density axis."""
    for i, (m, layers) in enumerate(((16, 1), (16, 1), (16, 2))):
        _run(tmp_path, f"um{i}", "ultramem", 2.5 - 0.1 * i, total=1e6 * (i + 1), memory=_memory(2, m, layers))
    a = analyse(collect_runs(tmp_path, cache=False), n_boot=N_BOOT)
    assert a.collected.runs["values_per_token"].nunique() == 2
    assert a.density == [] and "loss_vs_values_per_token" not in figures(a)
    assert not any("Activation density" in str(b) for b in report_blocks(a, "t", list(figures(a))))


def test_density_figure_with_two_densities_says_slope_not_identified(tmp_path):
    _density_sweep(tmp_path, top_ms=(8, 16), seeds=1)
    a = analyse(collect_runs(tmp_path, cache=False), n_boot=N_BOOT)
    assert [law.family for law in a.density] == ["ultramem", "ultramem_v2"]
    assert all(law.fit is None and "needs >= 3 densities" in law.reason for law in a.density)
    assert "loss_vs_values_per_token" in figures(a)
    text = str(report_blocks(a, "t", list(figures(a))))
    assert "not identified: needs >= 3 densities" in text


def test_report_draws_density_figure_and_section_reproducibly(tmp_path):
    _density_sweep(tmp_path / "runs", top_ms=(4, 8, 16, 32))
    out = tmp_path / "report"
    md = build_report(tmp_path / "runs", out, n_boot=N_BOOT).read_text()
    for ext in ("png", "svg"):
        assert (out / "figures" / f"loss_vs_values_per_token.{ext}").exists()
    assert "## Activation density: loss vs memory values read per token" in md
    assert "figures/loss_vs_values_per_token.png" in md
    assert "Activation density" in (out / "report.html").read_text()
    fits = json.loads((out / "fits.json").read_text())
    assert [d["family"] for d in fits["density"]["laws"]] == ["ultramem", "ultramem_v2"]
    assert "not answered by these runs" in md and "model.memory.num_keys" in md  # no sparse axis: which runs
    first = {p.name: p.read_bytes() for p in (out / "figures").iterdir()}
    build_report(out / "runs.csv", n_boot=N_BOOT)  # from the saved table: identical figures
    assert {p.name: p.read_bytes() for p in (out / "figures").iterdir()} == first


# ---- the slope and the V2 comparison -----------------------------------------------------------------------------


def test_slope_of_a_known_log_linear_law_lies_in_its_interval(tmp_path):
    _density_sweep(tmp_path, top_ms=(4, 8, 16, 32), rng_seed=1)
    runs = collect_runs(tmp_path, cache=False).runs
    laws = {law.family: law for law in density_laws(runs, n_boot=N_BOOT)}
    for fam, (_, b, heads, layers) in TRUTH.items():
        law = laws[fam]
        assert law.densities == [heads * m * layers for m in (4, 8, 16, 32)] and law.n_runs == 12
        s = law.slope
        assert s.has_ci and s.reliable and s.lo <= b <= s.hi, (fam, s, b)
        assert s.hi < 0  # loss falls with density: detected at this noise
        assert abs(s.value - b) < 0.005


def _table(seed: int) -> pd.DataFrame:
    """The density sweep's runs table without run folders (for many draws)."""
    rng, rows = np.random.default_rng(seed), []
    for fam, (c0, b, heads, layers) in TRUTH.items():
        for m in (4, 8, 16, 32):
            for s in range(3):
                v = heads * m * layers
                rows.append({"run_id": f"{fam}-m{m}-s{s}", "family": fam, "state": "done", "total_params": 2e6,
                             "backbone": "L3-d96", "values_per_token": float(v),
                             "val_loss": (c0 + b * math.log(v)) * math.exp(NOISE * rng.standard_normal())})
    return pd.DataFrame(rows)


def test_slope_interval_coverage_over_many_draws():
    """The 95% percentile interval from 12 runs at 4 densities covers the true slope in ~88% of draws (a
    bootstrap over few runs is narrow); far less would mean a wrong slope or interval."""
    hits = [law.slope.lo <= TRUTH[law.family][1] <= law.slope.hi
            for seed in range(100) for law in density_laws(_table(seed), n_boot=N_BOOT)]
    assert len(hits) == 200 and np.mean(hits) >= 0.8


def test_density_vs_sparse_parameters_when_both_axes_are_in_the_runs(tmp_path):
    _density_sweep(tmp_path, top_ms=(4, 8, 16, 32))
    _sparse_sweep(tmp_path)
    runs = collect_runs(tmp_path, cache=False).runs
    laws = density_laws(runs, n_boot=N_BOOT)
    assert [law.family for law in laws] == ["ultramem", "ultramem_v2"]  # the memory-size runs are not a density axis
    table = density_vs_sparse(runs, laws, n_boot=N_BOOT).set_index("family")
    um = table.loc["ultramem"]
    assert um["verdict"].startswith("4× density lowers the loss more")  # |b| = 0.04 > |b_s| = 0.015 per ln
    lo, hi = (float(x) for x in um["difference"].split("[")[1].rstrip("]").split(","))
    truth = (TRUTH["ultramem"][1] - SPARSE_SLOPE) * math.log(4)
    assert lo <= truth <= hi
    assert table.loc["ultramem_v2", "verdict"].startswith("not answered by these runs")
    assert "model.memory_v2.num_keys" in table.loc["ultramem_v2", "verdict"]


# ---- the shipped sweep ------------------------------------------------------------------------------------------


def test_density_sweep_plans_at_fixed_total_params_across_densities(monkeypatch):
    from analysis.collect import values_per_token
    from experiments.sweep import plan_sweep
    from ultramem.config import ModelConfig
    from ultramem.families import block_summary

    monkeypatch.chdir(REPO)
    runs = plan_sweep(REPO / "sweeps" / "density_tiny.yaml").runs
    by_family: dict[str, list] = {}
    for r in runs:
        model = {k: v for k, v in r.config["model"].items() if k != "preset"}  # resolved: the preset's fields
        mem = block_summary(ModelConfig.from_dict(model), {"sparse": 0}, "memory")
        by_family.setdefault(r.family, []).append((r.total_params, values_per_token(mem["heads"], mem["top_m"],
                                                                                     mem["num_layers"]), r.config["seed"]))
    assert set(by_family) == {"ultramem", "memory_plus", "ultramem_v2"}
    for fam, rows in by_family.items():
        assert len({t for t, _, _ in rows}) == 1, fam  # fixed total parameters
        assert len({v for _, v, _ in rows}) >= 4, fam  # >= 4 densities
        assert {s for _, _, s in rows} == {0, 1, 2}, fam
    assert pd.Series([v for _, v, _ in by_family["ultramem"]]).max() == 64


@pytest.mark.parametrize("study", ["study_shakespeare", "study_knowledge", "study_memory"])
def test_committed_studies_have_no_density_axis(study):
    """Their reports (docs/results) stay byte-identical: no density figure, section or fits.json key."""
    runs = load_collected(REPO / "docs" / "results" / study / "runs.csv").runs
    assert density_laws(runs, n_boot=0) == []
