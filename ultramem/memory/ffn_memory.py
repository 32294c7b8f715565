"""A block's FFN slot for the families whose memory layers live inside the blocks (memory_plus, ultramem_v2).

`MemoryFFN(mlp, memory)` maps the FFN's normalised input h [B, T, d] to (mlp(h) + memory(h), aux): the block adds
that sum to the residual stream, which is "FFN output + memory output added to the residual" of UltraMemV2 and of
ByteDance's Memory+ port. With `mlp=None` the memory replaces the FFN (Meta's Memory+); with `memory=None` the slot
is the plain MLP (a Memory+ block without a memory layer). The memory's forward is `(h, state) -> (y, aux dict)`;
tokens are independent, so no decode state is passed.

Parameter names: blocks.i.ffn.mlp.* and blocks.i.ffn.memory.* (checkpoint keys).
"""

from __future__ import annotations

import torch
from torch import nn


class MemoryFFN(nn.Module):
    def __init__(self, mlp: nn.Module | None, memory: nn.Module | None):
        super().__init__()
        if mlp is None and memory is None:
            raise ValueError("MemoryFFN needs an MLP, a memory layer or both")
        self.mlp = mlp
        self.memory = memory

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """h [B, T, d] -> (y [B, T, d], aux dict of the memory layer)."""
        y = self.mlp(h) if self.mlp is not None else None
        aux: dict[str, torch.Tensor] = {}
        if self.memory is not None:
            m, aux = self.memory(h)
            y = m if y is None else y + m
        return y, aux

    @torch.no_grad()
    def on_optimizer_step(self) -> None:
        """Forwarded to the memory layer (TDQKR rank-1 refresh for UltraMemV2; nothing for Memory+)."""
        if self.memory is not None:
            self.memory.on_optimizer_step()


__all__ = ["MemoryFFN"]
