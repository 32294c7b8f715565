"""Triton kernels for the grouped multi-core gather-pool (the official code's `FusedLookup`), forward and backward.

Same semantics as `ultramem.kernels.reference.gather_pool_reference`:
    out[t, g*Dv + c*Dc + j] = sum_k [groups[t,k] == g] * scores[t,k,c] * values[rows[t,k], c*Dc + j]

Forward: one program per (token, core, column block). It walks the token's K slots BLOCK_K at a time, loads their
value slices [BLOCK_K, BLOCK_D] and adds them, weighted by score, into an [E, BLOCK_D] fp32 accumulator through a
one-hot group mask (the official kernel uses a one-hot [K x 8] score matrix the same way), then stores the E rows.
Backward: one program per (token, core, slot block). For each column block it reads grad_out[t, group, slice] of
its slots and (a) atomically adds score * grad_out into an fp32 value gradient (as the official kernel adds into
fp32 `main_grad`), (b) accumulates the score gradient <values[row, slice], grad_out[t, group, slice]>.
Nothing of size [T, K, Dv] is ever stored. The PyTorch path (`retrieval.gather_pool_torch`) is the reference.

With TRITON_INTERPRET=1 set before this module is imported, `triton.jit` builds interpreted kernels that run on
CPU tensors (numpy); tests use that to check the kernels without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_pool_fwd(
    values_ptr, rows_ptr, scores_ptr, groups_ptr, out_ptr,
    K, Dv, Dc, C, E,
    HAS_GROUPS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, E_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D] column within the core's slice
    d_ok = d < Dc
    e = tl.arange(0, E_PAD)
    acc = tl.zeros([E_PAD, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        row = tl.load(rows_ptr + t * K + k, mask=k_ok, other=0).to(tl.int64)  # [BLOCK_K]
        s = tl.load(scores_ptr + (t * K + k) * C + c, mask=k_ok, other=0.0).to(tl.float32)
        if HAS_GROUPS:
            g = tl.load(groups_ptr + t * K + k, mask=k_ok, other=0)
        else:
            g = tl.zeros([BLOCK_K], dtype=tl.int32)
        v = tl.load(values_ptr + row[:, None] * Dv + c * Dc + d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_D]
        w = tl.where(g[:, None] == e[None, :], s[:, None], 0.0)  # [BLOCK_K, E_PAD] one-hot group x score
        acc += tl.sum(w[:, :, None] * v[:, None, :], axis=0)  # [E_PAD, BLOCK_D]
    out = out_ptr + t * E * Dv + e[:, None] * Dv + c * Dc + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(e[:, None] < E) & d_ok[None, :])


@triton.jit
def _gather_pool_bwd(
    values_ptr, rows_ptr, scores_ptr, groups_ptr, grad_out_ptr, grad_values_ptr, grad_scores_ptr,
    K, Dv, Dc, C, E,
    HAS_GROUPS: tl.constexpr, NEED_VALUES: tl.constexpr, NEED_SCORES: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    row = tl.load(rows_ptr + t * K + k, mask=k_ok, other=0).to(tl.int64)
    s = tl.load(scores_ptr + (t * K + k) * C + c, mask=k_ok, other=0.0).to(tl.float32)
    if HAS_GROUPS:
        g = tl.load(groups_ptr + t * K + k, mask=k_ok, other=0).to(tl.int64)
    else:
        g = tl.zeros([BLOCK_K], dtype=tl.int64)
    ds = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, Dc, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = k_ok[:, None] & (d < Dc)[None, :]
        col = c * Dc + d[None, :]
        go = tl.load(grad_out_ptr + t * E * Dv + g[:, None] * Dv + col, mask=m, other=0.0).to(tl.float32)
        if NEED_SCORES:
            v = tl.load(values_ptr + row[:, None] * Dv + col, mask=m, other=0.0).to(tl.float32)
            ds += tl.sum(v * go, axis=1)
        if NEED_VALUES:
            tl.atomic_add(grad_values_ptr + row[:, None] * Dv + col, go * s[:, None], mask=m)
    if NEED_SCORES:
        tl.store(grad_scores_ptr + (t * K + k) * C + c, ds, mask=k_ok)


def _blocks(Dc: int, K: int, E: int = 1) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_K): the forward's [BLOCK_K, E_PAD, BLOCK_D] product stays at <= 4096 elements."""
    e_pad = triton.next_power_of_2(E)
    return min(triton.next_power_of_2(Dc), 64), min(triton.next_power_of_2(K), max(1, 64 // e_pad), 16)


def gather_pool_forward(values, rows, scores, groups, num_groups: int) -> torch.Tensor:
    """Forward only (inference or inside the autograd Function). Inputs already contiguous; out [T, E*Dv]."""
    T, K = rows.shape
    N, Dv = values.shape
    C = scores.shape[-1]
    Dc = Dv // C
    out = torch.empty(T, num_groups * Dv, device=values.device, dtype=values.dtype)
    if T == 0:
        return out
    BLOCK_D, BLOCK_K = _blocks(Dc, K, num_groups)
    grid = (T, C, triton.cdiv(Dc, BLOCK_D))
    _gather_pool_fwd[grid](
        values, rows, scores, rows if groups is None else groups, out, K, Dv, Dc, C, num_groups,
        HAS_GROUPS=groups is not None, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
        E_PAD=triton.next_power_of_2(num_groups),
    )
    return out


class _GatherPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, rows, scores, groups, num_groups):
        ctx.save_for_backward(values, rows, scores, groups)
        ctx.num_groups = num_groups
        return gather_pool_forward(values, rows, scores, groups, num_groups)

    @staticmethod
    def backward(ctx, grad_out):
        values, rows, scores, groups = ctx.saved_tensors
        need_values, need_scores = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        T, K = rows.shape
        N, Dv = values.shape
        C = scores.shape[-1]
        Dc = Dv // C
        grad_values = torch.zeros(N, Dv, device=values.device, dtype=torch.float32) if need_values else None
        grad_scores = torch.empty(T, K, C, device=values.device, dtype=torch.float32) if need_scores else None
        if T and K and (need_values or need_scores):
            BLOCK_D, BLOCK_K = _blocks(Dc, K)
            _gather_pool_bwd[(T, C, triton.cdiv(K, BLOCK_K))](
                values, rows, scores, rows if groups is None else groups, grad_out.contiguous(),
                grad_values if need_values else values, grad_scores if need_scores else scores,
                K, Dv, Dc, C, ctx.num_groups,
                HAS_GROUPS=groups is not None, NEED_VALUES=need_values, NEED_SCORES=need_scores,
                BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
            )
        if grad_values is not None:
            grad_values = grad_values.to(values.dtype)
        if grad_scores is not None:
            grad_scores = grad_scores.to(scores.dtype)
        return grad_values, None, grad_scores, None, None


def gather_pool_triton(values, rows, scores, groups, num_groups: int) -> torch.Tensor:
    """gather_pool on the Triton kernels; promotes dtypes like the reference and skips autograd under no_grad."""
    dtype = torch.promote_types(values.dtype, scores.dtype)
    values = values.to(dtype).contiguous()
    scores = scores.to(dtype).contiguous()
    rows = rows.contiguous()
    groups = None if groups is None or num_groups == 1 else groups.contiguous()
    if torch.is_grad_enabled() and (values.requires_grad or scores.requires_grad):
        return _GatherPool.apply(values, rows, scores, groups, num_groups)
    return gather_pool_forward(values, rows, scores, groups, num_groups)


__all__ = ["gather_pool_triton", "gather_pool_forward"]
