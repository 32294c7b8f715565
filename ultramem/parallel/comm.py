"""Collectives for memory and expert parallelism, with the bytes each rank sends counted by name.

    all_to_all(x, send, recv, group, stats, "pooled")   differentiable: the backward is the reverse all-to-all
    all_gather(x, group, stats, "index")                 [P, *x.shape], no gradient (indices)
    shard_parameter(full, mesh, dim)                     a (Replicate, Shard(dim)) DTensor parameter, cut on the host
    reduce_gradients(params, dp_group, world_size)       finish sharded gradients after the backward

A `CommStats` records, per name, the bytes this rank sent to the *other* ranks of the group (its own chunk stays
local), which is the quantity the paper's communication formulas count (§5 of the digest). Backward traffic is
recorded under "<name>_grad". Only the payload is counted; the small size exchanges that make uneven splits
possible are recorded under "meta".
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard


class CommStats:
    """Bytes sent by this rank, per name, since the last `take()`."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = defaultdict(int)

    def add(self, name: str, nbytes: int) -> None:
        self.sent[name] += int(nbytes)

    def take(self) -> dict[str, int]:
        out, self.sent = dict(self.sent), defaultdict(int)
        return out


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup,
               stats: CommStats | None = None, name: str = "a2a") -> torch.Tensor:
    """x [sum(send_splits), ...] -> [sum(recv_splits), ...]: rows send_splits[j] go to rank j of `group`."""
    return _AllToAll.apply(x, tuple(send_splits), tuple(recv_splits), group, stats, name)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, group, stats, name):  # noqa: ANN001, ANN205
        ctx.send, ctx.recv, ctx.group, ctx.stats, ctx.name = send, recv, group, stats, name
        return _exchange(x, send, recv, group, stats, name)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        grad = _exchange(grad, ctx.recv, ctx.send, ctx.group, ctx.stats, f"{ctx.name}_grad")
        return grad, None, None, None, None, None


def _exchange(x: torch.Tensor, send: tuple[int, ...], recv: tuple[int, ...], group: dist.ProcessGroup,
              stats: CommStats | None, name: str) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x, list(recv), list(send), group=group)
    if stats is not None:
        me = dist.get_rank(group)
        row = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
        stats.add(name, (sum(send) - send[me]) * row)
    return out


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats | None = None,
               name: str = "gather") -> torch.Tensor:
    """x [...] (same shape on every rank) -> [P, ...] with rank j's tensor at j. Not differentiable."""
    P = dist.get_world_size(group)
    x = x.contiguous().view(1, *x.shape)
    out = x.new_empty((P, *x.shape[1:]))  # concatenated along dim 0, which gloo requires
    gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)  # the newer name where it exists
    gather(out, x, group=group)
    if stats is not None:
        stats.add(name, (P - 1) * x.numel() * x.element_size())
    return out


def exchange_counts(send: torch.Tensor, group: dist.ProcessGroup, stats: CommStats | None = None) -> torch.Tensor:
    """send [P, ...] int64 (row j for rank j) -> [P, ...] (row j from rank j): the sizes behind uneven splits."""
    out = torch.empty_like(send)
    dist.all_to_all_single(out, send.contiguous(), group=group)
    if stats is not None:
        P = send.shape[0]
        stats.add("meta", (P - 1) * send[0].numel() * send.element_size())
    return out


def shard_parameter(full: torch.Tensor, mesh: DeviceMesh, dim: int) -> torch.nn.Parameter:
    """A parameter placed (Replicate, Shard(dim)) on the 2-D `mesh` from the same `full` tensor on every rank.

    The shard is cut on the host before it moves to the mesh's device, so a table that does not fit one GPU never
    goes there whole. Blocks follow torch.chunk, as DTensor's Shard does (the last ones may be short or empty).
    """
    P, i = mesh.size(1), mesh.get_local_rank(1)
    pieces = full.detach().chunk(P, dim)
    local = pieces[i] if i < len(pieces) else full.detach().narrow(dim, 0, 0)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    return torch.nn.Parameter(DTensor.from_local(local.contiguous().to(device), mesh, (Replicate(), Shard(dim)),
                                                 run_check=False, shape=full.shape, stride=full.stride()))


def reduce_gradients(params: list[torch.nn.Parameter], dp_group: dist.ProcessGroup | None, world_size: int) -> None:
    """Finish the gradients of sharded parameters (value tables, experts): sum over the ranks holding the same
    shard, then / world_size, so that they equal data parallelism's mean over all ranks. Each shard already holds
    the gradient of every token of its group. A parameter without a gradient counts as zeros (every rank must
    join the all-reduce)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(g, group=dp_group)
        g.div_(world_size)
