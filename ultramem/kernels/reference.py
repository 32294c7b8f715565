"""Naive reference implementations used by tests. Slow, obvious and exact; never used on a hot path."""

from __future__ import annotations

import torch


def gather_pool_reference(
    values: torch.Tensor,  # [N, Dv] physical value table
    rows: torch.Tensor,  # [T, K] long, row of V for each selected slot
    scores: torch.Tensor,  # [T, K, C] score of each selected slot for each MCS core
    groups: torch.Tensor | None = None,  # [T, K] long in [0, E): IVE virtual block of each slot (None -> all 0)
    num_groups: int = 1,  # E
) -> torch.Tensor:  # [T, E * Dv]
    """out[t, g*Dv + c*Dc + j] = sum_k [groups[t,k] == g] * scores[t,k,c] * values[rows[t,k], c*Dc + j], Dc = Dv/C.

    This is the grouped, multi-core weighted-sum pooling of UltraMem (IVE + MCS). PKM is the case C = E = 1.
    It materialises [T, K, Dv] on purpose: it is the spec the fused kernels are tested against.
    """
    T, K = rows.shape
    N, Dv = values.shape
    C = scores.shape[-1]
    Dc = Dv // C
    gathered = values[rows]  # [T, K, Dv]
    weighted = gathered.view(T, K, C, Dc) * scores.unsqueeze(-1)  # [T, K, C, Dc]
    weighted = weighted.reshape(T, K, Dv)
    if groups is None:
        groups = torch.zeros_like(rows)
    onehot = torch.nn.functional.one_hot(groups, num_groups).to(values.dtype)  # [T, K, E]
    out = torch.einsum("tke,tkd->ted", onehot, weighted)  # [T, E, Dv]
    return out.reshape(T, num_groups * Dv)
