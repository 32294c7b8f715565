"""Memory+ (Meta, arXiv 2412.09764) against a naive reference written as plain loops, in float64.

The reference treats the memory as N = n**2 full keys [K1[i] | K2[j]] (row i*n + j), scores every one of them per
token and head, takes the exact top-m, a softmax over those m, the weighted sum of value rows, and the swilu output.
It reads the layer's parameters only, never its helpers. Product-key search is exact for additive scores (the top-m
of s1[i] + s2[j] lies in the top-m rows x top-m columns), so the layer must match it row for row.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ultramem.config import ConfigError, MemoryPlusConfig
from ultramem.memory.memory_plus import MemoryPlusLayer, MemoryPlusTable, memory_plus_blocks

D = 12  # d_model of the small layers


def make_cfg(**kw) -> MemoryPlusConfig:
    base = dict(num_keys=5, key_dim=6, heads=2, top_m=3, value_dim=0, qk_norm=False, swilu=True)
    base.update(kw)
    cfg = MemoryPlusConfig(**base)
    cfg.validate()
    return cfg


def make(d_model=D, table=None, **kw) -> MemoryPlusLayer:
    layer = MemoryPlusLayer(d_model, make_cfg(**kw), table).double()
    if layer.q_norm is not None:  # random norm weights, so that a mix-up of q/k norm shows
        with torch.no_grad():
            layer.q_norm.weight.uniform_(0.5, 1.5)
            layer.k_norm.weight.uniform_(0.5, 1.5)
    return layer


def naive(layer: MemoryPlusLayer, x: torch.Tensor, qk_norm: bool | None = None, swilu: bool | None = None):
    """x [B, T, d] -> (y [B, T, d], selected rows [B, T, H] as sorted lists). Plain loops over tokens and heads."""
    cfg = layer.cfg
    qk_norm = cfg.qk_norm if qk_norm is None else qk_norm
    swilu = cfg.swilu if swilu is None else swilu
    B, T, d = x.shape
    H, n, m, Dk = cfg.heads, cfg.num_keys, cfg.top_m, cfg.key_dim
    half = Dk // 2
    K = layer.keys.view(H, 2, n, half)  # Meta's [2*H*n, half] key layout
    V = layer.table.values

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    out, picked = [], []
    for b in range(B):
        for t in range(T):
            xt = x[b, t]
            q = (layer.query_proj.weight @ xt + layer.query_proj.bias).view(H, Dk)
            y = torch.zeros(V.shape[1], dtype=x.dtype)
            heads = []
            for h in range(H):
                q1, q2, K1, K2 = q[h, :half], q[h, half:], K[h, 0], K[h, 1]
                if qk_norm:
                    q1, q2 = rms(q1, layer.q_norm.weight), rms(q2, layer.q_norm.weight)
                    K1, K2 = rms(K1, layer.k_norm.weight), rms(K2, layer.k_norm.weight)
                full_keys = torch.stack([torch.cat([K1[i], K2[j]]) for i in range(n) for j in range(n)])  # [N, Dk]
                scores = full_keys @ torch.cat([q1, q2])  # [N]: every key scored
                best, idx = scores.topk(m)
                w = torch.softmax(best, dim=0)
                for k in range(m):
                    y = y + w[k] * V[idx[k]]
                heads.append(sorted(idx.tolist()))
            if swilu:
                z = layer.swilu_proj.weight @ xt + layer.swilu_proj.bias
                y = y * (z * torch.sigmoid(z))
            out.append(layer.value_proj.weight @ y + layer.value_proj.bias)
            picked.append(heads)
    return torch.stack(out).view(B, T, d), picked


def check_against_naive(layer: MemoryPlusLayer, x: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    y, aux = layer(x)
    assert aux == {}
    ref, _ = naive(layer, x)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    names = ["h"] + [name for name, _ in layer.named_parameters()]
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad((y * g).sum(), params)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, msg=lambda msg, name=name: f"{name}: {msg}")


# (1) output and gradients = naive exact top-m; product-key search is exact -----------------------------------------

def test_output_and_gradients_match_naive_reference():
    torch.manual_seed(0)
    layer = make()
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"table.values", "query_proj.weight", "query_proj.bias", "keys", "swilu_proj.weight",
                     "swilu_proj.bias", "value_proj.weight", "value_proj.bias"}
    check_against_naive(layer, torch.randn(2, 4, D, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
def test_product_key_search_is_exact_top_m(seed):
    torch.manual_seed(seed)
    layer = make(d_model=16, num_keys=12, key_dim=8, heads=3, top_m=4)
    x = torch.randn(1, 24, 16, dtype=torch.float64)
    rows, w = layer.lookup(x)
    _, picked = naive(layer, x)
    got = rows.view(24, 3, 4).sort(-1).values.tolist()
    assert got == picked[:24]
    torch.testing.assert_close(w.view(24, 3, 4).sum(-1), torch.ones(24, 3, dtype=torch.float64))


# (2) one table shared by three layers ----------------------------------------------------------------------------

class Tiny(nn.Module):
    """Three blocks, each adding its memory layer's output to the residual stream."""

    def __init__(self, cfg: MemoryPlusConfig, shared: bool):
        super().__init__()
        table = MemoryPlusTable.from_config(cfg, D) if shared else None
        self.blocks = nn.ModuleList(MemoryPlusLayer(D, cfg, table) for _ in range(3))

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)[0]
        return x


def test_shared_table_sums_the_gradients_of_every_layer():
    torch.manual_seed(1)
    cfg = make_cfg()
    shared = Tiny(cfg, shared=True).double()
    private = Tiny(cfg, shared=False).double()  # same weights, each layer its own copy of the table
    for a, b in zip(shared.blocks, private.blocks, strict=True):
        b.load_state_dict(a.state_dict())
    x, g = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, 5, D, dtype=torch.float64)
    y_shared, y_private = shared(x), private(x)
    torch.testing.assert_close(y_shared, y_private)
    (y_shared * g).sum().backward()
    (y_private * g).sum().backward()
    per_layer = [blk.table.values.grad for blk in private.blocks]
    assert all(p.abs().sum() > 0 for p in per_layer)
    assert not any(torch.allclose(shared.blocks[0].table.values.grad, p) for p in per_layer)
    torch.testing.assert_close(shared.blocks[0].table.values.grad, sum(per_layer))

    # parameters() yields the table once
    dense = sum(p.numel() for n, p in private.blocks[0].named_parameters() if n != "table.values")
    N_Dv = 25 * D
    assert sum(p.numel() for p in shared.parameters()) == 3 * dense + N_Dv
    assert sum(p.numel() for p in private.parameters()) == 3 * (dense + N_Dv)
    assert [n for n, _ in shared.named_parameters() if n.endswith("values")] == ["blocks.0.table.values"]


def test_table_shape_must_fit_the_layer():
    with pytest.raises(ConfigError, match="model.memory_plus"):
        MemoryPlusLayer(D, make_cfg(), MemoryPlusTable(16, D))


# (3) placement and config checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers, blocks", [(24, [4, 12, 20]), (12, [2, 6, 10]), (32, [6, 16, 26]), (1, [0]),
                                              (2, [0, 1]), (3, [0, 1, 2]), (4, [1, 2, 3]), (6, [1, 3, 5]),
                                              (9, [1, 4, 7])])
def test_auto_places_three_centred_blocks(n_layers, blocks):
    assert memory_plus_blocks("auto", n_layers) == blocks


def test_explicit_blocks_and_errors():
    assert memory_plus_blocks("4,12,20", 24) == [4, 12, 20]
    assert memory_plus_blocks(" 20, 4 ", 24) == [4, 20]
    for spec, msg in [("4,24", "out of range"), ("3,3", "repeats"), ("4,-1", "cannot parse"), ("", "cannot parse"),
                      ("4;12", "cannot parse"), ("every", "cannot parse")]:
        with pytest.raises(ConfigError, match=f"model.memory_plus.layers.*{msg}"):
            memory_plus_blocks(spec, 24)


@pytest.mark.parametrize("field, value", [("layers", "4:12"), ("num_keys", 1), ("key_dim", 7), ("heads", 0),
                                          ("top_m", 6), ("top_m", 0), ("value_dim", -1), ("value_lr", 0.0),
                                          ("dropout", 1.0)])
def test_config_validate_names_the_field(field, value):
    cfg = make_cfg()
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=rf"model\.memory_plus\.{field}: invalid value .*; allowed: "):
        cfg.validate()


def test_config_defaults_are_metas():
    cfg = MemoryPlusConfig()
    cfg.validate()
    assert (cfg.heads, cfg.top_m, cfg.num_keys, cfg.key_dim, cfg.value_lr) == (4, 32, 1024, 512, 1e-3)
    assert cfg.num_values == 2**20 and cfg.shared_values and cfg.replace_ffn and cfg.swilu and not cfg.qk_norm


# (4) causality and decode ----------------------------------------------------------------------------------------

def test_causal_and_decodes_one_token_at_a_time():
    torch.manual_seed(2)
    layer = make()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    y = layer(x)[0]
    x2 = x.clone()
    x2[:, 3:] += torch.randn(2, 3, D, dtype=torch.float64)
    y2 = layer(x2)[0]
    assert torch.equal(y[:, :3], y2[:, :3])
    assert not torch.allclose(y[:, 3:], y2[:, 3:])
    steps = torch.cat([layer(x[:, t:t + 1])[0] for t in range(6)], dim=1)  # T = 1 decode steps
    torch.testing.assert_close(steps, y)


# (5) parameter count by hand -------------------------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm, swilu, dense", [
    # d=12, H=2, n=5, key_dim=6 (halves of 3), Dv=8:
    # query 12*(2*6) + 2*6 = 156; keys 2*2*5*3 = 60; W1 12*8 + 8 = 104; W2 8*12 + 12 = 108; norms 3 + 3
    (False, True, 156 + 60 + 104 + 108),
    (True, True, 156 + 60 + 104 + 108 + 6),
    (False, False, 156 + 60 + 108),
])
def test_parameter_count_by_hand(qk_norm, swilu, dense):
    layer = make(value_dim=8, qk_norm=qk_norm, swilu=swilu)
    table = 5 * 5 * 8  # N * Dv
    assert sum(p.numel() for p in layer.parameters()) == dense + table
    assert layer.table.values.numel() == table


# (6) options against the naive reference with the option ----------------------------------------------------------

@pytest.mark.parametrize("qk_norm, swilu", [(True, True), (False, False), (True, False)])
def test_options_match_naive_reference(qk_norm, swilu):
    torch.manual_seed(3)
    layer = make(qk_norm=qk_norm, swilu=swilu, value_dim=8)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    check_against_naive(layer, x)
    y = layer(x)[0]
    if qk_norm:  # the norms change the scores: without them the output differs
        assert not torch.allclose(y, naive(layer, x, qk_norm=False)[0])
    if not swilu:
        assert layer.swilu_proj is None


def test_swilu_gates_the_output():
    torch.manual_seed(4)
    layer = make()
    x = torch.randn(1, 3, D, dtype=torch.float64)
    assert not torch.allclose(layer(x)[0], naive(layer, x, swilu=False)[0])


# init and dtypes -------------------------------------------------------------------------------------------------

def test_metas_init():
    torch.manual_seed(5)
    d, kd, dv = 64, 32, 48
    layer = MemoryPlusLayer(d, make_cfg(num_keys=32, key_dim=kd, heads=4, top_m=8, value_dim=dv))
    bound = kd**-0.5  # the FULL key dim, although each stored key row has kd // 2
    assert layer.keys.shape == (2 * 4 * 32, kd // 2)
    assert layer.keys.abs().max().item() <= bound
    assert layer.keys.abs().max().item() > 0.95 * bound
    assert layer.table.values.std().item() == pytest.approx(dv**-0.5, rel=0.05)
    for lin in (layer.swilu_proj, layer.value_proj):
        assert lin.weight.std().item() == pytest.approx(d**-0.5, rel=0.1)
        assert lin.bias is not None
    xavier = math.sqrt(6 / (d + 4 * kd))
    assert layer.query_proj.weight.abs().max().item() <= xavier
    assert layer.query_proj.bias is not None


def test_softmax_is_fp32_under_bf16():
    torch.manual_seed(6)
    layer = MemoryPlusLayer(D, make_cfg()).to(torch.bfloat16)
    x = torch.randn(1, 4, D, dtype=torch.bfloat16)
    _, w = layer.lookup(x)
    assert w.dtype == torch.float32
    y, _ = layer(x)
    assert y.shape == (1, 4, D) and y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_private_table_and_dropout():
    layer = make(dropout=0.5)
    layer.eval()
    x = torch.randn(1, 2, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], naive(layer, x)[0])
