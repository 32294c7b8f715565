"""The Memory+ family (Berges et al., "Memory Layers at Scale", Meta FAIR, arXiv 2412.09764): product-key memory
layers with per-head softmax, one value table shared by every memory layer and the SiLU-gated output
(ultramem/memory/memory_plus.py). Owns the `memory_plus` block (MemoryPlusConfig).

Placement (`model.memory_plus`): the blocks `memory_plus_blocks(layers, n_layers)` selects hold a memory layer fed
the FFN's normalised input. `replace_ffn: true` (the default) is Meta's variant: the memory layer REPLACES those
blocks' FFN. `replace_ffn: false` is ByteDance's port (the 227M comparison of the UltraMemV2 paper): the FFN stays
and the memory output is added beside it. Every other block keeps its dense MLP. Each block's FFN slot is a
`MemoryFFN` (ultramem/memory/ffn_memory.py): blocks.i.ffn.mlp and/or blocks.i.ffn.memory.

The value table is built once by the model (`build_shared`, `Transformer.shared`) and registered by every memory
layer too, so its gradient sums every layer's; `shared_values: false` gives each layer a private table. It trains at
its own LR `value_lr` (Meta's value_fixed_lr, 1e-3), either constant (`value_lr_schedule: constant`, ByteDance's
port, the default) or as the peak of the run's warmup and decay (`scheduled`, Meta's lingua), and its gradients are
clipped with the rest (`value_clip: joint`, the default) or on their own (`separate`, Meta). Because one table spans
several blocks, FSDP (one unit per block) cannot split it: the dense part trains with plain data parallelism, and
`parallel.memory_parallel` splits the table(s) over a memory-parallel group, by columns (`dim`, Meta's `Shard(1)`
parallel memory) or by rows (`row`) (ultramem/parallel/memory_parallel.py; ultramem.layout checks the layout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ultramem.families.dense import build_mlp, mlp_activations, mlp_params
from ultramem.families.registry import (
    Family,
    FFNParams,
    MemoryTables,
    ParallelHooks,
    PlotStyle,
    ValueLR,
    expected_distinct,
    register,
)
from ultramem.memory.placement import memory_plus_blocks

if TYPE_CHECKING:  # annotations only: importing ultramem.config registers the families (this module) first
    from torch import nn

    from ultramem.config import MemoryPlusConfig, ModelConfig


def _table() -> type:
    from ultramem.memory.memory_plus import MemoryPlusTable  # lazy: torch stays out of config and planning

    return MemoryPlusTable


def blocks(cfg: ModelConfig) -> list[int]:
    """The 0-indexed blocks holding a memory layer."""
    return memory_plus_blocks(cfg.memory_plus.layers, cfg.n_layers)


def value_dim(cfg: ModelConfig) -> int:
    return cfg.memory_plus.value_dim or cfg.d_model


def build_shared(cfg: ModelConfig) -> nn.Module | None:
    """The one value table [num_keys^2, Dv] of every memory layer; None with private tables (shared_values false)."""
    return _table().from_config(cfg.memory_plus, cfg.d_model) if cfg.memory_plus.shared_values else None


def build_ffn(cfg: ModelConfig, index: int, shared: nn.Module | None) -> nn.Module:
    from ultramem.memory.ffn_memory import MemoryFFN  # lazy: torch stays out of config and planning
    from ultramem.memory.memory_plus import MemoryPlusLayer  # lazy: same

    if index not in blocks(cfg):
        return MemoryFFN(build_mlp(cfg, index), None)
    mlp = None if cfg.memory_plus.replace_ffn else build_mlp(cfg, index)
    return MemoryFFN(mlp, MemoryPlusLayer(cfg.d_model, cfg.memory_plus, shared))


def layer_params(mp: MemoryPlusConfig, d_model: int) -> int:
    """Dense parameters of ONE memory layer (its table excluded): query Linear(d, H Dk) with bias, keys H n Dk
    (2 halves of Dk/2 per head), q/k RMSNorm weights 2 x Dk/2, swilu Linear(d, Dv) with bias, Linear(Dv, d) with
    bias."""
    H, n, Dk, Dv = mp.heads, mp.num_keys, mp.key_dim, mp.value_dim or d_model
    dense = d_model * H * Dk + H * Dk  # query projection
    dense += H * n * Dk  # keys [2 H n, Dk / 2]
    dense += Dk if mp.qk_norm else 0
    dense += d_model * Dv + Dv if mp.swilu else 0  # W1
    dense += Dv * d_model + d_model  # W2
    return dense


def model_params(cfg: ModelConfig) -> FFNParams:
    """Every block's FFN slot: the MLPs that remain, the memory layers, the value table(s). A token reads
    heads x top_m rows of Dv in each memory layer (duplicates across layers included, as for UltraMem)."""
    mp, L, M = cfg.memory_plus, cfg.n_layers, len(blocks(cfg))
    mlps = L - (M if mp.replace_ffn else 0)
    dense = mlps * mlp_params(cfg).dense + M * layer_params(mp, cfg.d_model)
    tables = 1 if mp.shared_values else M
    Dv = value_dim(cfg)
    return FFNParams(dense=dense, sparse=tables * mp.num_values * Dv, active_sparse=M * mp.heads * mp.top_m * Dv)


def layer_activations(cfg: ModelConfig) -> int:
    """Elements per token one memory layer keeps for the backward (2-byte units; int64 indices count 4): its
    input d, queries H Dk, half scores 2 H n, candidate grid H m^2, winners' weights and indices 5 H m, the
    pooled row, the gate and the gated row 3 Dv."""
    mp = cfg.memory_plus
    H, m = mp.heads, mp.top_m
    return cfg.d_model + H * mp.key_dim + 2 * H * mp.num_keys + H * m * m + 5 * H * m + 3 * value_dim(cfg)


def ffn_activations(cfg: ModelConfig) -> int:
    """Per block, averaged over the blocks (they differ): the MLPs that remain plus the memory layers."""
    mp, L, M = cfg.memory_plus, cfg.n_layers, len(blocks(cfg))
    mlps = L - (M if mp.replace_ffn else 0)
    return -(-(mlps * mlp_activations(cfg) + M * layer_activations(cfg)) // L)


def retrieval_flops(cfg: ModelConfig) -> int:
    """Per token, all memory layers: the m x m candidate sums s1[i] + s2[j] of each head. (Key scores and the
    weighted row sum are parameter FLOPs; like the MLP's GELU, the softmax and the gate are not counted.)"""
    mp = cfg.memory_plus
    return len(blocks(cfg)) * mp.heads * mp.top_m * mp.top_m


def decode_values(cfg: ModelConfig, batch_size: int) -> tuple[float, float]:
    """One decode step of B sequences: each memory layer draws B H m rows of the N-row table; a shared table is
    read once per step, so the rows read are the distinct ones among all M layers' B H m M draws (private tables:
    M x the distinct rows of B H m draws). Returns (parameters read, expected distinct rows per layer)."""
    mp, M = cfg.memory_plus, len(blocks(cfg))
    draws = batch_size * mp.heads * mp.top_m
    per_layer = expected_distinct(mp.num_values, draws)
    rows = expected_distinct(mp.num_values, M * draws) if mp.shared_values else M * per_layer
    return rows * value_dim(cfg), per_layer


def value_lr(cfg: ModelConfig) -> ValueLR:
    mp = cfg.memory_plus
    return ValueLR(fixed=mp.value_lr, fixed_scheduled=mp.value_lr_schedule == "scheduled",
                   separate_clip=mp.value_clip == "separate")


def memory_tables(cfg: ModelConfig) -> MemoryTables:
    """What memory parallelism splits: the value table(s) [num_keys^2, Dv]; each memory layer reads H m rows with
    one softmax weight each (no cores, no IVE groups)."""
    mp = cfg.memory_plus
    field = "value_dim" if mp.value_dim else "value_dim (0: d_model)"
    return MemoryTables(block="model.memory_plus", rows=mp.num_values, value_dim=value_dim(cfg),
                        slots=mp.heads * mp.top_m, layers=len(blocks(cfg)), value_field=field)


def summary(cfg: ModelConfig, params: dict[str, int]) -> dict[str, Any]:
    """final.json's "memory" record (the keys analysis/collect.py reads, + the variant)."""
    mp = cfg.memory_plus
    return {"num_values": mp.num_values, "top_m": mp.top_m, "heads": mp.heads, "value_expansion": 1,
            "num_layers": len(blocks(cfg)), "value_params": params["sparse"], "replace_ffn": mp.replace_ffn,
            "shared_values": mp.shared_values, "value_lr": mp.value_lr}


FAMILY = register(Family(
    name="memory_plus",
    title="Memory+",
    block="memory_plus",
    style=PlotStyle(label="memory+", color="#c0392b", marker="v"),
    build_ffn=build_ffn,
    ffn_aux=True,
    ffn_params=mlp_params,  # a block without a memory layer; all blocks together: model_params
    ffn_activations=ffn_activations,
    build_shared=build_shared,
    model_params=model_params,
    model_retrieval_flops=retrieval_flops,
    decode_values=decode_values,
    summary=summary,
    summary_block="memory",
    value_lr=value_lr,
    parallel=ParallelHooks(value_module=_table, memory_parallel=True, memory_tables=memory_tables,
                           data_parallel_only="its value table is shared by the memory layers of several blocks, "
                                              "which FSDP's per-block units do not split (memory parallelism does: "
                                              "parallel.memory_parallel {mode: dim|row})"),
))
