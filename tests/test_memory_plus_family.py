"""The memory_plus family in the model, the accounting, the presets, the optimizer, the layouts and the trainer:
one value table shared across blocks (state_dict round trip, gradients of every reader, checkpoint resume), its
fixed value LR, the tiny ladder at the MoE/UltraMem parameters and the authors' 227M configurations."""

from __future__ import annotations

import io

import pytest
import torch

from experiments import checkpoint
from experiments.config import run_config_from_dict
from experiments.resolve import model_config, resolve_run_config
from experiments.trainer import build_optimizer, set_lr, train
from runfolder import RunDir
from ultramem import build_model
from ultramem.accounting import count_params
from ultramem.config import ConfigError, ModelConfig
from ultramem.families import families, family_names, get_family
from ultramem.layout import ParallelLayout, check_layout, train_memory
from ultramem.memory.ffn_memory import MemoryFFN
from ultramem.memory.memory_plus import MemoryPlusTable
from ultramem.presets import PRESETS, get_preset, preset_source

TINY_SIZES = ("t1", "t2", "t3", "t4", "t5", "t6")
NEW_PRESETS = [n for n in PRESETS if n.startswith("memory_plus-") or "227m" in n]


def small(**memory_plus) -> ModelConfig:
    base = ModelConfig(family="memory_plus", vocab_size=61, seq_len=32, n_layers=3, d_model=32, n_heads=2,
                       ffn_hidden=64)
    mp = {"layers": "0,2", "num_keys": 6, "key_dim": 8, "heads": 2, "top_m": 4, **memory_plus}
    return ModelConfig.from_dict({**base.to_dict(), "memory_plus": mp})


# ---- registry, config ----------------------------------------------------------------------------------------------


def test_registered_after_the_built_in_families_with_its_own_style():
    assert family_names()[:5] == ("dense", "moe", "pkm", "ultramem", "memory_plus")
    fam = get_family("memory_plus")
    assert fam.block == "memory_plus" and fam.sparse and fam.summary_block == "memory"
    others = [(f.style.color, f.style.marker) for f in families() if f.name != "memory_plus"]
    assert fam.style.color not in [c for c, _ in others] and fam.style.marker not in [m for _, m in others]


def test_config_block_placement_and_dict_round_trip():
    cfg = small()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert "memory_v2" not in cfg.to_dict() and cfg.to_dict()["memory"] is None
    with pytest.raises(ConfigError, match=r"model.memory_plus.layers: block\(s\) \[3\]"):
        small(layers="1,3")
    with pytest.raises(ConfigError, match="model.memory_plus: .*exactly when family is 'memory_plus'"):
        ModelConfig(family="dense").override({"memory_plus": {"num_keys": 4, "top_m": 2}})
    with pytest.raises(ConfigError, match="model.memory_plus"):
        ModelConfig(family="memory_plus").validate()  # the family needs its block


# ---- the model: placement, one shared table -------------------------------------------------------------------


def test_memory_replaces_or_joins_the_ffn_of_the_chosen_blocks():
    model = build_model(small())
    kinds = [(b.ffn.mlp is not None, b.ffn.memory is not None) for b in model.blocks]
    assert all(isinstance(b.ffn, MemoryFFN) for b in model.blocks)
    assert kinds == [(False, True), (True, False), (False, True)]  # Meta: the memory replaces the FFN
    beside = build_model(small(replace_ffn=False))
    assert [(b.ffn.mlp is not None, b.ffn.memory is not None) for b in beside.blocks] == [
        (True, True), (True, False), (True, True)]
    tables = {id(b.ffn.memory.table) for b in model.blocks if b.ffn.memory is not None}
    assert tables == {id(model.shared)} and isinstance(model.shared, MemoryPlusTable)
    private = build_model(small(shared_values=False))
    assert private.shared is None
    assert len({id(b.ffn.memory.table) for b in private.blocks if b.ffn.memory is not None}) == 2


def test_ffn_slot_is_mlp_plus_memory_of_the_normalised_input():
    torch.manual_seed(0)
    model = build_model(small(replace_ffn=False)).eval()
    block = model.blocks[0]
    h = torch.randn(2, 5, 32)
    y, aux = block.ffn(h)
    torch.testing.assert_close(y, block.ffn.mlp(h) + block.ffn.memory(h)[0])
    assert aux == {}


def test_the_shared_table_gets_the_gradient_of_every_layer():
    # the same weights with a private copy of the table per layer: same output, and the shared table's gradient
    # is the sum of the copies' gradients
    torch.manual_seed(1)
    shared = build_model(small())
    private = build_model(small(shared_values=False))
    private.load_state_dict({k: v for k, v in shared.state_dict().items() if k != "shared.values"})
    idx = torch.randint(0, 61, (2, 12))
    a, b = shared(idx, idx.roll(-1, 1)), private(idx, idx.roll(-1, 1))
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    a.loss.backward()
    b.loss.backward()
    copies = [blk.ffn.memory.table.values.grad for blk in private.blocks if blk.ffn.memory is not None]
    assert len(copies) == 2 and all(g.abs().sum() > 0 for g in copies)
    torch.testing.assert_close(shared.shared.values.grad, copies[0] + copies[1])


def test_state_dict_round_trip_keeps_one_shared_table():
    torch.manual_seed(2)
    a = build_model(small())
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    torch.manual_seed(3)
    b = build_model(small())
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    idx = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(a(idx).logits, b(idx).logits, rtol=0, atol=0)
    assert b.blocks[0].ffn.memory.table.values is b.shared.values is b.blocks[2].ffn.memory.table.values
    assert {k for k in a.state_dict() if k.endswith("values")} == {
        "shared.values", "blocks.0.ffn.memory.table.values", "blocks.2.ffn.memory.table.values"}


def test_on_optimizer_step_reaches_the_memory_layers_in_the_blocks():
    calls = []
    model = build_model(small())
    for block in model.blocks:
        if block.ffn.memory is not None:
            block.ffn.memory.on_optimizer_step = lambda: calls.append(1)
    model.on_optimizer_step()
    assert calls == [1, 1]


# ---- optimizer: the fixed value LR ---------------------------------------------------------------------------------


def test_value_table_trains_at_the_fixed_lr_without_warmup_or_decay():
    model = build_model(small(value_lr=3e-3))
    groups = {g["name"]: g for g in model.param_groups(0.1)}
    assert [p is model.shared.values for p in groups["values"]["params"]] == [True]
    assert groups["values"]["fixed_lr"] == 3e-3 and "fixed_lr" not in groups["decay"]
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))

    resolved = resolve_run_config(run_config_from_dict({
        "model": {"preset": "memory_plus-t1-x6"}, "data": {"source": "embedded"},
        "train": {"steps": 100, "batch_size": 4, "seq_len": 32, "lr": 1e-2, "warmup": 10}}, "test"))
    t = resolved.train
    opt, fns = build_optimizer(build_model(get_preset("memory_plus-t1-x6")), t)
    names = [g["name"] for g in opt.param_groups]
    for step in (0, 5, 50, 99):
        base = set_lr(opt, fns, step, t)
        lrs = dict(zip(names, (g["lr"] for g in opt.param_groups), strict=True))
        assert lrs["values"] == 1e-3 and lrs["decay"] == pytest.approx(base)


# ---- layouts -------------------------------------------------------------------------------------------------------


def test_fsdp_and_expert_parallelism_are_refused_data_and_memory_parallelism_are_not():
    cfg = get_preset("memory_plus-t1-x6")
    for layout, field in [(ParallelLayout(2, fsdp=True), "parallel.fsdp"),
                          (ParallelLayout(2, expert_parallel=2), "parallel.expert_parallel")]:
        with pytest.raises(ConfigError, match=rf"{field}: .*'memory_plus'.*shared by the memory layers"):
            check_layout(cfg, layout)
    check_layout(cfg, ParallelLayout(4))  # DDP
    check_layout(cfg, ParallelLayout(4, activation_checkpointing=True))
    for mode in ("dim", "row"):  # the shared table split over 2 ranks (tests/test_parallel_memory_shared.py)
        check_layout(cfg, ParallelLayout(4, memory_parallel=mode, memory_parallel_size=2))
    mem = train_memory(cfg, ParallelLayout(2), 4, 256)
    assert mem.state == 16 * count_params(cfg).total and mem.activations > 0


# ---- presets -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_new_presets_build_with_the_counted_parameters(name):
    cfg = get_preset(name)
    model = build_model(cfg, device="meta")
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.sparse == sum(p.numel() for n, p in model.named_parameters()
                            if n.endswith((".values", ".pre_values", "ffn.w_in", "ffn.w_out")))


@pytest.mark.parametrize("size", TINY_SIZES)
def test_tiny_ladder_matches_moe_and_ultramem_within_3_percent(size):
    mp = count_params(get_preset(f"memory_plus-{size}-x6"))
    moe = count_params(get_preset(next(n for n in PRESETS if n.startswith(f"moe-{size}-"))))
    um = count_params(get_preset(f"ultramem-{size}-x6"))
    for ref in (moe, um):
        assert mp.non_embedding == pytest.approx(ref.non_embedding, rel=0.03)
        assert mp.active_non_embedding == pytest.approx(ref.active_non_embedding, rel=0.03)
        assert mp.total == pytest.approx(ref.total, rel=0.03) and mp.active == pytest.approx(ref.active, rel=0.03)
    cfg = get_preset(f"memory_plus-{size}-x6")
    assert cfg.memory_plus.replace_ffn and cfg.memory_plus.shared_values and cfg.memory_plus.value_dim == 0
    assert cfg.memory_plus.top_m <= cfg.memory_plus.num_keys
    assert preset_source(f"memory_plus-{size}-x6") == "ours (tiny ladder)"


def test_the_authors_227m_configurations():
    um = get_preset("ultramem-227m-official")
    m = um.memory
    assert (um.n_layers, um.d_model, um.n_heads, um.vocab_size, um.ffn_hidden) == (20, 768, 12, 50304, 4128)
    assert (m.layers, m.num_keys, m.key_dim, m.value_dim, m.heads, m.query_share, m.top_m) == (
        "2:5/6:9/10:13/14:17", 808, 192, 384, 2, 2, 80)
    assert (m.value_expansion, m.keys_per_side, m.tucker_rank, m.num_cores) == (4, 1616, 2, 2)
    assert (m.value_lr_mult, m.value_lr_decay, m.init, m.score) == (4.0, 1.0, "official", "none")
    mp = get_preset("memory_plus-227m")
    p = mp.memory_plus
    assert (mp.n_layers, mp.d_model, mp.ffn_hidden) == (20, 768, 4512)  # 6016 SwiGLU -> 2-matrix equivalent
    assert (p.layers, p.replace_ffn, p.num_keys, p.key_dim // 2, p.value_dim or mp.d_model, p.heads, p.top_m) == (
        "4,8,12,16", False, 1138, 384, 768, 2, 80)
    assert p.value_lr == 1e-3 and p.shared_values
    moe = get_preset("moe-227m-64e-top8")
    assert (moe.moe.num_experts, moe.moe.top_k) == (64, 8)
    # the three are iso-parameter (all ~1.0B value/expert parameters), as the authors' comparison
    totals = [count_params(get_preset(n)).total for n in ("ultramem-227m-official", "memory_plus-227m",
                                                           "moe-227m-64e-top8")]
    assert max(totals) / min(totals) < 1.01
    assert count_params(um).active == pytest.approx(225e6, rel=0.03)  # V2 paper Table 10: 225M activated
    assert [preset_source(n) for n in ("ultramem-227m-official", "memory_plus-227m", "moe-227m-64e-top8",
                                       "ultramem-151m-x12")] == ["authors", "authors", "inferred (227M totals)",
                                                                 "inferred (Table 1 totals)"]


# ---- the trainer -----------------------------------------------------------------------------------------------------

STEPS = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


def _cfg(shakespeare_path, cache):
    return run_config_from_dict({
        "model": {"preset": "memory_plus-t1-x6"},
        "data": {"source": str(shakespeare_path), "cache_dir": str(cache)},
        "train": {"steps": STEPS, "batch_size": 4, "seq_len": 32, "log_every": 1, "eval_every": 2,
                  "eval_batches": 2, "ckpt_every": 2, "keep_checkpoints": 4, "threads": 1,
                  "knowledge_probe": False},
    }, "test")


def _weights(rd: RunDir) -> dict[str, torch.Tensor]:
    return torch.load(rd.checkpoint_path(STEPS), map_location="cpu", weights_only=True)["model"]


def test_training_records_memory_summary_and_resumes_bit_exact(tmp_path, shakespeare_path, cache):
    cfg = _cfg(shakespeare_path, cache)
    ref = RunDir(tmp_path / "ref")
    final = train(cfg, ref.path)
    assert final["family"] == "memory_plus" and final["moe"] is None
    pc = count_params(model_config(resolve_run_config(cfg)))  # the preset with the data's vocabulary
    assert final["total_params"] == pc.total and final["active_params"] == pc.active
    mem = final["memory"]
    assert (mem["num_layers"], mem["replace_ffn"], mem["value_params"], mem["value_expansion"]) == (
        1, True, pc.sparse, 1)
    state = _weights(ref)
    assert torch.equal(state["shared.values"], state["blocks.1.ffn.memory.table.values"])
    first = torch.load(ref.checkpoint_path(2), map_location="cpu", weights_only=True)["model"]
    assert not torch.equal(state["shared.values"], first["shared.values"])  # it trains

    # a run killed right after its step-2 checkpoint, then the same command again
    rd = RunDir(tmp_path / "run")
    train(cfg, rd.path)
    for path in rd.checkpoints():
        if int(path.stem.split("_")[1]) > 2:
            path.unlink()
            checkpoint.checksum_path(path).unlink(missing_ok=True)
    rd.final_path.unlink()
    rd.update_status(state="running", pid=2**22 + 1)  # a writer that is gone
    train(cfg, rd.path)
    assert rd.status()["resumed_from"] == 2 and rd.status()["state"] == "done"
    want, got = ref.final(), rd.final()
    for key in ("train_loss", "val_loss", "tokens", "flops", "steps"):
        assert got[key] == want[key], key
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in rd.metrics()] == \
           [(r["step"], r.get("loss"), r.get("val_loss")) for r in ref.metrics()]
    a, b = _weights(ref), _weights(rd)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a = torch.load(ref.checkpoint_path(STEPS), map_location="cpu", weights_only=True)["optimizer"]
    assert [g.get("fixed_lr") for g in opt_a["param_groups"]] == [None, None, 1e-3]
