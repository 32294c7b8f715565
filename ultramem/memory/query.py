"""The query path shared by PKM and UltraMem: optional causal depthwise conv, one projection, RMSNorm per query.

One `Linear(d, n_queries * 2 * D_k)` yields, for each query group, a row query and a column query of width D_k
(official v1 `query_proj` viewed as [q_row | q_col]). With "share query" (UltraMem §2.0) `query_share` heads use one
query group, like grouped-query attention, so n_queries = heads / query_share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6


class CausalDepthwiseConv(nn.Module):
    """Causal depthwise conv over time ("query conv", UltraMem §2.0; lucidrains' kernel size 5).

    Starts as the identity (last tap 1) so turning it on does not change the model at init. For decoding, the
    last kernel-1 inputs live in `state["conv"]` ([B, d, kernel-1]); missing state means zero history.
    """

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.zeros(d_model, 1, kernel))
        with torch.no_grad():
            self.weight[:, 0, -1] = 1.0

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:  # [B, T, d] -> [B, T, d]
        B, T, d = x.shape
        xt = x.transpose(1, 2)  # [B, d, T]
        past = state.get("conv") if state is not None else None
        if past is None:
            past = xt.new_zeros(B, d, self.kernel - 1)
        xp = torch.cat([past, xt], dim=-1)  # [B, d, kernel-1+T]
        if state is not None:
            state["conv"] = xp[..., xp.shape[-1] - (self.kernel - 1):]
        return F.conv1d(xp, self.weight, groups=d).transpose(1, 2)  # [B, T, d]


class ProductQuery(nn.Module):
    """x [B, T, d] -> q [B*T, n_queries, 2 (row/col), D_k], RMS-normalised over D_k when `norm`."""

    def __init__(self, d_model: int, n_queries: int, key_dim: int, conv_kernel: int, norm: bool):
        super().__init__()
        self.n_queries, self.key_dim = n_queries, key_dim
        self.conv = CausalDepthwiseConv(d_model, conv_kernel) if conv_kernel > 0 else None
        self.proj = nn.Linear(d_model, n_queries * 2 * key_dim, bias=False)
        self.norm = nn.RMSNorm(key_dim, eps=NORM_EPS) if norm else None

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x, state)
        q = self.proj(x).view(-1, self.n_queries, 2, self.key_dim)  # [BT, Hq, 2, Dk]
        return self.norm(q) if self.norm is not None else q

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        """Multiply every query by `factor` (through the norm weight, or the projection when there is no norm)."""
        (self.norm.weight if self.norm is not None else self.proj.weight).mul_(factor)
