"""What the product-key memory families (pkm, ultramem) share: memory layers placed by `model.memory.layers` on
the dense model (families/dense.py), the query path and value projection they count alike, and their final.json
summary. A new memory family reuses these and supplies its own keys, retrieval arithmetic and layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ultramem.families.registry import MemoryParams
from ultramem.memory.placement import parse_layers

if TYPE_CHECKING:  # annotations only: importing ultramem.config registers the families (this module) first
    from ultramem.config import MemoryConfig, ModelConfig


def memory_pairs(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(block read, block after which the output is added) per memory layer; [] without a memory block."""
    return parse_layers(cfg.memory.layers, cfg.n_layers) if cfg.memory is not None else []


def num_memory_layers(cfg: ModelConfig) -> int:
    return len(memory_pairs(cfg))


def memory_params(mem: MemoryConfig, d_model: int, keys: int) -> MemoryParams:
    """One layer with `keys` key (and core) parameters: + query projection, depthwise causal conv, query and key
    norm weights, value projection (dense); the value table N x D_v (sparse), of which a token reads H m rows."""
    Hq, Dk, Dv = mem.heads // mem.query_share, mem.key_dim, mem.value_dim
    dense = d_model * Hq * 2 * Dk  # query projection
    dense += d_model * mem.query_conv  # depthwise causal conv
    dense += 2 * Dk if mem.qk_norm else 0  # query norm + key norm weights
    dense += keys
    dense += mem.value_expansion * Dv * d_model if mem.value_proj else 0
    return MemoryParams(dense, mem.num_values * Dv, mem.heads * mem.top_m * Dv)


def memory_summary(cfg: ModelConfig, params: dict[str, int]) -> dict[str, Any]:
    m = cfg.memory
    return {"num_values": m.num_values, "top_m": m.top_m, "heads": m.heads, "value_expansion": m.value_expansion,
            "num_layers": num_memory_layers(cfg), "value_params": params["sparse"]}
