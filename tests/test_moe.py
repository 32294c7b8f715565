"""MoE FFN: the sorted dispatch against a naive masked loop, grouped GEMM against the loop, and the aux losses
against their closed forms and Megatron's published formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ultramem.config import ConfigError, MoEConfig
from ultramem.kernels.grouped import grouped_mm, grouped_mm_unsupported_reason
from ultramem.moe import MoEFFN

D, H = 16, 32


def make(E=4, k=2, grouped="off", normalize=True, d=D, h=H, seed=0, **kw) -> MoEFFN:
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, top_k=k, grouped_mm=grouped, normalize_gates=normalize, **kw)
    return MoEFFN(d, h, cfg, init_std=0.2, n_layers=2, dropout=0.0)


def naive_moe(m: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: per-token softmax/top-k, then for each expert a boolean mask over all tokens."""
    xf = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(xf.float() @ m.router.weight.float().T, dim=-1)
    top_p, top_i = torch.topk(probs, m.cfg.top_k, dim=-1)
    if m.cfg.normalize_gates:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    y = torch.zeros_like(xf)
    for e in range(m.cfg.num_experts):
        gate = (top_p * (top_i == e)).sum(-1)  # [N], 0 where e not chosen
        mask = (top_i == e).any(-1)
        if mask.any():
            out = F.gelu(xf[mask] @ m.w_in[e]) @ m.w_out[e]
            y = y.index_put((mask.nonzero().squeeze(1),), gate[mask, None].to(y.dtype) * out, accumulate=True)
    return y.view_as(x)


def collapse_router(m: MoEFFN, live: list[int]) -> None:
    """With x >= 0, experts outside `live` get strongly negative logits and are never selected."""
    with torch.no_grad():
        w = -torch.ones_like(m.router.weight)
        w[live] = (torch.rand(len(live), w.shape[1]) + 0.5).to(w.dtype)
        m.router.weight.copy_(w)


def grads(m: MoEFFN, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    g = torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype)
    return list(torch.autograd.grad(y, [x, m.router.weight, m.w_in, m.w_out], g, allow_unused=True))


def grouped_reason(dtype=torch.float32, dims=(D, H)) -> str | None:
    return grouped_mm_unsupported_reason(torch.device("cpu"), dtype, dims)


PATHS = ["off", pytest.param("on", marks=pytest.mark.skipif(grouped_reason() is not None, reason=str(grouped_reason())))]


@pytest.mark.parametrize("grouped", PATHS)
@pytest.mark.parametrize("E,k,normalize,live", [(4, 1, True, None), (4, 2, True, None), (8, 2, False, None),
                                                (8, 8, True, None), (8, 2, True, [5, 6])])
def test_sorted_dispatch_equals_naive_masked_loop(grouped, E, k, normalize, live):
    m = make(E, k, grouped, normalize)
    x = torch.randn(3, 7, D)
    if live is not None:  # collapsed router: all 21 tokens on 2 experts, none dropped
        collapse_router(m, live)
        x = x.abs()
    x.requires_grad_()
    y, _ = m(x)
    ref = naive_moe(m, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(m, x, y), grads(m, x, ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_grouped_mm_path_equals_loop_path(dtype, autocast):
    mm_dtype = torch.bfloat16 if autocast else dtype
    if (reason := grouped_reason(mm_dtype)) is not None:
        pytest.skip(reason)
    m = make(E=6, k=2).to(dtype)
    collapse_router(m, [0, 2, 3, 5])  # experts 1 and 4 receive no tokens: empty groups in the grouped GEMM
    x = torch.randn(2, 9, D).abs().to(dtype).requires_grad_()
    outs = {}
    for mode in ("on", "off"):
        m.cfg.grouped_mm = mode
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, aux = m(x)
        outs[mode] = (y, grads(m, x, y))
    assert (m.last_load[[1, 4]] == 0).all() and (m.last_load[[0, 2, 3, 5]] > 0).all()
    assert outs["on"][0].dtype == outs["off"][0].dtype == mm_dtype
    torch.testing.assert_close(outs["on"][0], outs["off"][0])
    for a, b in zip(outs["on"][1], outs["off"][1], strict=True):
        torch.testing.assert_close(a, b)


def test_grouped_mm_backward_accepts_expanded_gradient():
    if (reason := grouped_reason(dims=(8, 16))) is not None:
        pytest.skip(reason)
    counts = [3, 0, 5, 0]
    x = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(4, 8, 16, requires_grad=True)
    grouped_mm(x, w, torch.tensor(counts).cumsum(0).to(torch.int32)).sum().backward()  # grad has zero strides
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.cat([x_ref[:3] @ w_ref[0], x_ref[3:] @ w_ref[2]]).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)
    assert (w.grad[[1, 3]] == 0).all()


def test_grouped_on_with_misaligned_width_raises_and_auto_falls_back():
    x = torch.randn(2, 5, 6)  # 6 fp32 = 24 bytes: not a multiple of 16
    m = make(d=6, h=10, grouped="on")
    with pytest.raises(ConfigError, match="model.moe.grouped_mm"):
        m(x)
    m.cfg.grouped_mm = "auto"
    torch.testing.assert_close(m(x)[0], naive_moe(m, x), rtol=1e-5, atol=1e-6)


def test_permuting_tokens_permutes_outputs():
    m = make(E=8, k=2, grouped="auto")
    x = torch.randn(1, 24, D)
    perm = torch.randperm(24)
    y, aux = m(x)
    y_p, aux_p = m(x[:, perm])
    torch.testing.assert_close(y_p, y[:, perm], rtol=1e-5, atol=1e-6)
    for name in aux:
        torch.testing.assert_close(aux_p[name], aux[name])


def test_balance_loss_is_one_for_uniform_router_and_large_when_collapsed():
    E = 8
    m = make(E=E, k=2, balance_loss_weight=0.01, z_loss_weight=0.001)
    x = torch.randn(4, 16, D).abs()
    with torch.no_grad():
        m.router.weight.zero_()  # every prob 1/E: E * sum_i f_i / E = 1 whatever f is
    assert m(x)[1]["moe_balance"].item() == pytest.approx(1.0, abs=1e-6)

    collapse_router(m, [3])
    with torch.no_grad():
        m.router.weight[3] *= 20  # all router mass on expert 3
    _, aux = m(x)
    probs = torch.softmax(x.reshape(-1, D) @ m.router.weight.T, -1)
    tokens_per_expert = F.one_hot(probs.topk(2, -1).indices, E).sum((0, 1)).float()
    # Megatron switch_load_balancing_loss_func: sum(probs.mean(0) * tokens_per_expert) * E / (T * topk)
    megatron = (probs.mean(0) * tokens_per_expert).sum() * E / (probs.shape[0] * 2)
    torch.testing.assert_close(aux["moe_balance"], megatron)
    assert aux["moe_balance"].item() > E / 2 - 0.01  # half the slots and ~all mass on one expert -> E/2


def test_balance_loss_is_one_for_perfectly_balanced_hard_routing():
    E = 8
    m = make(E=E, k=1)
    with torch.no_grad():
        m.router.weight.copy_(50 * torch.eye(E, D))  # token t = e_t goes to expert t with prob ~1
    x = torch.eye(E, D).view(1, E, D)
    _, aux = m(x)
    assert aux["moe_balance"].item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(m.last_load, torch.full((E,), 1 / E))


def test_z_loss_closed_form():
    E = 8
    m = make(E=E, k=2, balance_loss_weight=0.3, z_loss_weight=0.05)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        m.router.weight.zero_()
    assert m(x)[1]["moe_z"].item() == pytest.approx(math.log(E) ** 2, rel=1e-6)

    m = make(E=E, k=2, balance_loss_weight=0.3, z_loss_weight=0.05)
    _, aux = m(x)
    logits = (x.reshape(-1, D).double() @ m.router.weight.double().T)
    z = (logits.exp().sum(-1).log() ** 2).mean()
    assert aux["moe_z"].item() == pytest.approx(z.item(), rel=1e-5)
    assert aux["aux_loss"].item() == pytest.approx(0.3 * aux["moe_balance"].item() + 0.05 * z.item(), rel=1e-5)


@pytest.mark.parametrize("grouped", PATHS)
def test_gradients_reach_router_and_exactly_the_experts_with_tokens(grouped):
    m = make(E=6, k=2, grouped=grouped, balance_loss_weight=0.0, z_loss_weight=0.0)
    collapse_router(m, [0, 2, 5])
    x = torch.randn(2, 8, D).abs()
    y, _ = m(x)
    y.square().sum().backward()  # main output only: the router learns through the renormalised gates
    assert m.router.weight.grad.abs().sum() > 0
    for e in range(6):
        touched = e in (0, 2, 5)
        assert (m.w_in.grad[e].abs().sum() > 0) == touched, e
        assert (m.w_out.grad[e].abs().sum() > 0) == touched, e


def test_last_load_counts_token_slots_and_sums_to_one():
    E, k = 8, 2
    m = make(E=E, k=k)
    x = torch.randn(3, 10, D)
    m(x)
    probs = torch.softmax(x.reshape(-1, D) @ m.router.weight.T, -1)
    expected = F.one_hot(probs.topk(k, -1).indices, E).sum((0, 1)).float() / (30 * k)
    torch.testing.assert_close(m.last_load, expected)
    assert m.last_load.sum().item() == pytest.approx(1.0)
    stats = m.load_stats()
    assert stats["load_max"] == pytest.approx(expected.max().item())
    assert stats["load_max_over_mean"] == pytest.approx(expected.max().item() * E)
    assert stats["experts_idle"] == int((expected == 0).sum())


def test_take_load_accumulates_training_forwards_only():
    E = 4
    m = make(E=E, k=1)
    x1, x2 = torch.randn(1, 6, D), torch.randn(1, 10, D)
    m.train()
    m(x1)
    c1 = m.last_load * 6
    m(x2)
    c2 = m.last_load * 10
    m.eval()
    m(torch.randn(1, 50, D))
    torch.testing.assert_close(m.take_load(), (c1 + c2) / 16)
    assert m.take_load().sum() == 0


class _MatmulShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "_grouped_mm"):
            self.calls.append((name, tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


def test_decode_step_multiplies_only_the_two_routed_experts():
    m = make(E=16, k=2, grouped="auto")
    with torch.no_grad(), _MatmulShapes() as rec:
        m(torch.randn(1, 1, D))
    expert_calls = [c for c in rec.calls if c[1] in ((D, H), (H, D))]
    assert [c[0] for c in rec.calls].count("_grouped_mm") == 0
    assert sorted(c[1] for c in expert_calls) == [(D, H), (D, H), (H, D), (H, D)]


def test_init_stds():
    torch.manual_seed(0)
    m = MoEFFN(64, 256, MoEConfig(num_experts=8, expert_hidden=128), init_std=0.02, n_layers=8, dropout=0.0)
    assert m.w_in.shape == (8, 64, 128) and m.w_out.shape == (8, 128, 64)
    assert m.w_in.std().item() == pytest.approx(0.02, rel=0.03)
    assert m.w_out.std().item() == pytest.approx(0.02 / 4, rel=0.03)
    assert m.router.weight.std().item() == pytest.approx(0.02, rel=0.05)
