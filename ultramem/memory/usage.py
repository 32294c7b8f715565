"""Which value rows a model's memory layers read: the fraction of the table touched and the row-usage entropy.

A diagnostic for top-m selection collapse (a few rows taking most reads). `RowUsage(model)` is a context manager:
while it is open, every forward of a memory layer (a module with `value_rows(x) -> rows [BT, K]` and a `values`
table of R rows, its own or a shared one) adds a bincount of the rows it read. `stats()` then gives, per layer,

    rows_used    = |{rows read at least once}| / R
    row_entropy  = H(p) / ln R,   p = read counts / total reads    (1: uniform over the table; 0: one row)

The extra lookup runs under no_grad; it costs one more retrieval per forward, so open it for evaluation only.
For tables shared by several layers (Memory+, UltraMemV2) each layer is scored against the whole table.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def memory_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every memory layer in `model`, in module order."""
    return [(name, m) for name, m in model.named_modules() if callable(getattr(m, "value_rows", None))]


def table_rows(layer: nn.Module) -> int:
    table = layer.table if hasattr(layer, "table") else layer
    return int(table.values.shape[0])


class RowUsage:
    def __init__(self, model: nn.Module, enabled: bool = True):
        self.layers = memory_layers(model) if enabled else []
        self.counts: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles: list = []

    def __enter__(self) -> RowUsage:
        for i, (_, layer) in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def hook(layer: nn.Module, args: tuple) -> None:
            with torch.no_grad():
                rows = layer.value_rows(args[0]).reshape(-1).long()  # [BT*K]
                c = torch.bincount(rows.cpu(), minlength=table_rows(layer))
            self.counts[i] = c if self.counts[i] is None else self.counts[i] + c
        return hook

    def stats(self) -> dict[str, float]:
        """{"m{i}/rows_used": ..., "m{i}/row_entropy": ...} for each memory layer i that ran."""
        out: dict[str, float] = {}
        for i, c in enumerate(self.counts):
            if c is None or c.sum() == 0:
                continue
            out[f"m{i}/rows_used"] = float((c > 0).double().mean())
            out[f"m{i}/row_entropy"] = row_entropy(c)
        return out


def row_entropy(counts: torch.Tensor) -> float:
    """Shannon entropy of the read distribution over the table's rows, divided by ln(rows) (1 = uniform)."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(counts.numel())) if counts.numel() > 1 else 0.0
