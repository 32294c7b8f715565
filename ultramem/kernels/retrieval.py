"""Fused value retrieval for PKM/UltraMem: gather the selected value rows, weight them by score, pool per IVE group.

    out[t, g*Dv + c*Dc + j] = sum_k [groups[t,k] == g] * scores[t,k,c] * values[rows[t,k], c*Dc + j],  Dc = Dv / C

This is the UltraMem output before the value projection: MCS (§2.4, core c weights its own column slice of each
value) and IVE (§2.3, weighted-sum pooling grouped by virtual block). PKM is C = E = 1. The semantics are exactly
those of `ultramem.kernels.reference.gather_pool_reference`; the official code calls this op `FusedLookup`.

Dispatch (`gather_pool`): CUDA tensors with Triton importable -> the Triton kernel (`triton_retrieval.py`), anything
else -> `gather_pool_torch`, one `F.embedding_bag` call that never builds the [T, K, Dv] gathered tensor:
  - the table is viewed as [N*C, Dc], so the c-th column slice of row r is row r*C + c;
  - each (token, core, group) is one bag of that view, weighted by `per_sample_weights`; entries are ordered
    (token, core, group) by sorting each token's slots by group, so that every bag is contiguous;
  - embedding_bag's own backward accumulates the value gradient per row and returns the score gradient as dot
    products <values[row, slice], grad_out[bag]>, without a [T, K, Dv] intermediate either.
Chosen by measurement (CPU thread time, 1 thread, 1024 tokens x 64 rows of a [65536, 128] table, C=2, E=4,
median of 15; torch 2.13, AMD EPYC, machine shared): forward+backward / no_grad forward in ms
    this path (sorted bags, embedding_bag's own backward)                  67 / 10
    custom autograd Function, chunked index_select + vecdot + index_add_    70 / 12   (same cost, more code)
    one bag per (token, core, group) over all K slots, masked weights     182 / 12   (E times the reads)
    naive reference                                                        256 / 91
so only this one is kept. Its backward is embedding_bag's: the [N, Dv] value gradient (zeroed, then scattered
into) and per-slot dot products for the scores; the same backward bounds a bare embedding_bag of the same rows.

Under torch.no_grad() the table is detached before the call: that sends embedding_bag down its forward-only kernel,
which skips the bookkeeping (offset2bag, bag sizes) that only its backward needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton")


def gather_pool(
    values: torch.Tensor,  # [N, Dv] physical value table
    rows: torch.Tensor,  # [T, K] long, row of V for each selected slot
    scores: torch.Tensor,  # [T, K, C] score of each slot for each MCS core
    groups: torch.Tensor | None = None,  # [T, K] long in [0, E): IVE virtual block of each slot (None -> all 0)
    num_groups: int = 1,  # E
    backend: str = "auto",  # auto (Triton on CUDA when importable, else torch) | torch | triton
) -> torch.Tensor:  # [T, E * Dv], dtype = promote(values, scores) as in the reference
    """Grouped multi-core weighted-sum pooling of value rows; differentiable wrt `values` and `scores`."""
    check_inputs(values, rows, scores, groups, num_groups)
    if backend not in BACKENDS:
        raise ValueError(f"gather_pool: backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "triton" or (backend == "auto" and values.is_cuda and triton_available()):
        from ultramem.kernels.triton_retrieval import gather_pool_triton

        return gather_pool_triton(values, rows, scores, groups, num_groups)
    return gather_pool_torch(values, rows, scores, groups, num_groups)


def gather_pool_torch(
    values: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor | None, num_groups: int
) -> torch.Tensor:
    """The PyTorch path: one F.embedding_bag over (token, core, group) bags of the table viewed as [N*C, Dc]."""
    T, K = rows.shape
    N, Dv = values.shape
    C, E = scores.shape[-1], num_groups
    Dc = Dv // C
    dtype = torch.promote_types(values.dtype, scores.dtype)
    if not torch.is_grad_enabled():
        values, scores = values.detach(), scores.detach()
    # A table of a lower precision than the scores is upcast whole (a copy of V): keep them in one dtype.
    table = values.to(dtype).contiguous().view(N * C, Dc)  # row r*C + c = column slice c of V[r]
    scores = scores.to(dtype)
    rows = rows.long()  # embedding_bag wants indices and offsets of one dtype; offsets are built as int64
    if E == 1 or groups is None:
        idx, weights = _core_major(rows, scores)  # [T, C, K] each: every (token, core) is one bag of K entries
        # contiguous: a strided weight view (C = 1 slices of [T, K, C]) sends embedding_bag down a slow loop
        pooled = F.embedding_bag(idx.reshape(T * C, K).contiguous(), table, mode="sum",
                                 per_sample_weights=weights.reshape(T * C, K).contiguous())  # [T*C, Dc]
        out = pooled.view(T, C * Dc)
        return out if E == 1 else F.pad(out, (0, (E - 1) * Dv)).view(T, E * Dv)  # groups None: all in group 0
    perm, start = _sort_by_group(groups.long().contiguous(), E)  # [T, K], [T, E]
    idx, weights = _core_major(rows.gather(1, perm), scores.gather(1, perm.unsqueeze(-1).expand(T, K, C)))
    # bag (t, c, g) starts at t*C*K + c*K + start[t, g]; empty groups are empty bags, which pool to zero
    base = torch.arange(T * C, device=rows.device).view(T, C, 1) * K
    offsets = (base + start.unsqueeze(1)).reshape(T * C * E)
    pooled = F.embedding_bag(idx.reshape(-1).contiguous(), table, offsets, mode="sum",
                             per_sample_weights=weights.reshape(-1).contiguous())  # [T*C*E, Dc]
    return pooled.view(T, C, E, Dc).transpose(1, 2).reshape(T, E * Dv)


def _core_major(rows: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [T, K], scores [T, K, C] -> row ids of the [N*C, Dc] view and their weights, both [T, C, K]."""
    C = scores.shape[-1]
    if C == 1:
        return rows.unsqueeze(1), scores.transpose(1, 2)
    cores = torch.arange(C, device=rows.device).view(1, C, 1)
    return rows.unsqueeze(1) * C + cores, scores.transpose(1, 2)


def _sort_by_group(groups: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each token's slots by group: (perm [T, K] with groups.gather(1, perm) sorted, start [T, E] = first
    sorted position of each group). The order within a group is free (it only changes the summation order), so
    the cheaper unstable sort is used; CPU and CUDA sorts are deterministic either way."""
    try:
        counts = torch.zeros(groups.shape[0], E, dtype=groups.dtype, device=groups.device)
        counts.scatter_add_(1, groups, torch.ones_like(groups))  # [T, E]; raises on a group outside [0, E)
    except RuntimeError as err:
        raise ValueError(f"gather_pool: groups must lie in [0, num_groups={E}): {err}") from None
    return groups.sort(dim=1).indices, counts.cumsum(1) - counts


def check_inputs(
    values: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor | None, num_groups: int
) -> None:
    """Shape/dtype checks that name the argument and what it must be (the kernels assume them)."""
    if values.dim() != 2:
        raise ValueError(f"gather_pool: values must be [N, Dv], got shape {tuple(values.shape)}")
    if rows.dim() != 2 or rows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"gather_pool: rows must be an integer [T, K] tensor, got {rows.dtype} {tuple(rows.shape)}")
    if scores.dim() != 3 or scores.shape[:2] != rows.shape:
        raise ValueError(f"gather_pool: scores must be [T, K, C] with [T, K] = rows.shape {tuple(rows.shape)}, "
                         f"got {tuple(scores.shape)}")
    C = scores.shape[-1]
    if C < 1 or values.shape[1] % C:
        raise ValueError(f"gather_pool: the number of cores C = scores.shape[-1] = {C} must divide Dv = "
                         f"values.shape[1] = {values.shape[1]}")
    if num_groups < 1:
        raise ValueError(f"gather_pool: num_groups must be >= 1, got {num_groups}")
    if groups is not None and (groups.shape != rows.shape or groups.dtype not in (torch.int64, torch.int32)):
        raise ValueError(f"gather_pool: groups must be an integer tensor shaped like rows {tuple(rows.shape)}, "
                         f"got {groups.dtype} {tuple(groups.shape)}")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["BACKENDS", "gather_pool", "gather_pool_torch", "check_inputs", "triton_available"]
