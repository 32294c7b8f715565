"""Product-Key Memory (Lample et al., NeurIPS 2019), the baseline UltraMem starts from (§1 of the digest).

Per head, with row and column queries q_row, q_col (one `Linear(d, 2*D_k)` per query group) and sub-keys
K_row, K_col in R^{n x D_k}:
    s_row = K_row q_row,  s_col = K_col q_col                       (n each)
    keep the top-m of each; candidate (i, j) scores s_row[i] + s_col[j]  (m x m, additive: the topology prior)
    keep the top-m candidates, index i * n + j, weights = softmax (cfg.score) over the m selected
    o = sum over heads and selected slots of w * V[index]           (heads share the value table; XLM sums heads)
Optional "half value dim + projection", query sharing, q/k RMSNorm and query conv follow the same config fields as
UltraMem so that the paper's bag-of-tricks ablation (Table 2) is a sequence of config overrides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ultramem.kernels.retrieval import gather_pool
from ultramem.memory.init import calibrate_scores, init_query_and_keys, value_proj_std, value_std
from ultramem.memory.query import NORM_EPS, ProductQuery
from ultramem.memory.tdqkr import activate

if TYPE_CHECKING:  # annotations only: ultramem.config imports the family registry, which builds these layers
    from ultramem.config import MemoryConfig


class PKMLayer(nn.Module):
    def __init__(self, d_model: int, cfg: MemoryConfig, n_layers: int, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        H, s, n, Dk, Dv = cfg.heads, cfg.query_share, cfg.num_keys, cfg.key_dim, cfg.value_dim
        self.query = ProductQuery(d_model, H // s, Dk, cfg.query_conv, cfg.qk_norm)
        self.keys = nn.Parameter(torch.empty(H, 2, n, Dk))
        self.key_norm = nn.RMSNorm(Dk, eps=NORM_EPS) if cfg.qk_norm else None
        self.values = nn.Parameter(torch.empty(n * n, Dv))
        self.value_proj = nn.Linear(Dv, d_model, bias=False) if cfg.value_proj else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.init_std = init_std
        self.reset_parameters(d_model, n_layers)

    def reset_parameters(self, d_model: int, n_layers: int) -> None:
        init_query_and_keys(self.query, self.keys, self.key_norm, self.cfg, d_model)
        nn.init.normal_(self.values, std=value_std(self.cfg, n_layers))
        if self.value_proj is not None:
            nn.init.normal_(self.value_proj.weight, std=value_proj_std(self.cfg, n_layers, self.init_std))
        self.calibration_rms = calibrate_scores(self, self.query, d_model)

    def lookup(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (value rows [BT, H*m], weights [BT, H*m])."""
        H, s, n, m, Dk = self.cfg.heads, self.cfg.query_share, self.cfg.num_keys, self.cfg.top_m, self.cfg.key_dim
        Hq = H // s
        q = self.query(x, state)  # [BT, Hq, 2, Dk]
        BT = q.shape[0]
        keys = self.keys if self.key_norm is None else self.key_norm(self.keys)  # [H, 2, n, Dk]
        keys = keys.view(Hq, s, 2, n, Dk).permute(0, 2, 4, 1, 3).reshape(Hq * 2, Dk, s * n)
        q = q.permute(1, 2, 0, 3).reshape(Hq * 2, BT, Dk)
        S = torch.bmm(q, keys).view(Hq, 2, BT, s, n)
        row_s, row_i = S[:, 0].topk(m, dim=-1)  # [Hq, BT, s, m]
        col_s, col_i = S[:, 1].topk(m, dim=-1)
        cand = (row_s.unsqueeze(-1) + col_s.unsqueeze(-2)).flatten(-2)  # [Hq, BT, s, m*m]
        best_s, best = cand.topk(m, dim=-1)  # [Hq, BT, s, m]
        rows = row_i.gather(3, best // m) * n + col_i.gather(3, best % m)
        weights = activate(best_s, self.cfg.score, dim=-1)
        return rows.permute(1, 0, 2, 3).reshape(BT, H * m), weights.permute(1, 0, 2, 3).reshape(BT, H * m)

    def selected_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.lookup(x)[1]

    def value_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> rows read [BT, H*m] (memory/usage.py)."""
        return self.lookup(x)[0]

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, T, d = x.shape
        rows, weights = self.lookup(x, state)
        pooled = gather_pool(self.values, rows, weights.unsqueeze(-1).to(self.values.dtype))  # [BT, Dv]
        y = self.value_proj(pooled) if self.value_proj is not None else pooled
        return self.dropout(y).view(B, T, d), {}

    def on_optimizer_step(self) -> None:
        """PKM has no cached state to refresh (kept so every memory layer answers the same calls)."""
