"""The PKM family (Lample et al. 2019): the dense model plus product-key memory layers with additive row + column
scores, one value table and no Tucker cores (ultramem/memory/pkm.py). Owns the `memory` block (MemoryConfig)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ultramem.errors import check
from ultramem.families.dense import build_mlp, mlp_activations, mlp_params
from ultramem.families.product_keys import memory_params as product_key_params
from ultramem.families.product_keys import memory_summary
from ultramem.families.registry import Family, MemoryParams, ParallelHooks, PlotStyle, register

if TYPE_CHECKING:  # annotations only: importing ultramem.config registers the families (this module) first
    from torch import nn

    from ultramem.config import MemoryConfig, ModelConfig


def _layer() -> type:
    from ultramem.memory.pkm import PKMLayer  # lazy: torch stays out of config and planning

    return PKMLayer


def build_memory(cfg: ModelConfig, index: int) -> nn.Module:
    return _layer()(cfg.d_model, cfg.memory, cfg.n_layers, cfg.init_std)


def memory_params(mem: MemoryConfig, d_model: int) -> MemoryParams:
    return product_key_params(mem, d_model, keys=mem.heads * 2 * mem.num_keys * mem.key_dim)  # keys [H, 2, n, Dk]


def retrieval_flops(mem: MemoryConfig) -> int:
    return mem.heads * mem.top_m * mem.top_m  # per head the m x m candidate sums s_row[i] + s_col[j]


def validate(cfg: ModelConfig) -> None:
    # PKM scores are additive (row + column) with one value table and no cores; these UltraMem fields have no
    # meaning there, so a non-default value is a mistake rather than something to ignore.
    for name in ("tucker_rank", "num_cores", "value_expansion"):
        check(getattr(cfg.memory, name) == 1, f"model.memory.{name}", getattr(cfg.memory, name),
              "1 for family 'pkm' (TDQKR, MCS and IVE are UltraMem features)")


FAMILY = register(Family(
    name="pkm",
    title="PKM",
    block="memory",
    style=PlotStyle(label="pkm", color="#8064a2", marker="D"),
    build_ffn=build_mlp,
    ffn_params=mlp_params,
    ffn_activations=mlp_activations,
    build_memory=build_memory,
    memory_params=memory_params,
    retrieval_flops=retrieval_flops,
    validate=validate,
    summary=memory_summary,
    parallel=ParallelHooks(value_module=_layer),
))
