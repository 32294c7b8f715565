"""The ultramem_v2 family in the model, the presets, the optimizer, the layouts and the trainer: a layer in every
block beside the FFN, one global value / pre-value table shared by all layers, the value-LR multiplier on both
tables, the tiny ladder at the MoE/UltraMem parameters and the authors' 227M configuration.
(The layer itself against a naive reference: tests/test_ultramem_v2.py.)"""

from __future__ import annotations

import io

import pytest
import torch

from experiments.config import run_config_from_dict
from experiments.resolve import model_config, resolve_run_config
from experiments.trainer import build_optimizer, set_lr, train
from runfolder import RunDir
from ultramem import build_model
from ultramem.accounting import count_params
from ultramem.config import ConfigError, ModelConfig
from ultramem.families import families, family_names, get_family
from ultramem.layout import ParallelLayout, check_layout
from ultramem.memory.ultramem_v2 import UltraMemV2Table
from ultramem.presets import PRESETS, get_preset, preset_source

TINY_SIZES = ("t1", "t2", "t3", "t4", "t5", "t6")


def small(**memory_v2) -> ModelConfig:
    base = ModelConfig(family="ultramem_v2", vocab_size=61, seq_len=32, n_layers=3, d_model=32, n_heads=2,
                       ffn_hidden=64)
    v2 = {"num_keys": 4, "key_dim": 8, "value_dim": 12, "pre_value_dim": 4, "heads": 2, "top_m": 3,
          "share_ratio": 0.75, "init": "official", **memory_v2}
    return ModelConfig.from_dict({**base.to_dict(), "memory_v2": v2})


def test_registered_last_with_its_own_style():
    assert family_names() == ("dense", "moe", "pkm", "ultramem", "memory_plus", "ultramem_v2")
    fam = get_family("ultramem_v2")
    assert fam.block == "memory_v2" and fam.sparse and fam.summary_block == "memory"
    others = [(f.style.color, f.style.marker) for f in families() if f.name != "ultramem_v2"]
    assert fam.style.color not in [c for c, _ in others] and fam.style.marker not in [m for _, m in others]
    with pytest.raises(ConfigError, match=r"model.memory_v2.top_m"):
        small(share_ratio=0.0, top_m=5)  # 5 > 4 keys per side with private windows


def test_a_layer_beside_the_ffn_of_every_block_reading_one_table():
    torch.manual_seed(0)
    model = build_model(small())
    assert isinstance(model.shared, UltraMemV2Table)
    assert all(b.ffn.mlp is not None and b.ffn.memory is not None for b in model.blocks)
    assert {id(b.ffn.memory.table) for b in model.blocks} == {id(model.shared)}
    assert [b.ffn.memory.layer_index for b in model.blocks] == [0, 1, 2]
    h = torch.randn(2, 5, 32)
    y, aux = model.blocks[1].ffn(h)
    torch.testing.assert_close(y, model.blocks[1].ffn.mlp(h) + model.blocks[1].ffn.memory(h)[0])
    assert set(aux) == {"aux_loss", "balance_loss", "tucker_penalty"}
    out = model(torch.randint(0, 61, (2, 8)))
    assert set(out.aux) == {"balance_loss", "tucker_penalty"} and float(out.aux_loss) == 0.0  # paper defaults: off


def test_state_dict_round_trip_and_rank1_refresh_through_the_blocks():
    torch.manual_seed(1)
    a = build_model(small())
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    torch.manual_seed(2)
    b = build_model(small())
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    idx = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(a(idx).logits, b(idx).logits, rtol=0, atol=0)
    assert b.blocks[0].ffn.memory.table.pre_values is b.shared.pre_values is b.blocks[2].ffn.memory.table.pre_values
    ret = b.blocks[2].ffn.memory.retrieval
    with torch.no_grad():
        ret.cores.copy_(torch.rand_like(ret.cores))
    b.on_optimizer_step()
    U, _, Vh = torch.linalg.svd(ret.cores.detach().sum(0))
    torch.testing.assert_close(ret.u.abs(), U[..., 0].abs())


def test_both_tables_take_the_value_lr_multiplier():
    model = build_model(small(value_lr_mult=4.0, value_lr_decay=0.5))
    groups = {g["name"]: g for g in model.param_groups(0.1)}
    assert {id(p) for p in groups["values"]["params"]} == {id(model.shared.values), id(model.shared.pre_values)}
    assert "fixed_lr" not in groups["values"]
    assert [groups["values"]["lr_mult_fn"](p) for p in (0.0, 0.25, 0.5)] == pytest.approx([4.0, 2.5, 1.0])
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_fsdp_and_row_memory_parallelism_are_refused_data_and_dim_memory_parallelism_are_not():
    cfg = get_preset("ultramem_v2-t1-x6")
    with pytest.raises(ConfigError, match=r"parallel.fsdp: .*'ultramem_v2'.*shared by the memory layers"):
        check_layout(cfg, ParallelLayout(2, fsdp=True))
    with pytest.raises(ConfigError, match=r"parallel.memory_parallel.mode: 'row' is not implemented for UltraMemV2"):
        check_layout(cfg, ParallelLayout(2, memory_parallel="row", memory_parallel_size=2))
    check_layout(cfg, ParallelLayout(2))
    # both tables split by columns (tests/test_parallel_memory_shared.py)
    check_layout(cfg, ParallelLayout(2, memory_parallel="dim", memory_parallel_size=2))


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("ultramem_v2-")])
def test_presets_build_with_the_counted_parameters(name):
    cfg = get_preset(name)
    model = build_model(cfg, device="meta")
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.sparse == model.shared.values.numel() + model.shared.pre_values.numel()


@pytest.mark.parametrize("size", TINY_SIZES)
def test_tiny_ladder_matches_moe_and_ultramem_within_3_percent(size):
    v2 = count_params(get_preset(f"ultramem_v2-{size}-x6"))
    moe = count_params(get_preset(next(n for n in PRESETS if n.startswith(f"moe-{size}-"))))
    um = count_params(get_preset(f"ultramem-{size}-x6"))
    for ref in (moe, um):
        assert v2.non_embedding == pytest.approx(ref.non_embedding, rel=0.03)
        assert v2.active_non_embedding == pytest.approx(ref.active_non_embedding, rel=0.03)
    cfg = get_preset(f"ultramem_v2-{size}-x6")
    assert (cfg.memory_v2.heads, cfg.memory_v2.top_m, cfg.memory_v2.share_ratio) == (1, 32, 0.5)
    assert preset_source(f"ultramem_v2-{size}-x6") == "ours (tiny ladder)"


def test_the_authors_227m_configuration():
    cfg = get_preset("ultramem_v2-227m")
    v2 = cfg.memory_v2
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.ffn_hidden) == (20, 768, 12, 3744)  # 4992 SwiGLU
    assert (v2.num_keys, v2.keys_per_side(20), v2.key_dim, v2.heads, v2.top_m, v2.value_dim, v2.pre_value_dim) == (
        360, 1138, 192, 1, 32, 192, 192)
    assert (v2.share_ratio, v2.value_lr_mult, v2.value_lr_decay) == (0.5, 4.0, 1.0)
    assert v2.table_rows(20) == 2_592_000 and preset_source("ultramem_v2-227m") == "authors"
    # iso-parameter with the v1 preset (the value tables are ~1.0B each)
    assert count_params(cfg).total == pytest.approx(count_params(get_preset("ultramem-227m-official")).total,
                                                    rel=0.01)


def test_one_training_run_records_the_memory_summary(tmp_path, shakespeare_path):
    cfg = run_config_from_dict({
        "model": {"preset": "ultramem_v2-t1-x6"},
        "data": {"source": str(shakespeare_path), "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 2, "batch_size": 4, "seq_len": 32, "log_every": 1, "eval_every": 2, "eval_batches": 1,
                  "ckpt_every": 2, "threads": 1, "knowledge_probe": False, "warmup": 0},
    }, "test")
    final = train(cfg, RunDir(tmp_path / "run").path)
    mcfg = model_config(resolve_run_config(cfg))
    pc = count_params(mcfg)
    assert final["family"] == "ultramem_v2" and final["total_params"] == pc.total
    assert final["memory"]["num_layers"] == 2 and final["memory"]["value_params"] == pc.sparse
    resolved = resolve_run_config(cfg)
    opt, fns = build_optimizer(build_model(mcfg), resolved.train)
    base = set_lr(opt, fns, 0, resolved.train)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["values"] == pytest.approx(4.0 * base) and lrs["decay"] == pytest.approx(base)
