"""Fused value retrieval for PKM/UltraMem: gather the selected value rows, weight them by score, pool per IVE group.

    out[t, g*Dv + c*Dc + j] = sum_k [groups[t,k] == g] * scores[t,k,c] * values[rows[t,k], c*Dc + j],  Dc = Dv / C

This is the UltraMem output before the value projection: MCS (§2.4, core c weights its own column slice of each
value) and IVE (§2.3, weighted-sum pooling grouped by virtual block). PKM is C = E = 1. The semantics are exactly
those of `ultramem.kernels.reference.gather_pool_reference`; the official code calls this op `FusedLookup`.

Dispatch (`gather_pool`): CUDA tensors with Triton importable -> the Triton kernel (`triton_retrieval.py`), anything
else -> `gather_pool_torch`, one `F.embedding_bag` call that never builds the [T, K, Dv] gathered tensor:
  - the table is viewed as [N*C, Dc], so the c-th column slice of row r is row r*C + c;
  - each (token, group, core) is one bag of that view, weighted by `per_sample_weights`; bags come in the output's
    own [T, E, C, Dc] order, so the pooled rows need no transpose (`bag_layout`: a counting layout after one small
    per-token sort of the groups, in int32 index arithmetic);
  - the backward (`_EmbeddingBagSum`) sorts the entries by table row once and uses that order twice: the table
    gradient is a second embedding_bag whose bags are the table rows, and the score gradients
    <values[row, slice], grad_out[bag]> come from aten's `_embedding_bag_per_sample_weights_backward` run over the
    row-sorted entries. No [T, K, Dv] intermediate either.
Chosen by measurement (process CPU time, 1 thread, median / min of 25 interleaved calls; torch 2.13, AMD EPYC,
machine shared), forward+backward of 1024 tokens, C=2, E=4, in ms:
                                            32 rows of [16384, 256]   64 rows of [65536, 128]
    this path                                    21 / 16.5                  74 / 54
    sorted (token, core, group) bags with
      embedding_bag's own backward                36 / 28                    92 / 67
    a bare embedding_bag of the same rows         19.5 / 17                  68 / 54
Earlier candidates, measured on the second pattern (fwd+bwd / no_grad forward): a chunked index_select + vecdot +
index_add_ Function 70 / 12 (no faster), one bag per (token, core, group) over all K slots with masked weights
182 / 12 (E times the reads), the naive reference 256 / 91.

Under torch.no_grad() the table is detached before the call: that sends embedding_bag down its forward-only kernel,
which skips the bookkeeping (offset2bag, bag sizes) that only its backward needs.

Row-sparse table gradients (`train.value_updates: rows_read`, `ultramem.row_sparse`): a table Parameter marked
`row_sparse_grad = True` gets a sparse COO gradient [N, Dv] that holds only the rows read in this call (coalesced,
rows ascending) instead of a dense one with zeros everywhere else. The torch path computes it in the same pass (the
table-row bags of the backward, restricted to the rows that occur); a marked table always takes the torch path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton")


def gather_pool(
    values: torch.Tensor,  # [N, Dv] physical value table
    rows: torch.Tensor,  # [T, K] int64 or int32, row of V for each selected slot
    scores: torch.Tensor,  # [T, K, C] score of each slot for each MCS core
    groups: torch.Tensor | None = None,  # [T, K] int64/int32 in [0, E): IVE block of each slot (None -> all 0)
    num_groups: int = 1,  # E
    backend: str = "auto",  # auto (Triton on CUDA when importable, else torch) | torch | triton
) -> torch.Tensor:  # [T, E * Dv], dtype = promote(values, scores) as in the reference
    """Grouped multi-core weighted-sum pooling of value rows; differentiable wrt `values` and `scores`."""
    check_inputs(values, rows, scores, groups, num_groups)
    if backend not in BACKENDS:
        raise ValueError(f"gather_pool: backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    sparse_grad = bool(getattr(values, "row_sparse_grad", False))
    if backend == "triton" or (backend == "auto" and values.is_cuda and triton_available() and not sparse_grad):
        # lazy: Triton is an optional dependency (pip install -e '.[gpu]')
        from ultramem.kernels.triton_retrieval import gather_pool_triton

        return gather_pool_triton(values, rows, scores, groups, num_groups)
    return gather_pool_torch(values, rows, scores, groups, num_groups, sparse_grad)


def gather_pool_torch(
    values: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor | None, num_groups: int,
    sparse_grad: bool = False,
) -> torch.Tensor:
    """The PyTorch path: one weighted-sum embedding_bag over (token, group, core) bags of the table as [N*C, Dc]."""
    T, K = rows.shape
    N, Dv = values.shape
    C, E = scores.shape[-1], num_groups
    dtype = torch.promote_types(values.dtype, scores.dtype)
    if not torch.is_grad_enabled():
        values, scores = values.detach(), scores.detach()
    # A table of a lower precision than the scores is upcast whole (a copy of V): keep them in one dtype.
    table = values.to(dtype).contiguous()  # [N, Dv], read as [N*C, Dc]: row r*C + c = column slice c of V[r]
    grouped = groups is not None and E > 1
    itype = torch.int32 if max(T * K * C, N * C) < 2**31 else torch.int64
    idx, weights, offsets = bag_layout(rows, scores.to(dtype), groups if grouped else None, E, itype)
    pooled = embedding_bag_sum(table, idx, offsets, weights, C, sparse_grad).view(T, -1)  # [T, E*Dv] (or [T, Dv] ungrouped)
    return pooled if grouped or E == 1 else F.pad(pooled, (0, (E - 1) * Dv))  # groups None: all in group 0


def bag_layout(rows: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor | None, E: int,
               itype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, group, core) bags, so that bag b pools into row b of [T*E*C, Dc], which is the result's layout.

    rows [T, K], scores [T, K, C], groups [T, K] or None (one group) -> idx [T*K*C] (rows of the [N*C, Dc] view),
    weights [T*K*C] (differentiable wrt scores), offsets [T*E*C] (or [T*C]); indices in `itype` (int32 halves the
    index arithmetic; embedding_bag takes either). A token's slots are laid out by group: group g starts at entry
    start[g]*C and holds count[g] entries per core. The order within a group is free (it only changes the order
    of summation), so the slots are placed by an unstable sort of their groups.
    """
    T, K, C = scores.shape
    dev = rows.device
    core = torch.arange(C, dtype=itype, device=dev)
    token_base = torch.arange(T, dtype=itype, device=dev).view(T, 1) * (K * C)  # [T, 1] first entry of token t
    rows = rows.to(itype)
    if groups is None:  # bag (t, c) = the K slots of token t, weighted by core c's scores
        idx = rows.unsqueeze(1) * C + core.view(1, C, 1)  # [T, C, K]
        return idx.reshape(-1), scores.transpose(1, 2).reshape(-1), (token_base + core * K).reshape(-1)
    groups = groups.to(itype)
    try:
        counts = torch.zeros(T, E, dtype=itype, device=dev)
        counts.scatter_add_(1, groups.long(), torch.ones_like(groups))  # [T, E]; raises on a group outside [0, E)
    except RuntimeError as err:
        raise ValueError(f"gather_pool: groups must lie in [0, num_groups={E}): {err}") from None
    start = counts.cumsum(1, dtype=itype) - counts  # [T, E] first sorted slot of each group
    perm = groups.sort(dim=1).indices  # [T, K]
    slot = torch.empty(T, K, dtype=itype, device=dev)
    slot.scatter_(1, perm, torch.arange(K, dtype=itype, device=dev).expand(T, K))  # sorted position of each slot
    g = groups.long()
    # slot k's entry for core c: start[g_k]*C + c*count[g_k] + rank_k, with rank_k = slot_k - start[g_k]
    base = token_base + slot + start.gather(1, g) * (C - 1)  # [T, K]
    dest = (base.unsqueeze(-1) + counts.gather(1, g).unsqueeze(-1) * core).reshape(-1).long()  # [T*K*C]
    idx = torch.empty(T * K * C, dtype=itype, device=dev).scatter_(0, dest, (rows.unsqueeze(-1) * C + core).reshape(-1))
    weights = scores.new_empty(T * K * C).scatter(0, dest, scores.reshape(-1))
    offsets = token_base.unsqueeze(-1) + (start * C).unsqueeze(-1) + counts.unsqueeze(-1) * core  # [T, E, C]
    return idx, weights, offsets.reshape(-1)


def embedding_bag_sum(table: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor,
                      C: int = 1, sparse_grad: bool = False) -> torch.Tensor:
    """F.embedding_bag(idx, table as [N*C, Dc], offsets, mode='sum', per_sample_weights=weights) [bags, Dc] for a
    contiguous [N, Dv = C*Dc] table, with the backward of `_EmbeddingBagSum` when a gradient is needed, and
    embedding_bag's forward-only kernel otherwise. sparse_grad makes the table gradient a sparse COO [N, Dv] of
    the rows read (every read of a row reads all its C slices, as bag_layout lays them out)."""
    if torch.is_grad_enabled() and (table.requires_grad or weights.requires_grad):
        return _EmbeddingBagSum.apply(table, idx, offsets, weights, C, sparse_grad)
    N, Dv = table.shape
    return F.embedding_bag(idx, table.detach().view(N * C, Dv // C), offsets, mode="sum",
                           per_sample_weights=weights.detach())


class _EmbeddingBagSum(torch.autograd.Function):
    """Weighted-sum embedding_bag whose backward visits the entries in table-row order.

    embedding_bag's own CPU backward zero-fills the [rows, Dc] table gradient, then accumulates entry by entry, and
    computes the weight gradients <table[idx_e], grad_out[bag_e]> in entry order (random table rows). Here one
    argsort of the indices serves both: the table gradient is a second embedding_bag, whose bags are the table rows
    (CSR: the entries of row j, weighted, summed from grad_out; rows never selected are empty bags, written as zeros
    in the same pass), and the weight gradients are computed in sorted order, so each table row is read once and
    in sequence. Nothing larger than the table gradient and the entry lists is allocated.
    """

    @staticmethod
    def forward(ctx, table, idx, offsets, weights, C, sparse_grad):  # noqa: ANN001, ANN205
        N, Dv = table.shape
        view = table.detach().view(N * C, Dv // C)
        ctx.save_for_backward(view, idx, offsets, weights)
        ctx.C, ctx.sparse_grad = C, sparse_grad
        return F.embedding_bag(idx, view, offsets, mode="sum", per_sample_weights=weights.detach())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        table, idx, offsets, weights = ctx.saved_tensors
        order = idx.argsort()  # before the int64 copy: sorting int32 keys takes half the time
        grad_out, idx, offsets = grad_out.contiguous(), idx.long(), offsets.long()
        sizes = torch.diff(offsets, append=offsets.new_tensor([idx.numel()]))
        bag = torch.repeat_interleave(torch.arange(offsets.numel(), device=idx.device), sizes)  # entry -> bag
        idx_sorted, bag_sorted = idx.index_select(0, order), bag.index_select(0, order)  # index_select: ~4x x[order]
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0] and ctx.sparse_grad:
            grad_table = _rows_read_grad(grad_out, idx_sorted, bag_sorted, weights.index_select(0, order),
                                         table.shape, ctx.C)
        elif ctx.needs_input_grad[0]:
            counts = torch.bincount(idx, minlength=table.shape[0])
            grad_table = F.embedding_bag(bag_sorted, grad_out, counts.cumsum(0) - counts, mode="sum",
                                         per_sample_weights=weights.index_select(0, order).to(grad_out.dtype))
            grad_table = grad_table.view(table.shape[0] // ctx.C, -1)
        if ctx.needs_input_grad[3]:
            dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out, table.detach(), idx_sorted, offsets, bag_sorted, 0, -1)  # mode 0 = sum, no padding_idx
            grad_weights = torch.empty_like(dots).scatter_(0, order, dots)
        return grad_table, None, None, grad_weights, None, None


def _rows_read_grad(grad_out: torch.Tensor, idx_sorted: torch.Tensor, bag_sorted: torch.Tensor,
                    weights_sorted: torch.Tensor, view_shape: torch.Size, C: int) -> torch.Tensor:
    """The table gradient as a sparse COO [N, C*Dc] holding only the rows read: one bag per distinct view row
    (entries sorted by view row, so each distinct row is one run), the C slices of a physical row side by side."""
    view_rows, counts = torch.unique_consecutive(idx_sorted, return_counts=True)  # [U*C] ascending
    if view_rows.numel() % C:
        raise RuntimeError("gather_pool: a value row was read without all its core slices; a row-sparse gradient "
                           "needs every slice of each row read (bag_layout's layout)")
    block = F.embedding_bag(bag_sorted, grad_out, counts.cumsum(0) - counts, mode="sum",
                            per_sample_weights=weights_sorted.to(grad_out.dtype))  # [U*C, Dc]
    N, Dc = view_shape[0] // C, view_shape[1]
    rows = (view_rows[::C] // C).unsqueeze(0)  # [1, U] physical rows
    return torch.sparse_coo_tensor(rows, block.view(-1, C * Dc), (N, C * Dc), is_coalesced=True,
                                   check_invariants=False)


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
        import triton  # noqa: F401  (lazy: Triton is an optional dependency)
    except ImportError:
        return False
    return True


__all__ = ["BACKENDS", "gather_pool", "gather_pool_torch", "check_inputs", "triton_available"]
