"""Memory+ (Berges et al., "Memory Layers at Scale", Meta FAIR, arXiv 2412.09764), as in Meta's released layer.

A product-key memory read with per-head softmax, one value table shared by all memory layers, and a SiLU-gated
output (Eq. 2). Per token x [d], with H heads, n = num_keys, N = n**2 values, half = key_dim // 2, m = top_m:
    q = W_q x + b_q                      [H, key_dim], head h = columns [h*key_dim, (h+1)*key_dim) of the projection
    q1, q2 = q[:, :half], q[:, half:]    (optionally RMS-normed, like the keys: qk_norm)
    s1 = K1[h] q1, s2 = K2[h] q2         [n] each; keys stored as Meta's [2*H*n, half] = view [H, 2, n, half]
    keep the top-m of each, score the m*m candidates s1[i] + s2[j], keep the top-m; index i*n + j
    w = softmax over the m selected (fp32 or wider), per head
    y = sum over the H*m (index, w) pairs of w * V[index]   (one bag per token; V [N, Dv], Dv = d by default)
    out = W2 (y * silu(W1 x + b1)) + b2  (swilu; without it W2 y + b2)
The top-m of s1[i] + s2[j] always lies in the (top-m rows) x (top-m columns) grid, so this is the exact top-m over
all N full keys [K1[i] | K2[j]].

Which variant: `MemoryPlusConfig.replace_ffn` (the model's concern, not this module's) chooses Meta's, where the
layer replaces the FFN of a few centred blocks, or ByteDance's port, which keeps the FFN and adds the layer
beside it. Either way the layer reads the FFN's normalised input. The released code has no q/k normalisation
(`qk_norm=False`); the paper's Fig. 3 shows RMSNorms (`qk_norm=True`, weights start at 1, one norm shared by both
query halves and one by both key halves). Meta's code drops W2 when swilu is off and v_dim = d; here W2 is always
present. Biases of the three Linears keep torch's default init, as in Meta's code.

Init (Meta `reset_parameters`): keys U(+-key_dim**-0.5) (the FULL key dim, although each stored key is half of
it), values N(0, Dv**-0.5), query weight Xavier-uniform, W1 and W2 weights N(0, d**-0.5).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.errors import ConfigError
from ultramem.kernels.retrieval import gather_pool
from ultramem.kernels.sampled import sampled_dot
from ultramem.memory.placement import memory_plus_blocks  # re-exported: placement is torch-free
from ultramem.memory.query import NORM_EPS

if TYPE_CHECKING:  # annotations only: ultramem.config imports the family registry, which builds these layers
    from ultramem.config import MemoryPlusConfig

class MemoryPlusTable(nn.Module):
    """The value table V [N, Dv]. Shared: build one and pass it to every layer (each registers it as a submodule;
    parameters() yields it once, its .grad sums every layer's contribution). Its LR is `value_lr`, fixed."""

    def __init__(self, num_values: int, value_dim: int):
        super().__init__()
        self.values = nn.Parameter(torch.empty(num_values, value_dim))  # [N, Dv]
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: MemoryPlusConfig, d_model: int) -> MemoryPlusTable:
        return cls(cfg.num_keys**2, cfg.value_dim or d_model)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.values, std=self.values.shape[1] ** -0.5)


class MemoryPlusLayer(nn.Module):
    """h [B, T, d] -> (y [B, T, d], {}). `table=None` gives the layer a private table."""

    def __init__(self, d_model: int, cfg: MemoryPlusConfig, table: MemoryPlusTable | None = None):
        super().__init__()
        self.cfg = cfg
        H, n, Dk = cfg.heads, cfg.num_keys, cfg.key_dim
        Dv = cfg.value_dim or d_model
        self.table = table if table is not None else MemoryPlusTable(n * n, Dv)
        if tuple(self.table.values.shape) != (n * n, Dv):
            raise ConfigError(f"model.memory_plus: table of shape {tuple(self.table.values.shape)}; this layer "
                              f"needs [num_keys**2, value_dim or d_model] = [{n * n}, {Dv}]")
        self.query_proj = nn.Linear(d_model, H * Dk)  # with bias (Meta's QueryMLP)
        self.keys = nn.Parameter(torch.empty(2 * H * n, Dk // 2))  # Meta's layout; view [H, 2 (half), n, Dk/2]
        self.q_norm = nn.RMSNorm(Dk // 2, eps=NORM_EPS) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(Dk // 2, eps=NORM_EPS) if cfg.qk_norm else None
        self.swilu_proj = nn.Linear(d_model, Dv) if cfg.swilu else None  # W1
        self.value_proj = nn.Linear(Dv, d_model)  # W2
        self.dropout = nn.Dropout(cfg.dropout)
        self.gather_pool = gather_pool  # ultramem.parallel.memory_parallel swaps in the op for a split table
        self.reset_parameters(d_model)

    def reset_parameters(self, d_model: int) -> None:
        """Meta's init of everything but the table (a shared table is initialised once, by itself)."""
        bound = self.cfg.key_dim**-0.5
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.xavier_uniform_(self.query_proj.weight)
        nn.init.normal_(self.value_proj.weight, std=d_model**-0.5)
        if self.swilu_proj is not None:
            nn.init.normal_(self.swilu_proj.weight, std=d_model**-0.5)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (value rows [BT, H*m], softmax weights [BT, H*m]): exact top-m per head.

        Indices under no_grad: the half scores, their sorted top-m, and the top-m of s1[i] + s2[j] over the
        candidates that can win (`product_candidates`: ~m ln m of the m*m grid). The winners' scores carry the
        gradient through `sampled_dot` (only the 2 m selected keys per head; no [BT, H, 2, n] or [BT, H, m*m]
        zero-filled gradient); their values are the same fp32 sums as the full grid's, in the same order."""
        H, n, m, half = self.cfg.heads, self.cfg.num_keys, self.cfg.top_m, self.cfg.key_dim // 2
        q = self.query_proj(x).view(-1, H, 2, half)  # [BT, H, 2, half]
        keys = self.keys.view(H, 2, n, half)
        if self.q_norm is not None:
            q, keys = self.q_norm(q), self.k_norm(keys)
        BT = q.shape[0]
        with torch.no_grad():
            s = torch.einsum("thsd,hsnd->thsn", q, keys)  # [BT, H, 2, n] half scores
            top_s, top_i = s.topk(m, dim=-1)  # [BT, H, 2, m], sorted
            ii, jj = product_candidates(m, s.device)  # [P] each
            cand = top_s[:, :, 0, ii] + top_s[:, :, 1, jj]  # [BT, H, P] s1 + s2
            pos = cand.topk(m, dim=-1).indices  # [BT, H, m], sorted by score as the full grid's top-m
            ij = torch.stack([top_i[:, :, 0].gather(-1, ii[pos]), top_i[:, :, 1].gather(-1, jj[pos])], 2)  # [BT,H,2,m]
            values = torch.stack([top_s[:, :, 0].gather(-1, ii[pos]), top_s[:, :, 1].gather(-1, jj[pos])], 2)
            key_row = ij + torch.arange(H * 2, device=s.device).view(1, H, 2, 1) * n  # rows of keys [H*2*n, half]
        W = sampled_dot(q.reshape(BT * H * 2, half), keys.reshape(H * 2 * n, half), key_row.view(BT * H * 2, m),
                        values.view(BT * H * 2, m)).view(BT, H, 2, m)
        best_s = W[:, :, 0] + W[:, :, 1]  # [BT, H, m]
        rows = ij[:, :, 0] * n + ij[:, :, 1]  # [BT, H, m]
        w = best_s.to(torch.promote_types(best_s.dtype, torch.float32)).softmax(-1)  # per head, >= fp32
        return rows.reshape(BT, H * m), w.reshape(BT, H * m)

    def value_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> rows of the shared table read [BT, H*m] (memory/usage.py)."""
        return self.lookup(x)[0]

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x [B, T, d] -> (y [B, T, d], {}). Tokens are independent, so T = 1 decodes; `state` is unused."""
        B, T, d = x.shape
        rows, w = self.lookup(x)
        V = self.table.values
        y = self.gather_pool(V, rows, w.unsqueeze(-1).to(V.dtype))  # [BT, Dv] = sum w * V[rows], one bag per token
        if self.swilu_proj is not None:
            y = y * F.silu(self.swilu_proj(x.reshape(B * T, d)))  # [BT, Dv]
        y = self.value_proj(y)  # [BT, d]
        return self.dropout(y).view(B, T, d), {}

    def on_optimizer_step(self) -> None:
        """Memory+ has no cached state to refresh (kept so every memory layer answers the same calls)."""


@functools.cache
def _candidates(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [(i, j) for i in range(m) for j in range(m) if (i + 1) * (j + 1) <= m]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def product_candidates(m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) [P] of the m x m grid of two sorted top-m lists that can hold a top-m sum s1[i] + s2[j]: those with
    (i + 1)(j + 1) <= m, row-major. Any other (i, j) is dominated by the (i + 1)(j + 1) > m pairs (i' <= i, j' <= j),
    whose sums are >= its own, so it can only tie the m-th. P = sum_i floor(m / (i + 1)) ~ m ln m (171 of 1600 at
    m = 40)."""
    ii, jj = _candidates(m)
    return ii.to(device), jj.to(device)


__all__ = ["MemoryPlusLayer", "MemoryPlusTable", "memory_plus_blocks"]
