"""The family registry (ultramem/families): order, presets, counts against built modules, and a family added by a
test alone — adding a family is one module, no edit to the library (docs/families.md)."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest
import torch

from analysis.compare import families as present_families
from analysis.compare import sparse_family_names
from analysis.plots import color, family_label, marker
from ultramem import build_model
from ultramem.accounting import count_params, decode_bytes, flops_per_token
from ultramem.config import BLOCKS, ConfigError, ModelConfig
from ultramem.families import (
    Family,
    FFNParams,
    PlotStyle,
    families,
    family_names,
    get_family,
    register,
    unregister,
)
from ultramem.layout import ParallelLayout, check_layout, train_memory
from ultramem.mlp import MLP
from ultramem.presets import PRESETS, get_preset

BUILT_IN = ("dense", "moe", "pkm", "ultramem")


def sparse_numel(model) -> int:
    """Parameters tokens select from: value (and pre-value) tables and routed experts (as tests/test_accounting.py)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if name.endswith((".values", ".pre_values", "ffn.w_in", "ffn.w_out")))


def test_registry_lists_the_four_families_in_order():
    assert family_names()[:4] == BUILT_IN
    assert [f.name for f in families()] == list(family_names())
    assert all(get_family(name).name == name for name in BUILT_IN)
    with pytest.raises(ConfigError, match=r"model.family: invalid value 'dense2'; allowed: dense \| moe \| pkm"):
        get_family("dense2")


def test_blocks_styles_and_capabilities_of_the_built_in_families():
    assert {f.name: f.block for f in families() if f.name in BUILT_IN} == {
        "dense": None, "moe": "moe", "pkm": "memory", "ultramem": "memory"}
    assert all(f.block is None or f.block in BLOCKS for f in families())
    # the committed figures use these colours and markers (docs/results must regenerate byte for byte)
    assert {n: (get_family(n).style.color, get_family(n).style.marker, get_family(n).style.label) for n in BUILT_IN} == {
        "dense": ("#3b6ea8", "o", "dense"), "moe": ("#d9822b", "s", "moe"),
        "pkm": ("#8064a2", "D", "pkm"), "ultramem": ("#3a9a5b", "^", "ultramem")}
    assert [n for n in BUILT_IN if get_family(n).sparse] == ["moe", "pkm", "ultramem"]
    assert [n for n in BUILT_IN if get_family(n).parallel.expert_module] == ["moe"]
    assert [n for n in BUILT_IN if get_family(n).parallel.memory_parallel] == ["ultramem"]


def test_every_preset_family_is_registered():
    used = {cfg.family for cfg in PRESETS.values()}
    assert set(BUILT_IN) <= used <= set(family_names())
    for cfg in PRESETS.values():
        assert get_family(cfg.family).block in (None, *BLOCKS)


@pytest.mark.parametrize("family", family_names())  # every registered family: its "<family>-tiny" preset
def test_tiny_preset_builds_with_the_counted_parameters(family):
    cfg = get_preset(f"{family}-tiny")
    model = build_model(cfg, device="meta")
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.embedding == model.wte.weight.numel()
    assert pc.sparse == sparse_numel(model)
    if get_family(family).parallel.expert_module is None:
        assert model.expert_load() is None


def test_registering_an_inconsistent_family_is_refused():
    base = get_family("dense")
    with pytest.raises(ValueError, match="already registered"):
        register(base)
    with pytest.raises(ValueError, match="no '-'"):
        register(Family(name="dense-2", title="x", block=None, style=base.style, build_ffn=base.build_ffn,
                        ffn_params=base.ffn_params, ffn_activations=base.ffn_activations))
    with pytest.raises(ValueError, match="go together"):
        register(Family(name="half_memory", title="x", block="memory", style=base.style, build_ffn=base.build_ffn,
                        ffn_params=base.ffn_params, ffn_activations=base.ffn_activations,
                        build_memory=get_family("pkm").build_memory))
    assert "dense-2" not in family_names() and "half_memory" not in family_names()


# ---- a fifth family, defined here only ---------------------------------------------------------------------------

WIDE = 3  # the toy family's MLP is WIDE x the dense model's ffn_inner


def _build_wide_mlp(cfg: ModelConfig, layer: int) -> torch.nn.Module:
    return MLP(cfg.d_model, WIDE * cfg.ffn_inner, cfg.init_std, cfg.n_layers, cfg.dropout)


WIDE_FAMILY = Family(
    name="wide_test",
    title="Wide (test)",
    block=None,
    style=PlotStyle(label="wide", color="#000000", marker="x"),
    build_ffn=_build_wide_mlp,
    ffn_params=lambda cfg: FFNParams(dense=2 * cfg.d_model * WIDE * cfg.ffn_inner),
    ffn_activations=lambda cfg: 3 * cfg.d_model + 4 * WIDE * cfg.ffn_inner,
)


@pytest.fixture
def wide_family():
    register(WIDE_FAMILY)
    try:
        yield WIDE_FAMILY
    finally:
        unregister(WIDE_FAMILY.name)


def test_a_family_registered_outside_the_library_builds_counts_and_trains(wide_family):
    assert family_names()[:4] == BUILT_IN and family_names()[-1] == "wide_test"
    cfg = ModelConfig.from_dict({"family": "wide_test", "vocab_size": 61, "seq_len": 32, "n_layers": 2,
                                 "d_model": 32, "n_heads": 2, "ffn_hidden": 48})
    dense = cfg.override({"family": "dense"})
    model = build_model(cfg)
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.total - count_params(dense).total == 2 * 2 * 32 * (WIDE - 1) * 48  # 2 layers x 2 matrices
    assert pc.sparse == 0 and pc.active == pc.total
    assert flops_per_token(cfg) == 2 * pc.active_non_embedding + 2 * 61 * 32
    assert decode_bytes(cfg, 4, 16).experts_touched is None
    check_layout(cfg, ParallelLayout(2, fsdp=True))
    assert train_memory(cfg, ParallelLayout(2), 2, 16).total > train_memory(dense, ParallelLayout(2), 2, 16).total
    with pytest.raises(ConfigError, match="needs model.family 'moe'"):
        check_layout(cfg, ParallelLayout(2, expert_parallel=2))
    with pytest.raises(ConfigError, match="a moe block exactly when family is 'moe'"):
        cfg.override({"moe": {"num_experts": 2}})
    assert model.expert_load() is None

    torch.manual_seed(0)
    groups = [{k: v for k, v in g.items() if k != "lr_mult_fn"} for g in model.param_groups(0.1)]
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    idx = torch.randint(0, 61, (2, 16))
    before = [p.detach().clone() for p in model.parameters()]
    out = model(idx, idx.roll(-1, 1))
    (out.loss + out.aux_loss).backward()
    opt.step()
    model.on_optimizer_step()
    assert math.isfinite(out.loss.item())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))

    assert (color("wide_test"), marker("wide_test"), family_label("wide_test")) == ("#000000", "x", "wide")
    assert "wide_test" not in sparse_family_names()
    assert present_families(pd.DataFrame({"family": ["wide_test", "zeta", "ultramem", "dense"]})) == [
        "dense", "ultramem", "wide_test", "zeta"]


def test_an_unregistered_family_is_a_config_error(wide_family):
    unregister(wide_family.name)
    try:
        with pytest.raises(ConfigError, match="model.family: invalid value 'wide_test'"):
            ModelConfig(family="wide_test").validate()
    finally:
        register(wide_family)


def test_registry_and_layout_model_import_no_torch():
    code = ("import sys, ultramem.families, ultramem.layout, ultramem.accounting, ultramem.presets; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
