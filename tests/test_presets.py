"""Presets: the paper's Table 1 within 3%, the tiny ladder's matching rules, hand counts, overrides, the CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from ultramem.accounting import count_params, flops_per_token
from ultramem.config import ConfigError
from ultramem.presets import PAPER_TABLE1, PRESETS, get_preset, preset_source, table1_comparison

PAPER_SIZES = ("151m", "680m", "1.6b")
TINY_SIZES = ("t1", "t2", "t3", "t4", "t5", "t6")


def test_paper_presets_reproduce_table1_within_3_percent():
    rows = table1_comparison(tolerance=0.03)
    assert {r["preset"] for r in rows} == set(PAPER_TABLE1)
    for r in rows:
        print(f"{r['preset']:18s} params {r['params_b']:7.3f}B (paper {r['paper_params_b']})  "
              f"GFLOPs {r['gflops']:6.3f} (paper {r['paper_gflops']})")
        assert abs(r["params_b"] / r["paper_params_b"] - 1) <= 0.03, r
        assert abs(r["gflops"] / r["paper_gflops"] - 1) <= 0.03, r


@pytest.mark.slow
def test_paper_presets_build_on_meta_with_the_counted_params():
    from ultramem import build_model

    for size in PAPER_SIZES:
        for name in (f"dense-{size}", f"ultramem-{size}-x12", f"pkm-{size}-x12",
                     next(n for n in PRESETS if n.startswith(f"moe-{size}-"))):
            cfg = get_preset(name)
            model = build_model(cfg, device="meta")
            assert all(p.is_meta for p in model.parameters()), name
            assert sum(p.numel() for p in model.parameters()) == count_params(cfg).total, name


def test_paper_presets_follow_the_paper_recipe():
    for size in PAPER_SIZES:
        mem = get_preset(f"ultramem-{size}-x12").memory
        assert (mem.value_expansion, mem.tucker_rank, mem.num_cores, mem.heads, mem.query_share) == (4, 2, 2, 2, 2)
        assert mem.score == "none" and mem.qk_norm and mem.value_proj and mem.layers != "every"
        assert mem.value_dim * 2 == get_preset(f"dense-{size}").d_model
        ratio = count_params(get_preset(f"ultramem-{size}-x12")).total / count_params(get_preset(f"dense-{size}")).total
        assert 9 < ratio < 14  # "x12": about 12x the dense parameters
    assert get_preset("moe-151m-2in32").moe.num_experts == 32 and get_preset("moe-151m-2in32").moe.top_k == 2


def family_presets(family: str, size: str) -> str:
    return next(n for n in PRESETS if n.startswith(f"{family}-{size}-") or n == f"{family}-{size}")


def test_tiny_ladder_sizes_and_matching_rules():
    dense_sizes = []
    for size in TINY_SIZES:
        dense, um, moe, pkm = (count_params(get_preset(family_presets(f, size)))
                               for f in ("dense", "ultramem", "moe", "pkm"))
        dense_sizes.append(dense.non_embedding)
        assert um.non_embedding == pytest.approx(6 * dense.non_embedding, rel=0.03)
        assert moe.non_embedding == pytest.approx(um.non_embedding, rel=0.05)  # integer expert count
        assert pkm.non_embedding == pytest.approx(um.non_embedding, rel=0.01)
        assert moe.active_non_embedding == pytest.approx(um.active_non_embedding, rel=0.02)
        fl = {f: flops_per_token(get_preset(family_presets(f, size))) for f in ("dense", "ultramem", "moe", "pkm")}
        for f in ("ultramem", "moe", "pkm"):
            assert 1.0 <= fl[f] / fl["dense"] <= 1.3, (size, f, fl)
        assert get_preset(family_presets("moe", size)).moe.top_k == 2
        assert get_preset(family_presets("dense", size)).vocab_size == 256
    assert dense_sizes == sorted(dense_sizes)
    assert dense_sizes[0] >= 0.08e6 and dense_sizes[-1] <= 5e6


def test_study_ladder_grows_in_small_steps_with_matched_families():
    """The study ladder (docs/results/study_isoflop): UltraMem at 6x dense's non-embedding params, MoE at UltraMem's
    total and activated params, active params growing 1.2-2.1x per rung in every family."""
    sizes = [f"s{i}" for i in range(1, 11)]
    active: dict[str, list[int]] = {"dense": [], "moe": [], "ultramem": []}
    for size in sizes:
        dense, um, moe = (count_params(get_preset(family_presets(f, size))) for f in ("dense", "ultramem", "moe"))
        assert um.non_embedding == pytest.approx(6 * dense.non_embedding, rel=0.03)
        assert moe.non_embedding == pytest.approx(um.non_embedding, rel=0.05)
        assert moe.active_non_embedding == pytest.approx(um.active_non_embedding, rel=0.03)
        for f, pc in (("dense", dense), ("moe", moe), ("ultramem", um)):
            active[f].append(pc.active)
            assert preset_source(family_presets(f, size)) == "ours (study ladder)"
    for f, n in active.items():
        steps = [b / a for a, b in zip(n, n[1:], strict=False)]
        assert all(1.2 <= s <= 2.1 for s in steps), (f, steps)


def test_tiny_names_are_small_and_every_family_has_one():
    for family in ("dense", "moe", "pkm", "ultramem"):
        cfg = get_preset(f"{family}-tiny")
        assert cfg.family == family
        assert count_params(cfg).total <= 5e6


def test_hand_count_of_small_presets():
    # dense-t1: d=64, L=2, vocab 256 tied. Embedding 256*64 = 16384; per block 12*64^2 + 2*64 = 49280; final norm 64
    assert count_params(get_preset("dense-t1")).total == 16384 + 2 * 49280 + 64
    # ultramem-t1-x6: one memory layer (0:1), num_keys 121 -> n' 242, key_dim 8, value_dim 32, H 2 sharing one query:
    # query 64*2*8 = 1024, q/k norms 16, keys 2*2*242*8*2 = 15488, cores 2*2*2*2 = 16,
    # values 121^2 * 32 = 468512, value projection 4*32*64 = 8192
    cfg = get_preset("ultramem-t1-x6")
    assert (cfg.memory.num_keys, cfg.memory.key_dim, cfg.memory.value_dim, cfg.memory.layers) == (121, 8, 32, "0:1")
    assert count_params(cfg).total == 16384 + 2 * 49280 + 64 + 1024 + 16 + 15488 + 16 + 468512 + 8192
    # moe-t1: experts of width h: per block attention 4*64^2 + norms 128 + router 64*E + E*2*64*h
    moe = get_preset(next(n for n in PRESETS if n.startswith("moe-t1-")))
    E, h = moe.moe.num_experts, moe.moe.expert_hidden
    assert count_params(moe).total == 16384 + 2 * (16384 + 128 + 64 * E + E * 2 * 64 * h) + 64


def test_overrides_are_field_by_field_and_copies_are_independent():
    cfg = get_preset("ultramem-tiny", {"memory.top_m": 8, "dropout": 0.1})
    assert cfg.memory.top_m == 8 and cfg.dropout == 0.1
    assert cfg.memory.num_keys == get_preset("ultramem-tiny").memory.num_keys
    cfg.memory.top_m = 3
    assert get_preset("ultramem-tiny").memory.top_m == 16
    with pytest.raises(ConfigError, match="model.memory: unknown key"):
        get_preset("ultramem-tiny", {"memory.topm": 8})
    with pytest.raises(ConfigError, match="unknown preset 'dense-huge'"):
        get_preset("dense-huge")
    with pytest.raises(ConfigError, match="model.memory.tucker_rank"):
        get_preset("pkm-tiny", {"memory.tucker_rank": 2})
    with pytest.raises(ConfigError, match="model.memory.layers"):
        get_preset("ultramem-tiny", {"memory.layers": "2:1"})


def test_planning_modules_do_not_import_torch():
    code = ("import sys, ultramem, ultramem.presets, ultramem.accounting, cli.models as m; "
            "m.preset_rows(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_models_command_lists_every_preset_as_json(capsys):
    from cli import models

    parser = argparse.ArgumentParser()
    models.add_arguments(parser)
    assert models.run(parser.parse_args(["--format", "json"])) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(PRESETS)
    row = next(r for r in rows if r["name"] == "dense-t1")
    assert row["total_params"] == 16384 + 2 * 49280 + 64 and row["family"] == "dense"
    assert set(row) >= {"family", "total_params", "active_params", "non_embedding_params", "flops_per_token"}
    assert models.run(parser.parse_args(["--table1"])) == 0
    assert "ultramem-1.6b-x12" in capsys.readouterr().out


def test_skip_layer_spec_parsing():
    from ultramem.memory.placement import parse_layers

    assert parse_layers("every", 3) == [(0, 0), (1, 1), (2, 2)]
    assert parse_layers("2:5/6:9/10:13/14:17", 20) == [(2, 5), (6, 9), (10, 13), (14, 17)]  # official v1 227M
    for bad in ("2:5/6", "5:2", "0:20", "a:b", "1:2/1:2"):
        with pytest.raises(ConfigError, match="model.memory.layers"):
            parse_layers(bad, 20)
