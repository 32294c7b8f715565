"""Memory parallelism: value tables split over a group of P ranks (UltraMem paper §5 and official
`memory_parallel.py`; Memory+'s "parallel memory"; UltraMemV2's `vertical_parallel`).

A table V [N, D_v] is too big to replicate at paper scale (6 x 3.3G rows x cols for UltraMem-1.6B-x12), and
pipeline stages cannot hold one whole layer, so each table is split over a memory-parallel group. Every rank keeps
its own tokens; only indices, scores and pooled vectors travel, and pooling happens BEFORE the pooled vectors are
sent back (the point of the fused lookup-reduce). With T tokens per rank and K = H * top_m slots per token:

dim (dimension-wise, the official `vertical_parallel`): rank j holds all N rows x the column slice
    [j D_v / P, (j+1) D_v / P), a `DTensor` placed (Replicate, Shard(1)) on the (mdp, mp) mesh.
      1. all-gather the slot ids (int32 virtual id = group * N + row)          4 T K (P-1)   bytes sent
      2. all-to-all the scores: each rank gets only the MCS core(s) that weight its columns (the official
         `MultiHeadGatherScore`; one core when P is a multiple of h)           s T K c (P-1)
      3. pool locally: gather_pool(V slice, ...) for the P T gathered tokens -> [P T, E D_v / P]
      4. all-to-all the pooled slices back to each token's rank, concatenated per IVE group
                                                                                s T E D_v (P-1) / P
         (the paper reduce-scatters here; the official code all-to-alls the disjoint column slices, which sends
         the same bytes and needs no reduction, and this follows the official code)
    = the paper's 4 bs topm (P-1) + 2 bs topm (P-1) + 2 bs v_dim (P-1) / P with s = 2 (bf16), c = 1 and the
    pooled width v_dim = E D_v. The backward sends the same amounts back (score and pooled gradients).

row (number-wise): rank j holds rows [j ceil(N/P), (j+1) ceil(N/P)) x all columns, placed (Replicate, Shard(0)).
      1. each slot goes to the rank owning its row: all-to-all of the local slot ids    4 T K (P-1) / P (uniform rows)
         with their scores                                                             s T K C (P-1) / P
         and, per token, how many of its slots each owner gets                         4 T (P-1)
      2. the owner pools its slots per (token, IVE group) -> partial sums [T, E D_v] for every source rank
      3. all-to-all the partial sums back; the token's rank adds the P partials     s T E D_v (P-1)
    The paper's number-wise formula 4 bs topm (P-1)/P + 2 bs topm v_dim (P-1)/P returns every looked-up row
    unpooled; pooling first sends E D_v P instead of K D_v values per token, less whenever E P < K.
`ultramem.layout.memory_parallel_bytes` gives both the paper's and these counts; the layers record what they
actually send in a `CommStats` (tests compare the two).

The value gradients stay sharded: each rank's shard receives the gradient of every token of its group, so the only
other reduction is over the ranks holding the same shard (the "memory data-parallel" group, strided ranks), done by
`comm.reduce_gradients` after the backward, exactly as the official code all-reduces the values' `main_grad` over that
group only.

The other families' tables (`Family.parallel.memory_tables`) are split the same way; their layers read them through
a swappable op (`layer.gather_pool`, `layer.peer_read`):
  Memory+ (one table shared by every memory layer, or one per layer): the same `DimParallelPool` /
    `RowParallelPool` with C = E = 1 (the softmax weight is the score); Meta's Shard(1) parallel memory is dim.
    The SiLU gate and W2 then run locally on the whole pooled row.
  UltraMemV2 (dim only): values [Nall, Dv] and pre_values [Nall, Dp] split by columns, `ColumnParallelPeerRead`:
      1. all-gather the slot rows (int32)                                       4 T K (P-1)
      2. all-to-all the pre-value inputs p [T, Dp] by column shard             s T Dp (P-1)/P
      3. partial pre-scores <p slice, P[row] slice> for the P T tokens, all-to-all back to each token's rank,
         which sums the P partials: a_k (then GELU with glu_act, only after the full sum)   s T K (P-1)
      4. weights w_kc = a_k s_kc: all-to-all to each rank the cores of its columns (as dim step 2)   s T K c (P-1)
      5. pool the value column slice for the P T tokens, all-to-all back, concatenate (as dim steps 3, 4)
                                                                                s T Dv (P-1)/P
    The official code all-gathers the scores and all-reduces the partial pre-scores ([P T, K] on every rank);
    sending each token's partials to its own rank and only the weights each rank needs sends less (a ring
    all-reduce alone sends 2 s T K (P-1)) and gives the same sums. `ultramem.layout.memory_parallel_bytes` and
    `memory_parallel_traffic` count all of it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ultramem.errors import ConfigError
from ultramem.families import families
from ultramem.kernels.retrieval import gather_pool
from ultramem.layout import memory_parallel_cores
from ultramem.parallel.comm import CommStats, all_gather, all_to_all, shard_parameter

MODES = ("dim", "row")


def shard_value_tables(model: nn.Module, mode: str, mesh: DeviceMesh,
                       stats: CommStats | None = None) -> list[nn.Parameter]:
    """Split every value table that memory parallelism may split (the tables of the families whose
    `parallel.memory_parallel` is set: UltraMem layers', Memory+ and UltraMemV2 tables) over mesh["mp"], and swap
    the matching op into every layer that reads one (`gather_pool`, or `peer_read` for UltraMemV2).

    `mesh` is the 2-D (mdp, mp) mesh; every rank must hold the same full tables (same seed) on entry. A table
    shared by several layers is split once. Returns the new value parameters: `DTensor`s on `mesh`, whose
    gradients `reduce_gradients` finishes after the backward.
    """
    if mode not in MODES:
        raise ConfigError(f"parallel.memory_parallel.mode: {mode!r}; allowed: none | {' | '.join(MODES)}")
    group = mesh.get_group("mp")
    kinds = [(f.parallel.value_module(), f.parallel.value_params) for f in families() if f.parallel.memory_parallel]
    params, tables = [], set()
    for module in model.modules():  # each module once, a shared table included
        names = next((names for kind, names in kinds if isinstance(module, kind)), None)
        if names is None:
            continue
        for name in names:
            setattr(module, name, shard_parameter(getattr(module, name), mesh, 1 if mode == "dim" else 0))
            params.append(getattr(module, name))
        tables.add(id(module))
    for layer in model.modules():  # the layers reading a split table: the table's own (UltraMem) or `table`
        table = layer if id(layer) in tables else getattr(layer, "table", None)
        reads = hasattr(layer, "gather_pool") or hasattr(layer, "peer_read")
        if table is None or id(table) not in tables or not reads:
            continue
        N, Dv = table.values.shape
        C = getattr(layer.cfg, "num_cores", 1)
        if hasattr(layer, "peer_read"):  # UltraMemV2: pre-values and values, columns only
            if mode != "dim":
                raise ConfigError(f"parallel.memory_parallel.mode: {mode!r} is not implemented for UltraMemV2 "
                                  "tables; set mode: dim")
            Dp, P = table.pre_values.shape[1], mesh.size(1)
            if Dp % P:
                raise ConfigError(f"parallel.memory_parallel.size: {P} must divide model.memory_v2.pre_value_dim "
                                  f"({Dp}) in mode 'dim'; use a divisor of it")
            layer.peer_read = ColumnParallelPeerRead(group, N, Dv, C, stats)
        else:
            layer.gather_pool = DimParallelPool(group, N, Dv, C, stats) if mode == "dim" else RowParallelPool(
                group, N, stats)
    return params


def _comm_dtype(ref: torch.Tensor) -> torch.dtype:
    """Scores and pooled vectors travel in the autocast dtype (bf16 on GPU, as the official kernels), else as is."""
    dev = ref.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else ref.dtype


def _token_counts(T: int, group: dist.ProcessGroup, device: torch.device, stats: CommStats | None) -> list[int]:
    """Tokens on each rank of the group (equal in training; the knowledge probe's last batch may differ)."""
    counts = torch.tensor([T], dtype=torch.int64, device=device)
    gathered = all_gather(counts, group, stats, "meta")
    return gathered.view(-1).tolist()


class _ColumnSplit:
    """What the column-split ops share: the group, the padding to the longest rank, and steps 2-4 of dim."""

    def __init__(self, group: dist.ProcessGroup, num_values: int, value_dim: int, num_cores: int,
                 stats: CommStats | None = None):
        self.group, self.stats = group, stats
        self.P = dist.get_world_size(group)
        self.N, self.Dv = num_values, value_dim
        c = memory_parallel_cores(value_dim, num_cores, self.P)
        # The MCS cores whose columns rank j holds (core k weights columns [k Dv/h, (k+1) Dv/h)).
        self.cores = [list(range(j * c, (j + 1) * c)) if c > 1 else [j * num_cores // self.P] for j in range(self.P)]

    def gather_rows(self, vid: torch.Tensor) -> tuple[torch.Tensor, int]:
        """vid [T, K] int32 (this rank's slots) -> (the group's slots [P Tmax, K] int32, Tmax); padding rows 0."""
        T = vid.shape[0]
        Tmax = max(_token_counts(T, self.group, vid.device, self.stats))
        vids = all_gather(F.pad(vid, (0, 0, 0, Tmax - T)), self.group, self.stats, "index")  # [P, Tmax, K]
        return vids.view(self.P * Tmax, -1), Tmax

    def pool(self, local: torch.Tensor, vids: torch.Tensor, weights: torch.Tensor, T: int, E: int, comm: torch.dtype,
             backend: str) -> torch.Tensor:
        """local [N, Dv/P] column slice, vids [P Tmax, K] group slots (group * N + row), weights [Tmax, K, C] of
        this rank's padded tokens (padding weighs 0) -> this rank's pooled rows [T, E Dv] (all column slices)."""
        P, N, (Tmax, K, _) = self.P, self.N, weights.shape
        # to rank j: the weights of the cores that weight its columns
        send = torch.stack([weights[..., idx] for idx in self.cores])  # [P, Tmax, K, c]
        c = send.shape[-1]
        recv = all_to_all(send.to(comm).view(P * Tmax, K * c), [Tmax] * P, [Tmax] * P, self.group, self.stats,
                          "score")  # [P Tmax, K c]: block j = rank j's tokens
        pooled = gather_pool(local, vids % N, recv.view(P * Tmax, K, c).to(local.dtype), vids // N, E,
                             backend)  # [P Tmax, E Dv/P]
        back = all_to_all(pooled.to(comm), [Tmax] * P, [Tmax] * P, self.group, self.stats,
                          "pooled")  # [P Tmax, E Dv/P]: block j = column slice j of my tokens
        out = back.view(P, Tmax, E, self.Dv // P)[:, :T].permute(1, 2, 0, 3)  # [T, E, P, Dv/P]
        return out.reshape(T, E * self.Dv)


class DimParallelPool(_ColumnSplit):
    """`gather_pool` over a table split by columns; same signature and result as the single-process op."""

    def __call__(self, values: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor,
                 groups: torch.Tensor | None = None, num_groups: int = 1, backend: str = "auto") -> torch.Tensor:
        T = rows.shape[0]
        out_dtype, comm = torch.promote_types(values.dtype, scores.dtype), _comm_dtype(scores)
        vid = rows.to(torch.int32) if groups is None else (groups.to(torch.int32) * self.N + rows.to(torch.int32))
        vids, Tmax = self.gather_rows(vid)  # [P Tmax, K]
        weights = F.pad(scores, (0, 0, 0, 0, 0, Tmax - T))  # [Tmax, K, C]: padded tokens score 0, pool nothing
        return self.pool(values.to_local(), vids, weights, T, num_groups, comm, backend).to(out_dtype)


class ColumnParallelPeerRead(_ColumnSplit):
    """UltraMemV2's read (`ultramem.memory.ultramem_v2.peer_read`) over values and pre_values split by columns;
    same signature and result as the single-process op (module docstring: the five steps)."""

    def __call__(self, values: torch.Tensor, pre_values: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor,
                 p: torch.Tensor, glu_act: bool = False) -> torch.Tensor:
        """rows [T, K], scores [T, K, C], p [T, Dp] (pre-value input) -> pooled [T, Dv]."""
        P, (T, K) = self.P, rows.shape
        pre_local = pre_values.to_local()  # [N, Dp/P]
        dtype, comm = torch.promote_types(values.dtype, scores.dtype), _comm_dtype(scores)
        vids, Tmax = self.gather_rows(rows.to(torch.int32))  # [P Tmax, K]
        p = F.pad(p, (0, 0, 0, Tmax - T))  # [Tmax, Dp]: padded tokens have a zero input, so a = 0
        Dps = p.shape[1] // P
        send = p.view(Tmax, P, Dps).transpose(0, 1).reshape(P * Tmax, Dps)  # block j: column slice j
        p_recv = all_to_all(send.to(comm), [Tmax] * P, [Tmax] * P, self.group, self.stats,
                            "pre_input")  # [P Tmax, Dp/P]: block j = my columns of rank j's tokens
        pre = F.embedding(vids, pre_local)  # [P Tmax, K, Dp/P]
        part = torch.bmm(pre, p_recv.to(pre.dtype).unsqueeze(-1)).squeeze(-1)  # [P Tmax, K] partial <p, P[row]>
        back = all_to_all(part.to(comm), [Tmax] * P, [Tmax] * P, self.group, self.stats,
                          "pre_score")  # [P Tmax, K]: block j = rank j's partials for my tokens
        a = back.view(P, Tmax, K).to(dtype).sum(0)  # [Tmax, K]: the full pre-score
        if glu_act:
            a = F.gelu(a)  # after the sum over column shards
        w = a.unsqueeze(-1) * F.pad(scores, (0, 0, 0, 0, 0, Tmax - T)).to(dtype)  # [Tmax, K, C]
        return self.pool(values.to_local(), vids, w, T, 1, comm, "auto").to(dtype)


class RowParallelPool:
    """`gather_pool` over a table split by rows (torch.chunk blocks of ceil(N/P)); same result as one process."""

    def __init__(self, group: dist.ProcessGroup, num_values: int, stats: CommStats | None = None):
        self.group, self.stats = group, stats
        self.P = dist.get_world_size(group)
        self.N, self.per = num_values, math.ceil(num_values / self.P)
        if self.per * (self.P - 1) >= num_values:
            raise ConfigError(f"parallel.memory_parallel.size: {self.P} leaves a rank without value rows in mode "
                              f"'row' ({num_values} rows in blocks of {self.per}); use fewer ranks or mode 'dim'")

    def __call__(self, values: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor,
                 groups: torch.Tensor | None = None, num_groups: int = 1, backend: str = "auto") -> torch.Tensor:
        P, per, E = self.P, self.per, num_groups
        local = values.to_local()  # [<= per, Dv]
        T, K = rows.shape
        C, dev = scores.shape[-1], rows.device
        out_dtype, comm = torch.promote_types(values.dtype, scores.dtype), _comm_dtype(scores)
        Tmax = max(_token_counts(T, self.group, dev, self.stats))

        rows = rows.long()
        owner = rows // per  # [T, K]
        local_id = rows - owner * per + (0 if groups is None else groups.long() * per)  # group * per + local row
        order = (owner.view(-1) * (T * K) + torch.arange(T * K, device=dev)).argsort()  # by (owner, token, slot)
        per_token = torch.zeros(P, Tmax, dtype=torch.int32, device=dev)  # [owner, token] slots sent
        per_token.index_put_((owner.view(-1), torch.arange(T, device=dev).repeat_interleave(K)),
                             torch.ones(T * K, dtype=torch.int32, device=dev), accumulate=True)
        got = all_to_all(per_token, [1] * P, [1] * P, self.group, self.stats, "token_counts")  # [src, Tmax]
        send_splits, recv_splits = per_token.sum(1).tolist(), got.sum(1).tolist()
        ids = all_to_all(local_id.view(-1)[order].to(torch.int32), send_splits, recv_splits, self.group,
                         self.stats, "index")  # [R]
        sc = all_to_all(scores.reshape(T * K, C)[order].to(comm), send_splits, recv_splits, self.group,
                        self.stats, "score")  # [R, C]

        # Received slots are ordered (source, token): bag b = source * Tmax + token, dense [P Tmax, Kmax] layout.
        sizes = got.view(-1).long()
        Kmax = max(1, int(sizes.max()))
        bag = torch.repeat_interleave(torch.arange(P * Tmax, device=dev), sizes)  # [R]
        first = sizes.cumsum(0) - sizes
        pos = torch.arange(bag.numel(), device=dev) - first[bag]
        dense = bag * Kmax + pos  # [R] slot -> dense position
        ids_d = torch.zeros(P * Tmax * Kmax, dtype=torch.long, device=dev).index_put((dense,), ids.long())
        sc_d = sc.new_zeros(P * Tmax * Kmax, C).index_put((dense,), sc)  # padding slots score 0
        ids_d = ids_d.view(P * Tmax, Kmax)
        pooled = gather_pool(local, ids_d % per, sc_d.view(P * Tmax, Kmax, C).to(local.dtype), ids_d // per, E,
                             backend)  # [P Tmax, E Dv]: this shard's partial sums for every source's tokens
        back = all_to_all(pooled.to(comm), [Tmax] * P, [Tmax] * P, self.group, self.stats, "pooled")
        return back.view(P, Tmax, -1)[:, :T].sum(0).to(out_dtype)  # [T, E Dv]: the P partial sums added
