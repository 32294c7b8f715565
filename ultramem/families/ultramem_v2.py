"""The UltraMemV2 family (ByteDance Seed 2025, arXiv 2508.18756; ultramem/memory/ultramem_v2.py): an UltraMemV2
layer in EVERY block beside the FFN, fed the FFN's normalised input (the block adds FFN output + memory output to
the residual stream, the official `mem_insert_way='full'`), reading one global value / pre-value table through
ring windows. Owns the `memory_v2` block (UltraMemV2Config).

The global table (values [Nall, Dv] and pre_values [Nall, Dp], Nall = num_keys^2 x n_layers) is built once by the
model (`build_shared`, `Transformer.shared`) and registered by every layer; layer l reads the n^2 rows from
l x num_keys^2 on, wrapping (n = keys_per_side: share_ratio 0 gives private slices, larger ratios overlapping
windows). The layers' weighted auxiliary losses (key balance, Tucker penalty) are summed over the layers, as the
official code adds coefficient x loss in every layer (`Family.aux_sum`). Both tables form the optimizer's "values"
group at the value-LR multiplier (value_lr_mult decaying to 1x over value_lr_decay of training, as UltraMem v1). The
shared table spans every block, so FSDP (one unit per block) cannot split it: the dense part trains with plain data
parallelism, and `parallel.memory_parallel: {mode: dim}` splits both tables by columns over a memory-parallel group
(the official `vertical_parallel`; ultramem/parallel/memory_parallel.py, `ColumnParallelPeerRead`). Mode `row` is
not implemented: a row's owner would need each token's whole pre-value input to score it (ultramem.layout refuses
it).
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

if TYPE_CHECKING:  # annotations only: importing ultramem.config registers the families (this module) first
    from torch import nn

    from ultramem.config import ModelConfig, UltraMemV2Config


def _table() -> type:
    from ultramem.memory.ultramem_v2 import UltraMemV2Table  # lazy: torch stays out of config and planning

    return UltraMemV2Table


def build_shared(cfg: ModelConfig) -> nn.Module:
    """The global values / pre_values tables of all n_layers memory layers (the paper init calibrates their std
    against this model's FFN)."""
    return _table()(cfg.d_model, cfg.memory_v2, cfg.n_layers, cfg.init_std, cfg.ffn_inner)


def build_ffn(cfg: ModelConfig, index: int, shared: nn.Module) -> nn.Module:
    from ultramem.memory.ffn_memory import MemoryFFN  # lazy: torch stays out of config and planning
    from ultramem.memory.ultramem_v2 import UltraMemV2Layer  # lazy: same

    layer = UltraMemV2Layer(cfg.d_model, cfg.memory_v2, index, cfg.n_layers, cfg.init_std, shared)
    return MemoryFFN(build_mlp(cfg, index), layer)


def layer_params(v2: UltraMemV2Config, d_model: int, num_layers: int) -> int:
    """Dense parameters of ONE layer: query projection d x H 2 r' Dk (r' = r with query_per_rank, else 1), query and
    key RMSNorm 2 Dk, keys H 2 n Dk r, cores C H r^2, pre_values_proj d Dp, values_proj Dv d (no biases)."""
    H, r, Dk, n = v2.heads, v2.tucker_rank, v2.key_dim, v2.keys_per_side(num_layers)
    rq = r if v2.query_per_rank else 1
    return (d_model * H * 2 * rq * Dk + 2 * Dk + H * 2 * n * Dk * r + v2.num_cores * H * r * r
            + d_model * v2.pre_value_dim + v2.value_dim * d_model)


def model_params(cfg: ModelConfig) -> FFNParams:
    """n_layers x (MLP + memory layer) dense; the global table once (sparse); a token reads H m rows of both tables
    in every layer."""
    v2, L = cfg.memory_v2, cfg.n_layers
    width = v2.value_dim + v2.pre_value_dim
    return FFNParams(dense=L * (mlp_params(cfg).dense + layer_params(v2, cfg.d_model, L)),
                     sparse=v2.table_rows(L) * width, active_sparse=L * v2.heads * v2.top_m * width)


def layer_activations(cfg: ModelConfig) -> int:
    """Elements per token one layer keeps for the backward (2-byte units, an estimate): input d, queries H 2 r' Dk,
    rank scores H 2 r n, the m x m grid H m^2, winners (indices, core scores, pre-scores) H m (C + 6), the gathered
    pre-value rows H m Dp, pre-projection Dp, the pooled row Dv."""
    v2, d = cfg.memory_v2, cfg.d_model
    H, r, m, n = v2.heads, v2.tucker_rank, v2.top_m, v2.keys_per_side(cfg.n_layers)
    rq = r if v2.query_per_rank else 1
    return (d + H * 2 * rq * v2.key_dim + H * 2 * r * n + H * m * m + H * m * (v2.num_cores + 6)
            + H * m * v2.pre_value_dim + v2.pre_value_dim + v2.value_dim)


def ffn_activations(cfg: ModelConfig) -> int:
    return mlp_activations(cfg) + layer_activations(cfg)


def retrieval_flops(cfg: ModelConfig) -> int:
    """Per token, all layers (the layer module's count): per head 4 n r (rank-1 filter u^T S, v^T S), 2 m r^2 +
    2 m^2 r (the Tucker grid), C m (2 r^2 + 2 r) (the winners' per-core scores), C m (w = a s)."""
    v2, L = cfg.memory_v2, cfg.n_layers
    H, r, m, C, n = v2.heads, v2.tucker_rank, v2.top_m, v2.num_cores, v2.keys_per_side(L)
    return L * H * (4 * n * r + 2 * m * r * r + 2 * m * m * r + C * m * (2 * r * r + 2 * r) + C * m)


def window_coverage(v2: UltraMemV2Config, num_layers: int) -> dict[int, int]:
    """{c: rows of the global table covered by exactly c layers' ring windows} (c >= 1; rows no window reaches are
    left out). Window l: the n^2 rows from l x num_keys^2 on, wrapping mod Nall."""
    total, size = v2.table_rows(num_layers), v2.keys_per_side(num_layers) ** 2
    events: dict[int, int] = {0: 0, total: 0}
    for layer in range(num_layers):
        start = layer * v2.num_keys**2 % total
        end = start + size
        pieces = [(start, min(end, total))] + ([(0, end - total)] if end > total else [])
        for a, b in pieces:
            events[a] = events.get(a, 0) + 1
            events[b] = events.get(b, 0) - 1
    out: dict[int, int] = {}
    depth, points = 0, sorted(events)
    for a, b in zip(points, points[1:], strict=False):
        depth += events[a]
        if depth and b > a:
            out[depth] = out.get(depth, 0) + b - a
    return out


def decode_values(cfg: ModelConfig, batch_size: int) -> tuple[float, float]:
    """One decode step of B sequences: every layer draws B H m rows (of both tables) uniformly from its n^2-row
    window. A row covered by c windows stays unread with probability (1 - 1/n^2)^(c B H m), so the step reads
    sum over rows of 1 - that (the coupon collector over overlapping windows). Returns (parameters read, expected
    distinct rows per layer)."""
    v2, L = cfg.memory_v2, cfg.n_layers
    window = v2.keys_per_side(L) ** 2
    draws = batch_size * v2.heads * v2.top_m
    rows = sum(count * (1.0 - (1.0 - 1.0 / window) ** (c * draws)) for c, count in window_coverage(v2, L).items())
    return rows * (v2.value_dim + v2.pre_value_dim), expected_distinct(window, draws)


def value_lr(cfg: ModelConfig) -> ValueLR:
    return ValueLR(cfg.memory_v2.value_lr_mult, cfg.memory_v2.value_lr_decay)


def memory_tables(cfg: ModelConfig) -> MemoryTables:
    """What memory parallelism splits: both global tables by columns (mode dim only); every layer reads H m rows
    and weights chunk c of a value row by core c."""
    v2, L = cfg.memory_v2, cfg.n_layers
    return MemoryTables(block="model.memory_v2", rows=v2.table_rows(L), value_dim=v2.value_dim,
                        slots=v2.heads * v2.top_m, layers=L, num_cores=v2.num_cores,
                        pre_value_dim=v2.pre_value_dim, modes=("dim",))


def summary(cfg: ModelConfig, params: dict[str, int]) -> dict[str, Any]:
    """final.json's "memory" record: num_values = rows of the global table."""
    v2, L = cfg.memory_v2, cfg.n_layers
    return {"num_values": v2.table_rows(L), "top_m": v2.top_m, "heads": v2.heads, "value_expansion": 1,
            "num_layers": L, "value_params": params["sparse"], "keys_per_side": v2.keys_per_side(L),
            "share_ratio": v2.share_ratio}


FAMILY = register(Family(
    name="ultramem_v2",
    title="UltraMemV2",
    block="memory_v2",
    style=PlotStyle(label="ultramem-v2", color="#17a2b8", marker="P"),
    build_ffn=build_ffn,
    ffn_aux=True,
    aux_sum=True,  # the official code adds coefficient x loss in every layer (a backward hook per layer)
    ffn_params=mlp_params,  # the MLP of a block; with its memory layers and the table: model_params
    ffn_activations=ffn_activations,
    build_shared=build_shared,
    model_params=model_params,
    model_retrieval_flops=retrieval_flops,
    decode_values=decode_values,
    summary=summary,
    summary_block="memory",
    value_lr=value_lr,
    parallel=ParallelHooks(value_module=_table, value_params=("values", "pre_values"), memory_parallel=True,
                           memory_tables=memory_tables,
                           data_parallel_only="its global value / pre-value table is shared by the memory layers "
                                              "of every block, which FSDP's per-block units do not split (memory "
                                              "parallelism does: parallel.memory_parallel {mode: dim})"),
))
