"""The transformer for every family: causality, gradients, KV-cache decoding, skip-layer placement, init, hooks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ultramem import build_model
from ultramem.config import ConfigError, ModelConfig
from ultramem.optim import value_lr_multiplier

MEMORY = dict(num_keys=6, key_dim=8, value_dim=16, heads=2, top_m=4)
SMALL = {
    "dense": {},
    "moe": {"family": "moe", "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32}},
    "pkm": {"family": "pkm", "memory": {**MEMORY, "layers": "1:1", "query_share": 1, "score": "softmax",
                                        "tucker_rank": 1, "num_cores": 1, "value_expansion": 1,
                                        "value_dim": 32, "value_proj": False, "init": "xlm"}},
    "ultramem": {"family": "ultramem", "memory": {**MEMORY, "layers": "0:2/1:1", "query_conv": 3}},
    # Meta's Memory+ (replaces the FFN of blocks 0 and 2, one shared table) and ByteDance's port (beside the FFN)
    "memory_plus": {"family": "memory_plus", "memory_plus": {"layers": "0,2", "num_keys": 6, "key_dim": 8,
                                                             "heads": 2, "top_m": 4, "qk_norm": True}},
    "memory_plus_beside": {"family": "memory_plus", "memory_plus": {"layers": "1", "replace_ffn": False,
                                                                    "num_keys": 6, "key_dim": 8, "heads": 2,
                                                                    "top_m": 4, "value_dim": 16}},
    # UltraMemV2: a layer in every block beside the FFN, one global table read through overlapping ring windows
    "ultramem_v2": {"family": "ultramem_v2", "memory_v2": {"num_keys": 4, "key_dim": 8, "value_dim": 12,
                                                           "pre_value_dim": 4, "heads": 2, "top_m": 3,
                                                           "share_ratio": 0.5}},
}


def small(family: str, **overrides) -> ModelConfig:
    base = ModelConfig(vocab_size=61, seq_len=32, n_layers=3, d_model=32, n_heads=2, ffn_hidden=64)
    return base.override(SMALL[family]).override(overrides)


FAMILIES = list(SMALL)


@pytest.mark.parametrize("family", FAMILIES)
def test_changing_token_t_never_changes_outputs_before_t(family):
    torch.manual_seed(0)
    model = build_model(small(family)).eval()
    idx = torch.randint(0, 61, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 61
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t], b[:, t])


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_trainable_parameter(family):
    torch.manual_seed(1)
    cfg = small(family, **({"memory": {"tucker_penalty": 1e-3}} if family == "ultramem" else {}))
    model = build_model(cfg)
    idx = torch.randint(0, 61, (2, 16))
    out = model(idx, idx.roll(-1, 1))
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_prefill_and_decode_equal_full_forward(family):
    torch.manual_seed(2)
    model = build_model(small(family)).eval()
    idx = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.init_cache(2, 16)
        steps = [model(idx[:, :5], cache=cache).logits]
        steps += [model(idx[:, t:t + 1], cache=cache).logits for t in range(5, 9)]
        steps.append(model(idx[:, 9:], cache=cache).logits)  # a second multi-token chunk after decoding
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.pos == 12


def test_skip_layer_memory_reads_block_a_and_adds_after_block_b():
    """Reference forward written from the definition, with the model's own submodules."""
    torch.manual_seed(3)
    model = build_model(small("ultramem", n_layers=4, memory={"layers": "0:2/3:3"})).eval()
    idx = torch.randint(0, 61, (2, 10))
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    with torch.no_grad():
        x = model.wte(idx)
        outs = {}
        for i, block in enumerate(model.blocks):
            x = x + block.attn(block.norm1(x), cos, sin)
            h = block.norm2(x)
            if i == 0:
                outs["m0"] = model.memories[0](h)[0]
            if i == 3:
                outs["m1"] = model.memories[1](h)[0]
            x = x + block.ffn(h)
            if i == 2:
                x = x + outs["m0"]
            if i == 3:
                x = x + outs["m1"]
        ref = model.lm_head(model.norm_f(x))
        torch.testing.assert_close(model(idx).logits, ref)


def test_weight_tying_option():
    tied = build_model(small("dense"))
    assert tied.lm_head.weight is tied.wte.weight
    untied = build_model(small("dense", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 61 * 32


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(4)
    cfg = ModelConfig(vocab_size=64, seq_len=16, n_layers=8, d_model=256, n_heads=4)
    model = build_model(cfg)
    block = model.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert block.ffn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)


def test_param_groups_cover_every_parameter_once_and_boost_values():
    cfg = small("ultramem", memory={"value_lr_mult": 4.0, "value_lr_decay": 0.5})
    model = build_model(cfg)
    groups = model.param_groups(weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay", "values"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in by_name["values"]["params"]} == {id(m.values) for m in model.memories}
    assert all(p.dim() == 1 for p in by_name["no_decay"]["params"])
    assert by_name["values"]["weight_decay"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0.0
    mult = by_name["values"]["lr_mult_fn"]
    # official rule 1 + (T - 1) max(0, 1 - progress / rate): 4x -> 1x linearly over the first half
    assert [mult(p) for p in (0.0, 0.25, 0.5, 0.9)] == pytest.approx([4.0, 2.5, 1.0, 1.0])
    assert by_name["decay"]["lr_mult_fn"](0.3) == 1.0
    assert value_lr_multiplier(0.1, 10.0, 1.0) == pytest.approx(9.1)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "lr_mult_fn"} for g in groups], lr=1e-3)
    assert len(opt.param_groups) == 3


def test_value_weight_decay_sets_the_value_group_alone():
    """model.memory.value_weight_decay (issue 26 item 3): the value tables' own decay; unset, the run's (official)."""
    model = build_model(small("ultramem", memory={"value_weight_decay": 0.0}))
    by_name = {g["name"]: g for g in model.param_groups(weight_decay=0.1)}
    assert by_name["values"]["weight_decay"] == 0.0 and by_name["decay"]["weight_decay"] == 0.1
    with pytest.raises(ConfigError, match="value_weight_decay"):
        build_model(small("ultramem", memory={"value_weight_decay": -1.0}))


def test_on_optimizer_step_refreshes_rank1_vectors():
    torch.manual_seed(5)
    model = build_model(small("ultramem"))
    ret = model.memories[0].retrieval
    with torch.no_grad():
        ret.cores.copy_(torch.rand_like(ret.cores))
    model.on_optimizer_step()
    U, _, Vh = torch.linalg.svd(ret.cores.detach().sum(0))
    torch.testing.assert_close(ret.u.abs(), U[..., 0].abs())
    torch.testing.assert_close(ret.t.abs(), Vh[..., 0, :].abs())


def test_aux_loss_is_the_weighted_mean_and_aux_the_mean_over_layers():
    torch.manual_seed(6)
    model = build_model(small("ultramem", memory={"tucker_penalty": 0.5}))
    out = model(torch.randint(0, 61, (1, 8)))
    penalties = [m.retrieval.tucker_penalty().detach() for m in model.memories]
    assert len(model.memories) == 2
    assert float(out.aux_loss.detach()) == pytest.approx(0.5 * float(sum(penalties)) / 2)
    assert float(out.aux["tucker_penalty"].detach()) == pytest.approx(float(sum(penalties)) / 2)
    moe = build_model(small("moe"))
    out = moe(torch.randint(0, 61, (2, 8)))
    assert set(out.aux) == {"moe_balance", "moe_z"}
    assert float(out.aux_loss.detach()) == pytest.approx(
        0.01 * float(out.aux["moe_balance"]) + 0.001 * float(out.aux["moe_z"]), rel=1e-5)
    assert out.aux_loss.requires_grad


def test_loss_is_mean_cross_entropy_ignoring_minus_one():
    torch.manual_seed(7)
    model = build_model(small("dense"))
    idx = torch.randint(0, 61, (2, 8))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1
    out = model(idx, targets)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 61), targets[:, :-1].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


def test_meta_device_allocates_nothing_and_expert_load():
    model = build_model(small("ultramem"), device="meta")
    assert all(p.is_meta for p in model.parameters())
    moe = build_model(small("moe"))
    assert moe.expert_load().shape == (3, 4)
    moe.train()
    moe(torch.randint(0, 61, (2, 8)))
    load = moe.expert_load()
    assert load.shape == (3, 4) and torch.allclose(load.sum(-1), torch.ones(3))
    assert build_model(small("dense")).expert_load() is None


def test_too_long_input_names_the_field():
    model = build_model(small("dense"))
    with pytest.raises(ValueError, match="model.seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
