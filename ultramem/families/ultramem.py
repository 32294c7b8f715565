"""The UltraMem family (Huang et al. 2025, v1): the dense model plus UltraMem memory layers (TDQKR retrieval, MCS
cores, IVE virtual values; ultramem/memory/ultramem.py). Owns the `memory` block (MemoryConfig); its value tables
are what memory parallelism splits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ultramem.families.dense import build_mlp, mlp_activations, mlp_params
from ultramem.families.product_keys import memory_params as product_key_params
from ultramem.families.product_keys import memory_summary
from ultramem.families.registry import Family, MemoryParams, ParallelHooks, PlotStyle, register

if TYPE_CHECKING:  # annotations only: importing ultramem.config registers the families (this module) first
    from torch import nn

    from ultramem.config import MemoryConfig, ModelConfig


def _layer() -> type:
    from ultramem.memory.ultramem import UltraMemLayer  # lazy: torch stays out of config and planning

    return UltraMemLayer


def build_memory(cfg: ModelConfig, index: int) -> nn.Module:
    return _layer()(cfg.d_model, cfg.memory, cfg.n_layers, cfg.init_std)


def memory_params(mem: MemoryConfig, d_model: int) -> MemoryParams:
    H, r = mem.heads, mem.tucker_rank
    keys = H * 2 * mem.keys_per_side * mem.key_dim * r  # keys [H, 2, n', Dk, r]
    keys += mem.num_cores * H * r**2  # cores [h, H, r, r]
    return product_key_params(mem, d_model, keys=keys)


def retrieval_flops(mem: MemoryConfig) -> int:
    m, r, h = mem.top_m, mem.tucker_rank, mem.num_cores
    stage1 = 2 * 2 * mem.keys_per_side * r  # u^T S_row and t^T S_col for every key
    stage2 = 2 * m * r * r + 2 * m * m * r  # R (sum_c C_c), then the m x m grid
    winners = h * m * (2 * r * r + 2 * r)  # per-core scores of the m winners
    return mem.heads * (stage1 + stage2 + winners)


FAMILY = register(Family(
    name="ultramem",
    title="UltraMem",
    block="memory",
    style=PlotStyle(label="ultramem", color="#3a9a5b", marker="^"),
    build_ffn=build_mlp,
    ffn_params=mlp_params,
    ffn_activations=mlp_activations,
    build_memory=build_memory,
    memory_params=memory_params,
    retrieval_flops=retrieval_flops,
    summary=memory_summary,
    parallel=ParallelHooks(value_module=_layer, memory_parallel=True),
))
