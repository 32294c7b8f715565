"""Memory parallelism: UltraMem value tables split over a group of P ranks (paper §5; official `memory_parallel.py`).

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
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ultramem.errors import ConfigError
from ultramem.families import value_module_types
from ultramem.kernels.retrieval import gather_pool
from ultramem.layout import memory_parallel_cores
from ultramem.parallel.comm import CommStats, all_gather, all_to_all, shard_parameter

MODES = ("dim", "row")


def shard_value_tables(model: nn.Module, mode: str, mesh: DeviceMesh,
                       stats: CommStats | None = None) -> list[nn.Parameter]:
    """Split every value table that memory parallelism may split (the UltraMem layers': the families whose
    `parallel.memory_parallel` is set) over mesh["mp"] and swap in the matching pooling op.

    `mesh` is the 2-D (mdp, mp) mesh; every rank must hold the same full tables (same seed) on entry. Returns the
    new value parameters: `DTensor`s on `mesh`, whose gradients `reduce_gradients` finishes after the backward.
    """
    if mode not in MODES:
        raise ConfigError(f"parallel.memory_parallel.mode: {mode!r}; allowed: none | {' | '.join(MODES)}")
    group = mesh.get_group("mp")
    params, types = [], value_module_types(memory_parallel=True)
    for layer in model.modules():
        if not isinstance(layer, types):
            continue
        cfg = layer.cfg
        N, Dv, C = cfg.num_values, cfg.value_dim, cfg.num_cores
        pool = DimParallelPool(group, N, Dv, C, stats) if mode == "dim" else RowParallelPool(group, N, stats)
        layer.values = shard_parameter(layer.values, mesh, 1 if mode == "dim" else 0)
        layer.gather_pool = pool
        params.append(layer.values)
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


class DimParallelPool:
    """`gather_pool` over a table split by columns; same signature and result as the single-process op."""

    def __init__(self, group: dist.ProcessGroup, num_values: int, value_dim: int, num_cores: int,
                 stats: CommStats | None = None):
        self.group, self.stats = group, stats
        self.P = dist.get_world_size(group)
        self.N, self.Dv = num_values, value_dim
        c = memory_parallel_cores(value_dim, num_cores, self.P)
        # The MCS cores whose columns rank j holds (core k weights columns [k Dv/h, (k+1) Dv/h)).
        self.cores = [list(range(j * c, (j + 1) * c)) if c > 1 else [j * num_cores // self.P] for j in range(self.P)]

    def __call__(self, values: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor,
                 groups: torch.Tensor | None = None, num_groups: int = 1, backend: str = "auto") -> torch.Tensor:
        P, N, E = self.P, self.N, num_groups
        local = values.to_local()  # [N, Dv / P]
        T, K = rows.shape
        out_dtype, comm = torch.promote_types(values.dtype, scores.dtype), _comm_dtype(scores)
        Tmax = max(_token_counts(T, self.group, rows.device, self.stats))
        pad = Tmax - T
        vid = rows.to(torch.int32) if groups is None else (groups.to(torch.int32) * N + rows.to(torch.int32))
        vids = all_gather(nn.functional.pad(vid, (0, 0, 0, pad)), self.group, self.stats, "index")  # [P, Tmax, K]
        # to rank j: the scores of the cores that weight its columns; padded tokens score 0 and so pool nothing
        send = torch.stack([nn.functional.pad(scores[..., idx], (0, 0, 0, 0, 0, pad)) for idx in self.cores])
        c = send.shape[-1]
        recv = all_to_all(send.to(comm).view(P * Tmax, K * c), [Tmax] * P, [Tmax] * P, self.group, self.stats,
                          "score")  # [P Tmax, K c]: block j = rank j's tokens
        vids = vids.view(P * Tmax, K)
        pooled = gather_pool(local, vids % N, recv.view(P * Tmax, K, c).to(local.dtype), vids // N, E,
                             backend)  # [P Tmax, E Dv/P]
        back = all_to_all(pooled.to(comm), [Tmax] * P, [Tmax] * P, self.group, self.stats,
                          "pooled")  # [P Tmax, E Dv/P]: block j = column slice j of my tokens
        out = back.view(P, Tmax, E, self.Dv // P)[:, :T].permute(1, 2, 0, 3)  # [T, E, P, Dv/P]
        return out.reshape(T, E * self.Dv).to(out_dtype)


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
