"""The one place for parameter counts, FLOPs per token and decode memory traffic. Pure Python (no torch).

Each family contributes its part through its `Family` record (ultramem/families): one block's FFN parameters, one
memory layer's parameters and retrieval arithmetic, the experts a decode step reads; or, for families whose blocks
differ or share a table (memory_plus, ultramem_v2), all FFN-side layers at once (`model_params`,
`model_retrieval_flops`, `decode_values`). This module adds the shared
backbone (attention, norms, embeddings) and the memory value rows. What a parallel layout needs per GPU and sends
is in `ultramem.layout`; the presets against the paper's Table 1 in `ultramem.presets`.

Counting conventions (tests check `count_params` against `sum(p.numel())` of the built modules):
  embedding             token embedding V*d, plus the output head V*d when it is not tied
  sparse                parameters a token selects from: memory value tables (PKM/UltraMem `values`) and the
                        routed experts of MoE layers
  active                total - sparse + what one token reads of them: top_k experts per MoE layer, heads*top_m
                        value rows per memory layer (one row per selected slot, duplicates included)
  non_embedding, active_non_embedding   the same without the embedding parameters
FLOPs (forward, per token): 2 x active non-embedding parameters (every one is a multiply-add: keys too, since each
token scores every key), + 2 V d for the output logits, + the retrieval arithmetic that has no parameter (TDQKR
stage-1 projections and the stage-2 grid, PKM's m x m candidate sums), + attention 4 L d T when seq_len T is given
(QK^T and AV over the full context, PaLM's convention, no causal discount). Training = 3 x forward.
Table 1 of the paper uses 2 x active non-embedding parameters only; `ultramem.presets.table1_comparison` uses that
convention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ultramem.config import MemoryConfig, ModelConfig
from ultramem.families import MemoryParams, expected_distinct, get_family
from ultramem.families.product_keys import num_memory_layers


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    embedding: int
    non_embedding: int
    active_non_embedding: int
    sparse: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def memory_layer_params(mem: MemoryConfig, d_model: int, family: str) -> MemoryParams:
    """One memory layer of `family` (keys, cores, projections: dense; the value table: sparse)."""
    return get_family(family).memory_params(mem, d_model)


def count_params(cfg: ModelConfig) -> ParamCount:
    fam = get_family(cfg.family)
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    embedding = V * d * (1 if cfg.tie_embeddings else 2)
    dense = L * (4 * d * d + 2 * d) + d  # attention, two norms per block, final norm
    if fam.model_params is not None:  # blocks that differ, tables shared across blocks: the family counts them all
        ffn = fam.model_params(cfg)
        dense, sparse, active_sparse = dense + ffn.dense, ffn.sparse, ffn.active_sparse
    else:
        ffn = fam.ffn_params(cfg)
        dense += L * ffn.dense
        sparse, active_sparse = L * ffn.sparse, L * ffn.active_sparse
    if fam.memory_params is not None:
        mp, M = fam.memory_params(cfg.memory, d), num_memory_layers(cfg)
        dense += M * mp.dense
        sparse, active_sparse = sparse + M * mp.values, active_sparse + M * mp.active_values
    non_embedding = dense + sparse
    active_non_embedding = dense + active_sparse
    return ParamCount(total=embedding + non_embedding, active=embedding + active_non_embedding,
                      embedding=embedding, non_embedding=non_embedding,
                      active_non_embedding=active_non_embedding, sparse=sparse)


def retrieval_flops(cfg: ModelConfig) -> int:
    """Per-token arithmetic of memory retrieval that involves no parameter (all memory layers)."""
    fam = get_family(cfg.family)
    if fam.model_retrieval_flops is not None:
        return fam.model_retrieval_flops(cfg)
    if fam.retrieval_flops is None:
        return 0
    return num_memory_layers(cfg) * fam.retrieval_flops(cfg.memory)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = False) -> float:
    """Forward FLOPs per token (x3 for training) counting activated parameters only; attention if seq_len given."""
    forward = 2 * count_params(cfg).active_non_embedding + 2 * cfg.vocab_size * cfg.d_model + retrieval_flops(cfg)
    if seq_len:
        forward += 4 * cfg.n_layers * cfg.d_model * seq_len
    return float(3 * forward if training else forward)


@dataclass(frozen=True)
class DecodeBytes:
    """Memory traffic of one decode step (sequence length 1 per sequence) for a batch."""

    params: float  # bytes of parameters read
    kv_cache: float  # bytes of keys/values read
    total: float
    experts_touched: float | None  # expected distinct experts per MoE layer
    value_rows_touched: float | None  # expected distinct physical value rows per memory layer


def decode_bytes(cfg: ModelConfig, batch_size: int, kv_len: int, bytes_per_param: float = 2) -> DecodeBytes:
    """Bytes read per decode step, assuming uniform routing/selection (the paper's memory-access argument, §4.2).

    Dense parameters (everything but the sparse tables/experts) are read once per step, the output head in full,
    untied input-embedding rows once per sequence. MoE: each token picks top_k of E experts, so a layer reads the
    expected number of distinct experts E (1 - (1 - k/E)^B) (coupon collector; at most min(B k, E)). Memory: each
    layer reads the expected number of distinct physical rows among B*H*m uniform selections,
    N (1 - (1 - 1/N)^(B H m)) (at most min(B H m, N); virtual copies of one row share its bytes). KV cache:
    keys and values of every layer for kv_len positions.
    """
    fam = get_family(cfg.family)
    pc = count_params(cfg)
    d, L, V, B = cfg.d_model, cfg.n_layers, cfg.vocab_size, batch_size
    params = pc.non_embedding - pc.sparse + V * d + (0 if cfg.tie_embeddings else min(B, V) * d)
    experts = rows = None
    if fam.decode_experts is not None:
        read, experts = fam.decode_experts(cfg, B)
        params += read
    if fam.decode_values is not None:  # the family's own tables (shared ones: each row once per step)
        read, rows = fam.decode_values(cfg, B)
        params += read
    elif cfg.memory is not None:
        mem = cfg.memory
        rows = expected_distinct(mem.num_values, B * mem.heads * mem.top_m)
        params += num_memory_layers(cfg) * rows * mem.value_dim
    kv = 2 * L * B * kv_len * d
    return DecodeBytes(params * bytes_per_param, kv * bytes_per_param, (params + kv) * bytes_per_param,
                       experts, rows)


__all__ = [
    "DecodeBytes",
    "MemoryParams",
    "ParamCount",
    "count_params",
    "decode_bytes",
    "expected_distinct",
    "flops_per_token",
    "memory_layer_params",
    "num_memory_layers",
    "retrieval_flops",
]
