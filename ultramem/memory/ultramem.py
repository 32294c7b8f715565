"""The UltraMem v1 memory layer (Huang et al., ICLR 2025): TDQKR + MCS + IVE + half value dim and projection.

    x [B, T, d] --TDQKR--> H*m virtual slots v in [0, E*N) with per-core scores s [.., H*m, h]
      --shuffle--> physical row v mod N, virtual block p = v div N           (IVE, §2.3: fixed random permutation)
      --pool-->    o[p, c-th column slice] = sum_k [p_k = p] s_k,c V[row_k, c-th slice]   (MCS, §2.4)
      --proj-->    Linear(E*D_v, d) = sum_p W_p^T o_p                          ("half vdim + proj" + IVE projectors)

Memory layout follows the official `UltraMemLayerV1`: physical table V [N = num_keys^2, D_v] named `values`
(the optimizer's value group), n' = num_keys * sqrt(E) keys per side so that the grid has E*N virtual slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ultramem.kernels.retrieval import gather_pool
from ultramem.memory.init import calibrate_scores, init_query_and_keys, value_proj_std, value_std
from ultramem.memory.tdqkr import TDQKR

if TYPE_CHECKING:  # annotations only: ultramem.config imports the family registry, which builds these layers
    from ultramem.config import MemoryConfig


class UltraMemLayer(nn.Module):
    def __init__(self, d_model: int, cfg: MemoryConfig, n_layers: int, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        E, N, Dv = cfg.value_expansion, cfg.num_values, cfg.value_dim
        self.retrieval = TDQKR(d_model, cfg)
        self.values = nn.Parameter(torch.empty(N, Dv))
        self.value_proj = nn.Linear(E * Dv, d_model, bias=False) if cfg.value_proj else None
        # Virtual slot -> shuffled virtual id; int32 halves the buffer, E*N < 2^31 for any table that fits.
        self.register_buffer("shuffle", torch.randperm(E * N).to(torch.int32))
        self.dropout = nn.Dropout(cfg.dropout)
        self.gather_pool = gather_pool  # ultramem.parallel.memory_parallel swaps in the op for a sharded table
        self.init_std = init_std
        self.reset_parameters(d_model, n_layers)

    def reset_parameters(self, d_model: int, n_layers: int) -> None:
        cfg = self.cfg
        init_query_and_keys(self.retrieval.query, self.retrieval.keys, self.retrieval.key_norm, cfg, d_model)
        nn.init.uniform_(self.retrieval.cores, 0.0, 1.0)
        nn.init.normal_(self.values, std=value_std(cfg, n_layers))
        if self.value_proj is not None:
            nn.init.normal_(self.value_proj.weight, std=value_proj_std(self.cfg, n_layers, self.init_std))
        self.retrieval.u.zero_()
        self.retrieval.t.zero_()
        self.retrieval.refresh_rank1()
        self.calibration_rms = calibrate_scores(self, self.retrieval.query, d_model)

    def lookup(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (physical rows [BT, H*m], IVE groups [BT, H*m], per-core scores [BT, H*m, h])."""
        virtual, scores = self.retrieval(x, state)
        shuffled = self.shuffle[virtual]  # int32: gather_pool takes int32 rows and groups as they are
        N = self.cfg.num_values
        return shuffled % N, shuffled // N, scores

    def selected_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.lookup(x)[2]

    def value_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> physical rows read [BT, H*m] (memory/usage.py)."""
        return self.lookup(x)[0]

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, T, d = x.shape
        rows, groups, scores = self.lookup(x, state)
        pooled = self.gather_pool(self.values, rows, scores.to(self.values.dtype), groups, self.cfg.value_expansion)
        y = self.value_proj(pooled) if self.value_proj is not None else pooled  # [BT, d]
        return self.dropout(y).view(B, T, d), self.retrieval.aux()

    def on_optimizer_step(self) -> None:
        self.retrieval.refresh_rank1()
