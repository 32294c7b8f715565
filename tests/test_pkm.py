"""PKM (Lample et al. 2019) against a naive reference: full n x n additive grid, exact top-m, softmax, weighted sum.

Keeping the top-m rows and columns before summing is exact for additive scores (any (i, j) in the top-m of
s_row[i] + s_col[j] has i among the top-m rows and j among the top-m columns), so the reference uses the full grid.
"""

from __future__ import annotations

import pytest
import torch

from ultramem.config import MemoryConfig
from ultramem.memory.pkm import PKMLayer


def make(d_model=12, **kw) -> PKMLayer:
    base = dict(layers="every", num_keys=5, key_dim=6, value_dim=12, heads=3, query_share=1, top_m=4,
                score="softmax", qk_norm=False, value_proj=False, tucker_rank=1, num_cores=1, value_expansion=1,
                init="xlm")
    base.update(kw)
    cfg = MemoryConfig(**base)
    cfg.validate()
    return PKMLayer(d_model, cfg, n_layers=4).double()


def naive_forward(layer: PKMLayer, x: torch.Tensor) -> torch.Tensor:
    cfg = layer.cfg
    B, T, _ = x.shape
    H, s = cfg.heads, cfg.query_share
    q = (x @ layer.query.proj.weight.T).view(B, T, H // s, 2, cfg.key_dim)
    keys = layer.keys
    if cfg.qk_norm:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.query.norm.weight
        keys = keys / torch.sqrt(keys.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.key_norm.weight
    out = []
    for b in range(B):
        for t in range(T):
            acc = torch.zeros(cfg.value_dim, dtype=x.dtype)
            for i in range(H):
                s_row = keys[i, 0] @ q[b, t, i // s, 0]  # [n]
                s_col = keys[i, 1] @ q[b, t, i // s, 1]
                grid = (s_row[:, None] + s_col[None, :]).flatten()  # [n*n], index i*n + j
                best, idx = grid.topk(cfg.top_m)
                w = best.softmax(-1) if cfg.score == "softmax" else best
                acc = acc + (w[:, None] * layer.values[idx]).sum(0)
            out.append(acc)
    y = torch.stack(out).view(B, T, -1)
    return y @ layer.value_proj.weight.T if layer.value_proj is not None else y


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "query_share": 3, "value_proj": True, "value_dim": 8,
                                     "score": "none", "init": "paper"}])
def test_pkm_matches_naive_full_grid_reference(kw):
    torch.manual_seed(0)
    layer = make(**kw)
    x = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    assert aux == {}
    ref = naive_forward(layer, x)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad((y * g).sum(), params)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_pkm_xlm_init():
    layer = make(num_keys=32, key_dim=16, value_dim=64, d_model=64)
    assert layer.values.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert layer.keys.abs().max().item() <= 16**-0.5
