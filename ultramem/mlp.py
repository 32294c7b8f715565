"""The dense feed-forward block: two matrices d -> h -> d with a GELU between them and no biases."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, init_std: float, n_layers: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.fc.weight, std=init_std)
        # GPT-2: each residual branch output is scaled by 1/sqrt(2 n_layers) so the residual variance stays O(1).
        nn.init.normal_(self.proj.weight, std=init_std / math.sqrt(2 * n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, T, d]
        return self.dropout(self.proj(F.gelu(self.fc(x))))
