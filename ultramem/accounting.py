"""The one place for parameter counts, FLOPs per token and decode memory traffic. Pure Python (no torch).

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
Table 1 of the paper uses 2 x active non-embedding parameters only; `table1_comparison` uses that convention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ultramem.config import MemoryConfig, ModelConfig
from ultramem.memory.placement import parse_layers


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


@dataclass(frozen=True)
class MemoryParams:
    """One memory layer: dense (read by every token), values (sparse table), active_values (read per token)."""

    dense: int
    values: int
    active_values: int


def memory_layer_params(mem: MemoryConfig, d_model: int, family: str) -> MemoryParams:
    H, Hq, Dk, Dv = mem.heads, mem.heads // mem.query_share, mem.key_dim, mem.value_dim
    dense = d_model * Hq * 2 * Dk  # query projection
    dense += d_model * mem.query_conv  # depthwise causal conv
    dense += 2 * Dk if mem.qk_norm else 0  # query norm + key norm weights
    if family == "ultramem":
        dense += H * 2 * mem.keys_per_side * Dk * mem.tucker_rank  # keys [H, 2, n', Dk, r]
        dense += mem.num_cores * H * mem.tucker_rank**2  # cores [h, H, r, r]
    else:
        dense += H * 2 * mem.num_keys * Dk  # keys [H, 2, n, Dk]
    dense += mem.value_expansion * Dv * d_model if mem.value_proj else 0
    return MemoryParams(dense, mem.num_values * Dv, H * mem.top_m * Dv)


def num_memory_layers(cfg: ModelConfig) -> int:
    return len(parse_layers(cfg.memory.layers, cfg.n_layers)) if cfg.memory is not None else 0


def expert_hidden(cfg: ModelConfig) -> int:
    return cfg.moe.expert_hidden or cfg.ffn_inner


def count_params(cfg: ModelConfig) -> ParamCount:
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    embedding = V * d * (1 if cfg.tie_embeddings else 2)
    dense = L * (4 * d * d + 2 * d) + d  # attention, two norms per block, final norm
    sparse = active_sparse = 0
    if cfg.family == "moe":
        E, h = cfg.moe.num_experts, expert_hidden(cfg)
        dense += L * d * E  # router
        sparse, active_sparse = L * E * 2 * d * h, L * cfg.moe.top_k * 2 * d * h
    else:
        dense += L * 2 * d * cfg.ffn_inner
    if cfg.memory is not None:
        mp, M = memory_layer_params(cfg.memory, d, cfg.family), num_memory_layers(cfg)
        dense += M * mp.dense
        sparse, active_sparse = M * mp.values, M * mp.active_values
    non_embedding = dense + sparse
    active_non_embedding = dense + active_sparse
    return ParamCount(total=embedding + non_embedding, active=embedding + active_non_embedding,
                      embedding=embedding, non_embedding=non_embedding,
                      active_non_embedding=active_non_embedding, sparse=sparse)


def retrieval_flops(cfg: ModelConfig) -> int:
    """Per-token arithmetic of memory retrieval that involves no parameter (all memory layers)."""
    mem = cfg.memory
    if mem is None:
        return 0
    H, m = mem.heads, mem.top_m
    if cfg.family == "ultramem":
        r, h = mem.tucker_rank, mem.num_cores
        stage1 = 2 * 2 * mem.keys_per_side * r  # u^T S_row and t^T S_col for every key
        stage2 = 2 * m * r * r + 2 * m * m * r  # R (sum_c C_c), then the m x m grid
        winners = h * m * (2 * r * r + 2 * r)  # per-core scores of the m winners
        per_head = stage1 + stage2 + winners
    else:
        per_head = m * m  # candidate sums s_row[i] + s_col[j]
    return num_memory_layers(cfg) * H * per_head


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


def expected_distinct(n_items: int, n_draws: float, per_draw: int = 1) -> float:
    """E[#distinct items] when each of n_draws draws picks per_draw distinct items uniformly (coupon collector)."""
    return n_items * (1.0 - (1.0 - per_draw / n_items) ** n_draws)


def decode_bytes(cfg: ModelConfig, batch_size: int, kv_len: int, bytes_per_param: float = 2) -> DecodeBytes:
    """Bytes read per decode step, assuming uniform routing/selection (the paper's memory-access argument, §4.2).

    Dense parameters (everything but the sparse tables/experts) are read once per step, the output head in full,
    untied input-embedding rows once per sequence. MoE: each token picks top_k of E experts, so a layer reads the
    expected number of distinct experts E (1 - (1 - k/E)^B) (coupon collector; at most min(B k, E)). Memory: each
    layer reads the expected number of distinct physical rows among B*H*m uniform selections,
    N (1 - (1 - 1/N)^(B H m)) (at most min(B H m, N); virtual copies of one row share its bytes). KV cache:
    keys and values of every layer for kv_len positions.
    """
    pc = count_params(cfg)
    d, L, V, B = cfg.d_model, cfg.n_layers, cfg.vocab_size, batch_size
    params = pc.non_embedding - pc.sparse + V * d + (0 if cfg.tie_embeddings else min(B, V) * d)
    experts = rows = None
    if cfg.family == "moe":
        E, k = cfg.moe.num_experts, cfg.moe.top_k
        experts = expected_distinct(E, B, k)
        params += L * experts * 2 * d * expert_hidden(cfg)
    if cfg.memory is not None:
        mem = cfg.memory
        rows = expected_distinct(mem.num_values, B * mem.heads * mem.top_m)
        params += num_memory_layers(cfg) * rows * mem.value_dim
    kv = 2 * L * B * kv_len * d
    return DecodeBytes(params * bytes_per_param, kv * bytes_per_param, (params + kv) * bytes_per_param,
                       experts, rows)


# ---- the paper's Table 1 ----------------------------------------------------------------------------------------

# Huang et al. 2025, Table 1 (verbatim via the digest's [REV] source): total parameters (B) and GFLOPs per token.
PAPER_TABLE1: dict[str, tuple[float, float]] = {
    "dense-151m": (0.15, 0.30),
    "moe-151m-2in32": (2.04, 0.35),
    "ultramem-151m-x12": (2.03, 0.35),
    "dense-680m": (0.68, 1.36),
    "moe-680m-2in33": (8.95, 1.50),
    "ultramem-680m-x12": (8.93, 1.49),
    "dense-1.6b": (1.61, 3.21),
    "moe-1.6b-2in34": (21.36, 3.52),
    "ultramem-1.6b-x12": (21.41, 3.50),
    "dense-6.5b": (6.44, 12.88),
}


def table1_comparison(tolerance: float = 0.03) -> list[dict]:
    """Our paper-size presets against Table 1: non-embedding params and 2 x active non-embedding FLOPs."""
    from ultramem.presets import get_preset

    rows = []
    for name, (paper_b, paper_gflops) in PAPER_TABLE1.items():
        pc = count_params(get_preset(name))
        ours_b, ours_gflops = pc.non_embedding / 1e9, 2 * pc.active_non_embedding / 1e9
        err_b, err_f = ours_b / paper_b - 1, ours_gflops / paper_gflops - 1
        rows.append({"preset": name, "params_b": round(ours_b, 3), "paper_params_b": paper_b,
                     "params_rel_err": round(err_b, 4), "gflops": round(ours_gflops, 3),
                     "paper_gflops": paper_gflops, "gflops_rel_err": round(err_f, 4),
                     "within_tolerance": abs(err_b) <= tolerance and abs(err_f) <= tolerance})
    return rows
