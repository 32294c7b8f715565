"""Fused value retrieval (gather-weight-pool) against the naive reference: values and gradients, every layout.

The reference (`ultramem.kernels.reference.gather_pool_reference`) is evaluated in float64 on the same inputs, so
the fused paths are checked against an independent, more precise computation of the same formula.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ultramem.kernels.reference import gather_pool_reference
from ultramem.kernels.retrieval import gather_pool, gather_pool_torch

LAYOUTS = [(C, E) for C in (1, 2) for E in (1, 4)]


def make_inputs(T=9, K=12, N=20, Dv=8, C=2, E=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(N, Dv, generator=g).to(dtype)
    rows = torch.randint(0, N, (T, K), generator=g)
    rows[:, 1] = rows[:, 0]  # the same row twice in every token: gradients must add, not overwrite
    rows[:, 3] = rows[:, 0]
    scores = torch.randn(T, K, C, generator=g).to(dtype)
    groups = torch.randint(0, E, (T, K), generator=g)
    return values, rows, scores, groups


def reference_with_grads(values, rows, scores, groups, E, grad_out):
    """Float64 reference output and gradients wrt (values, scores)."""
    v = values.detach().double().requires_grad_()
    s = scores.detach().double().requires_grad_()
    out = gather_pool_reference(v, rows, s, groups, E)
    gv, gs = torch.autograd.grad(out, (v, s), grad_out.double())
    return out, gv, gs


def fused_with_grads(fn, values, rows, scores, groups, E, grad_out):
    v = values.detach().requires_grad_()
    s = scores.detach().requires_grad_()
    out = fn(v, rows, s, groups, E)
    gv, gs = torch.autograd.grad(out, (v, s), grad_out.to(out.dtype))
    return out, gv, gs


def assert_matches(got, want, atol=1e-5, rtol=1e-5):
    for name, a, b in zip(("output", "grad values", "grad scores"), got, want, strict=True):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("C,E", LAYOUTS)
def test_fused_equals_reference_values_and_grads(C, E):
    values, rows, scores, groups = make_inputs(C=C, E=E)
    grad_out = torch.randn(rows.shape[0], E * values.shape[1])
    want = reference_with_grads(values, rows, scores, groups, E, grad_out)
    assert_matches(fused_with_grads(gather_pool, values, rows, scores, groups, E, grad_out), want)


def test_duplicate_rows_accumulate():
    """Every token holds only one distinct row: its gradient is the sum over all K slots, computed by hand."""
    N, Dv, T, K = 5, 4, 3, 6
    values = torch.randn(N, Dv, requires_grad=True)
    rows = torch.full((T, K), 2)
    scores = torch.randn(T, K, 1, requires_grad=True)
    out = gather_pool(values, rows, scores)
    torch.testing.assert_close(out, scores.detach().sum(1) * values.detach()[2])
    out.sum().backward()
    expected = torch.zeros(N, Dv)
    expected[2] = scores.detach().sum()
    torch.testing.assert_close(values.grad, expected)


def test_empty_groups_pool_to_zero():
    values, rows, scores, groups = make_inputs(E=4)
    groups = groups % 2 * 2  # only groups 0 and 2 are used; 1 and 3 are empty in every token
    groups[0] = 0  # token 0 uses group 0 only, so group 2 is empty there too
    grad_out = torch.randn(rows.shape[0], 4 * values.shape[1])
    got = fused_with_grads(gather_pool, values, rows, scores, groups, 4, grad_out)
    assert_matches(got, reference_with_grads(values, rows, scores, groups, 4, grad_out))
    pooled = got[0].view(rows.shape[0], 4, -1)
    assert pooled[:, 1].abs().max() == 0 and pooled[:, 3].abs().max() == 0 and pooled[0, 2].abs().max() == 0


def test_groups_none_means_group_zero():
    values, rows, scores, _ = make_inputs(E=4)
    grad_out = torch.randn(rows.shape[0], 4 * values.shape[1])
    want = reference_with_grads(values, rows, scores, None, 4, grad_out)
    assert_matches(fused_with_grads(gather_pool, values, rows, scores, None, 4, grad_out), want)


def test_non_contiguous_and_int32_inputs():
    values, rows, scores, groups = make_inputs(C=2, E=4)
    T, K = rows.shape
    values_nc = torch.stack([values, torch.randn_like(values)], 2)[:, :, 0]  # stride (2*Dv, 2): not contiguous
    rows_nc = rows.t().contiguous().t()  # transposed storage
    scores_nc = scores.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    groups_nc = groups.t().contiguous().t().int()
    assert not (values_nc.is_contiguous() or rows_nc.is_contiguous() or scores_nc.is_contiguous())
    grad_out = torch.randn(T, 4 * values.shape[1])
    want = reference_with_grads(values, rows, scores, groups, 4, grad_out)
    got = fused_with_grads(gather_pool, values_nc, rows_nc.int(), scores_nc, groups_nc, 4, grad_out)
    assert_matches(got, want)


def test_bf16_inputs_match_within_bf16_precision():
    values, rows, scores, groups = make_inputs(T=16, K=32, N=40, Dv=16, C=2, E=4, dtype=torch.bfloat16)
    grad_out = torch.randn(16, 4 * 16).bfloat16()
    got = fused_with_grads(gather_pool, values, rows, scores, groups, 4, grad_out)
    assert all(t.dtype == torch.bfloat16 for t in got)
    # bf16 has an 8-bit mantissa: sums of ~K/E products of unit-size terms carry errors of a few 1e-2
    assert_matches(got, reference_with_grads(values, rows, scores, groups, 4, grad_out), atol=6e-2, rtol=2e-2)


def test_mixed_dtypes_promote_like_the_reference():
    values, rows, scores, groups = make_inputs(C=2, E=4)
    out = gather_pool(values.bfloat16(), rows, scores, groups, 4)
    want = gather_pool_reference(values.bfloat16().float(), rows, scores, groups, 4)  # (it rejects mixed dtypes)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want)


def test_bad_inputs_name_the_argument():
    values, rows, scores, groups = make_inputs(C=2, E=4)
    with pytest.raises(ValueError, match="num_groups=2"):
        gather_pool(values, rows, scores, groups, 2)
    with pytest.raises(ValueError, match="must divide Dv"):
        gather_pool(values, rows, scores[..., :1].expand(-1, -1, 3), groups, 4)
    with pytest.raises(ValueError, match="scores must be"):
        gather_pool(values, rows, scores[:, :-1], groups, 4)
    with pytest.raises(ValueError, match="backend"):
        gather_pool(values, rows, scores, groups, 4, backend="cuda")


class ShapeRecorder(TorchDispatchMode):
    """Records every aten op called and the number of elements of every tensor it returns."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket.__name__))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(fn, values, rows, scores, groups, E):
    v, s = values.clone().requires_grad_(), scores.clone().requires_grad_()
    with ShapeRecorder() as rec:
        fn(v, rows, s, groups, E).sum().backward()
    return rec.largest


def test_no_tokens_x_k_x_dv_intermediate():
    """Forward and backward never build a [T, K, Dv]-sized tensor (the reference does, which the probe detects)."""
    T, K, N, Dv = 64, 32, 30, 16
    values, rows, scores, groups = make_inputs(T=T, K=K, N=N, Dv=Dv, C=2, E=4)
    assert largest_tensor(gather_pool_reference, values, rows, scores, groups, 4) >= T * K * Dv
    # the biggest legitimate tensors are the [T, E*Dv] output and the [T*K*C] index/weight lists
    assert largest_tensor(gather_pool, values, rows, scores, groups, 4) <= max(T * 4 * Dv, T * K * 2)


def test_no_grad_uses_the_forward_only_kernel():
    values, rows, scores, groups = make_inputs(C=2, E=4)
    values.requires_grad_()
    with torch.no_grad(), ShapeRecorder() as rec:
        out = gather_pool_torch(values, rows, scores, groups, 4)
    assert not out.requires_grad
    assert "_embedding_bag_forward_only" in rec.ops and "_embedding_bag" not in rec.ops
    torch.testing.assert_close(out, gather_pool_reference(values.detach(), rows, scores, groups, 4))


# ---- Triton kernels ----------------------------------------------------------------------------------------------

INTERPRETER_CASES = [  # (C, E, with_groups, no_grad, K, Dv): K=20 and Dc=80 take several K and column blocks
    (1, 1, False, False, 7, 8), (2, 1, True, False, 7, 8), (1, 4, True, False, 7, 8), (2, 4, True, False, 7, 8),
    (2, 3, False, False, 7, 8), (2, 4, True, True, 7, 8), (2, 9, True, False, 20, 160),
]


def check_triton_cases(gather_pool_triton) -> None:
    """Run by the interpreter subprocess below (and usable on CUDA): every case equal to the float64 reference."""
    for C, E, with_groups, no_grad, K, Dv in INTERPRETER_CASES:
        values, rows, scores, groups = make_inputs(T=3, K=K, N=6, Dv=Dv, C=C, E=E, seed=C * 10 + E)
        groups = (groups % 2 * 2 if E == 4 else groups) if with_groups else None  # E=4: groups 1, 3 empty
        grad_out = torch.randn(rows.shape[0], E * values.shape[1])
        want = reference_with_grads(values, rows, scores, groups, E, grad_out)
        if no_grad:
            with torch.no_grad():
                out = gather_pool_triton(values, rows, scores, groups, E)
            assert not out.requires_grad
            torch.testing.assert_close(out.double(), want[0], atol=1e-5, rtol=1e-5)
        else:
            assert_matches(fused_with_grads(gather_pool_triton, values, rows, scores, groups, E, grad_out), want)


def test_triton_kernels_in_the_interpreter_equal_reference():
    """The Triton kernels on CPU tensors through TRITON_INTERPRET=1 (numpy), duplicates and empty groups included.

    The interpreter has to be chosen before `triton` itself is imported (its library functions such as tl.sum are
    built interpreted or compiled at import), so the cases run in a fresh interpreter process."""
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]'): interpreter test skipped")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_retrieval as t; "
            "from ultramem.kernels.triton_retrieval import gather_pool_triton; "
            "t.check_triton_cases(gather_pool_triton); print('ok')")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_equals_torch_path(dtype):
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")
    from ultramem.kernels.triton_retrieval import gather_pool_triton

    values, rows, scores, groups = make_inputs(T=512, K=64, N=4096, Dv=128, C=2, E=4, dtype=dtype)
    values, rows, scores, groups = (t.cuda() for t in (values, rows, scores, groups))
    grad_out = torch.randn(512, 4 * 128, device="cuda", dtype=dtype)
    got = fused_with_grads(gather_pool_triton, values, rows, scores, groups, 4, grad_out)
    want = reference_with_grads(values, rows, scores, groups, 4, grad_out)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-1, rtol=2e-2)
    assert_matches(got, want, **tol)
