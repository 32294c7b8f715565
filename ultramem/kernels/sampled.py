"""Sampled dot products with a sparse backward (an SDDMM): the scores of the few selected keys, differentiable.

    out[b, k] = <q[b], table[idx[b, k]]>        q [B, D], table [M, D], idx [B, K] -> out [B, K]

The memory layers score every key densely (one matmul) to choose the top-m, but only the m winners' scores carry
gradient. Taking them with `S.gather(...)` from a differentiable S makes the backward zero-fill an S-sized gradient
and run the score matmul's backward densely ([B, M] x [M, D] twice), although all but K of every M entries are zero.
Here the backward touches only the B*K selected entries:

    grad_q     = embedding_bag(idx, table, per_sample_weights=grad_out)          one bag of K rows per b  [B, D]
    grad_table = the same entries sorted by table row (CSR): one bag per table row, summing grad_out * q[b]  [M, D]
                 (rows never selected are empty bags, written as zeros in the same pass)

The forward either returns `values` (the same numbers, gathered from the dense score matmul that the selection
needed anyway, so the result is bitwise the dense path's) or computes the dots itself, fused, without a [B, K, D]
gathered tensor (aten's `_embedding_bag_per_sample_weights_backward` is exactly this dot product).
tests/test_sampled.py checks values and gradients against the dense matmul + gather and with gradcheck.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampled_dot(q: torch.Tensor, table: torch.Tensor, idx: torch.Tensor,
                values: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, D], table [M, D], idx [B, K] (int, rows of table) -> [B, K] = <q[b], table[idx[b, k]]>.

    `values` [B, K]: those numbers already computed (no gradient); returned as the forward. Differentiable wrt q and
    table with the sparse backward above; computed in promote(q, table) (the result keeps `values`' dtype)."""
    dtype = torch.promote_types(q.dtype, table.dtype)
    q, table = q.to(dtype), table.to(dtype)
    if torch.is_grad_enabled() and (q.requires_grad or table.requires_grad):
        return _SampledDot.apply(q, table, idx, values)
    return values if values is not None else dots(q, table, idx)


def dots(q: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The forward alone, fused: [B, K] without gathering table rows into a [B, K, D] tensor."""
    B, K = idx.shape
    flat = idx.reshape(-1).long()
    bag = torch.arange(B, device=idx.device).repeat_interleave(K)  # entry b*K + k belongs to row b
    offsets = torch.arange(0, B * K, K, device=idx.device)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        q.detach().contiguous(), table.detach().contiguous(), flat, offsets, bag, 0, -1)  # mode 0 = sum
    return out.view(B, K)


def csr_transpose_sum(idx: torch.Tensor, bag: torch.Tensor, weights: torch.Tensor, src: torch.Tensor,
                      rows: int) -> torch.Tensor:
    """out[j] = sum over entries e with idx[e] = j of weights[e] * src[bag[e]]  ([rows, D]), as one embedding_bag
    whose bags are the table rows: the entries sorted by idx once, so each output row is written once, in order,
    and rows no entry names come out zero without a separate fill. idx, bag, weights [E]; src [S, D]."""
    order = (idx.int() if rows < 2**31 else idx).argsort()  # int32 keys sort in half the time of int64
    counts = torch.bincount(idx.long(), minlength=rows)
    return F.embedding_bag(bag.index_select(0, order), src, counts.cumsum(0) - counts, mode="sum",
                           per_sample_weights=weights.index_select(0, order).to(src.dtype))  # index_select: ~4x x[order]


class _SampledDot(torch.autograd.Function):
    """out[b, k] = <q[b], table[idx[b, k]]>; the backward visits only the B*K entries (module docstring)."""

    @staticmethod
    def forward(ctx, q, table, idx, values):  # noqa: ANN001, ANN205
        ctx.save_for_backward(q, table, idx)
        return values.detach().clone() if values is not None else dots(q, table, idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, table, idx = ctx.saved_tensors
        B, K = idx.shape
        g = grad_out.to(q.dtype).contiguous()  # [B, K]
        grad_q = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_q = F.embedding_bag(idx.long(), table.detach(), mode="sum", per_sample_weights=g)  # [B, D]
        if ctx.needs_input_grad[1]:
            bag = torch.arange(B, device=idx.device).repeat_interleave(K)
            grad_table = csr_transpose_sum(idx.reshape(-1), bag, g.reshape(-1), q.detach(), table.shape[0])
        return grad_q, grad_table, None, None


__all__ = ["sampled_dot", "dots", "csr_transpose_sum"]
