"""Expert parallelism for the dropless MoE FFN: experts split over groups of P ranks, tokens moved by all-to-all.

Rank j of an expert-parallel group holds experts [j E/P, (j+1) E/P) (`w_in`, `w_out` become `DTensor`s placed
(Replicate, Shard(0)) on the (edp, ep) mesh). In each MoE layer, after routing on the token's own rank:

    slots sorted by expert (MoEFFN.forward)      [S, d], counts [E]
    exchange the counts                          each rank learns how many slots it gets per local expert and source
    all-to-all the slots to their experts' ranks  [R, d]      (GShard / Megatron "alltoall" dispatcher)
    regroup by local expert, run the expert MLPs (the same grouped-mm / loop paths as one process)
    all-to-all the outputs back                  [S, d]       then MoEFFN un-permutes and weights them as usual

Nothing is dropped (no capacity factor): the splits are whatever the router chose. The backward of each all-to-all
is the reverse all-to-all (ultramem.parallel.comm).

Balance loss over the global batch: f_i (the fraction of token-slots routed to expert i) is all-reduced over every
rank, so the loss is E sum_i f_i^global P_i^local on each rank; the data-parallel mean over ranks of that is exactly
E sum_i f_i^global P_i^global, the single-process loss on the whole global micro-batch. The z-loss is a per-token
mean, which the data-parallel mean already makes global; it needs no communication.

The expert gradients stay sharded: `ultramem.parallel.comm.reduce_gradients` sums them over the ranks
holding the same experts (the edp group) and divides by the world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ultramem.families import expert_module_types
from ultramem.kernels.grouped import grouped_mm
from ultramem.parallel.comm import CommStats, all_to_all, exchange_counts, shard_parameter


def shard_experts(model: nn.Module, mesh: DeviceMesh, global_group: dist.ProcessGroup | None = None,
                  stats: CommStats | None = None) -> list[nn.Parameter]:
    """Split the experts of every MoE layer (the FFN types of the families' `parallel.expert_module`) over
    mesh["ep"] and route tokens across it.

    `mesh` is the 2-D (edp, ep) mesh; every rank must hold the same full experts on entry. `global_group` is the
    group whose tokens form the global batch of the balance loss (default: all ranks). Returns the new expert
    parameters (DTensors) for `reduce_gradients`.
    """
    group, P = mesh.get_group("ep"), mesh["ep"].size()
    params, types = [], expert_module_types()
    for ffn in model.modules():
        if not isinstance(ffn, types):
            continue
        if ffn.cfg.num_experts % P:
            raise ValueError(f"parallel.expert_parallel: {P} must divide model.moe.num_experts "
                             f"({ffn.cfg.num_experts})")
        for name in ("w_in", "w_out"):
            setattr(ffn, name, shard_parameter(getattr(ffn, name), mesh, 0))
            params.append(getattr(ffn, name))
        dispatch = ExpertDispatch(ffn, group, stats)
        ffn.run_experts = dispatch.run_experts
        ffn.balance_counts = GlobalCounts(global_group)
    return params


class ExpertDispatch:
    """MoEFFN.run_experts across the ranks of an expert-parallel group."""

    def __init__(self, ffn: nn.Module, group: dist.ProcessGroup, stats: CommStats | None = None):
        self.ffn, self.group, self.stats = ffn, group, stats
        self.P, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.local = ffn.cfg.num_experts // self.P

    def run_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [S, d] sorted by (global) expert, counts [E] -> [S, d], the experts computed on their own ranks."""
        P, El = self.P, self.local
        send_counts = counts.view(P, El)  # [dest rank, its local expert]
        recv_counts = exchange_counts(send_counts, self.group, self.stats)  # [source rank, my local expert]
        send, recv = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        xr = all_to_all(xs, send, recv, self.group, self.stats, "tokens")  # [R, d] ordered (source, local expert)
        expert = torch.arange(El, device=xs.device).repeat(P).repeat_interleave(recv_counts.view(-1))  # [R]
        order = expert.argsort(stable=True)  # (local expert, source)
        local_counts = recv_counts.sum(0)  # [El]
        if xr.shape[0]:
            y = self._experts(xr[order], local_counts)
        else:  # no slot here: still depend on the inputs and weights, so every rank runs the same backward
            y = xr + 0 * (self.ffn.w_in.to_local().sum() + self.ffn.w_out.to_local().sum())
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all(y[inverse], recv, send, self.group, self.stats, "tokens_back")  # [S, d]

    def _experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts' MLPs, GELU(x W_in[e]) W_out[e], by MoEFFN's grouped-mm or loop path."""
        w_in, w_out = self.ffn.w_in.to_local(), self.ffn.w_out.to_local()  # [El, d, h], [El, h, d]
        if self.ffn.use_grouped_mm(xs):
            dtype = torch.get_autocast_dtype(xs.device.type) if torch.is_autocast_enabled(xs.device.type) else xs.dtype
            offs = counts.cumsum(0).to(torch.int32)
            return grouped_mm(F.gelu(grouped_mm(xs.to(dtype), w_in.to(dtype), offs)), w_out.to(dtype), offs)
        outs = [F.gelu(xe @ w_in[e]) @ w_out[e] for e, xe in enumerate(xs.split(counts.tolist())) if xe.shape[0]]
        return torch.cat(outs)


class GlobalCounts:
    """MoEFFN.balance_counts: the global batch's counts, scaled to this rank's number of tokens.

    switch_balance_loss divides counts by this rank's N k, so passing counts_global * N_local / N_global makes its
    f_i = counts_global_i / (N_global k), the global fraction.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        local_slots = counts.sum()
        both = torch.cat([counts, local_slots.view(1)]).to(torch.float64)
        dist.all_reduce(both, group=self.group)
        return both[:-1] * (local_slots / both[-1])
