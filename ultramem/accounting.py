"""The one place for parameter counts, FLOPs per token, decode memory traffic, and for distributed training the
layouts a model accepts, memory-parallel traffic and memory per GPU (bottom of the file). Pure Python (no torch).

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

from ultramem.config import ConfigError, MemoryConfig, ModelConfig
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


# ---- distributed training: layouts, communication and memory per GPU ---------------------------------------------

MEMORY_PARALLEL_MODES = ("none", "dim", "row")
TRAIN_STATE_BYTES = 16  # per trained parameter: fp32 master weight, fp32 gradient, AdamW exp_avg and exp_avg_sq


@dataclass(frozen=True)
class ParallelLayout:
    """How one run is spread over `world_size` processes (one per GPU); mirrors RunConfig.parallel.

    Dense parameters (attention, dense MLPs, router, norms, embeddings, memory keys and projections) are replicated
    (DDP) or, with `fsdp`, sharded over all ranks. MoE experts are split over groups of `expert_parallel` ranks and
    UltraMem value tables over groups of `memory_parallel_size` ranks; both are replicated across those groups.
    """

    world_size: int = 1
    fsdp: bool = False
    activation_checkpointing: bool = False
    expert_parallel: int = 1
    memory_parallel: str = "none"  # none | dim | row
    memory_parallel_size: int = 1

    @property
    def sharded(self) -> bool:
        """True when some state is split across ranks (the checkpoints are then sharded)."""
        return self.fsdp or self.expert_parallel > 1 or self.memory_parallel != "none"

    def describe(self) -> str:
        """'fsdp+mp-dim8', 'ddp', 'ep4+ddp+ac', 'single', ..."""
        if self.world_size == 1:
            parts = ["single"]
        else:
            parts = [p for p in (f"ep{self.expert_parallel}" if self.expert_parallel > 1 else "",
                                 f"mp-{self.memory_parallel}{self.memory_parallel_size}"
                                 if self.memory_parallel != "none" else "") if p]
            parts.append("fsdp" if self.fsdp else "ddp")
        return "+".join(parts + (["ac"] if self.activation_checkpointing else []))


def check_layout(cfg: ModelConfig, layout: ParallelLayout) -> None:
    """Raise ConfigError (naming the parallel.* field and the fix) unless `layout` can run `cfg`."""
    W, ep, mode, P = layout.world_size, layout.expert_parallel, layout.memory_parallel, layout.memory_parallel_size
    if mode not in MEMORY_PARALLEL_MODES:
        raise ConfigError(f"parallel.memory_parallel.mode: {mode!r}; allowed: {' | '.join(MEMORY_PARALLEL_MODES)}")
    if W == 1 and (layout.fsdp or ep > 1 or mode != "none"):
        raise ConfigError("parallel: fsdp, expert_parallel and memory_parallel shard state across processes; with "
                          "parallel.nproc 1 set fsdp: false, expert_parallel: 1, memory_parallel.mode: none")
    if ep > 1:
        if cfg.family != "moe":
            raise ConfigError(f"parallel.expert_parallel: {ep} needs model.family 'moe' (got {cfg.family!r}); set 1")
        if W % ep or cfg.moe.num_experts % ep:
            raise ConfigError(f"parallel.expert_parallel: {ep} must divide parallel.nproc ({W}) and "
                              f"model.moe.num_experts ({cfg.moe.num_experts})")
    if mode == "none":
        if P != 1:
            raise ConfigError(f"parallel.memory_parallel.size: {P} with mode 'none'; set mode dim|row or size 1")
        return
    if cfg.family != "ultramem":
        raise ConfigError(f"parallel.memory_parallel.mode: {mode!r} is implemented for UltraMem value tables; "
                          f"model.family is {cfg.family!r}: set mode: none")
    if P < 2 or W % P:
        raise ConfigError(f"parallel.memory_parallel.size: {P} must be >= 2 and divide parallel.nproc ({W})")
    mem = cfg.memory
    if mode == "dim":
        memory_parallel_cores(mem.value_dim, mem.num_cores, P)
    elif -(-mem.num_values // P) * (P - 1) >= mem.num_values:
        raise ConfigError(f"parallel.memory_parallel.size: {P} leaves a rank without value rows in mode 'row' "
                          f"(model.memory.num_keys^2 = {mem.num_values} rows in blocks of "
                          f"{-(-mem.num_values // P)}); use fewer ranks or mode 'dim'")


def memory_parallel_cores(value_dim: int, num_cores: int, size: int) -> int:
    """MCS cores whose scores one rank needs under the dimension-wise split: its D_v / P columns must lie inside
    one core's D_v / h columns (P a multiple of h: 1 core) or cover whole cores (h a multiple of P: h / P)."""
    if value_dim % size:
        raise ConfigError(f"parallel.memory_parallel.size: {size} must divide model.memory.value_dim ({value_dim}) "
                          "in mode 'dim' (each rank holds value_dim / size columns); use a divisor or mode 'row'")
    if size % num_cores and num_cores % size:
        raise ConfigError(f"parallel.memory_parallel.size: {size} must be a multiple or a divisor of "
                          f"model.memory.num_cores ({num_cores}) in mode 'dim', so that each rank's columns "
                          "belong to whole MCS cores")
    return max(1, num_cores // size)


def memory_parallel_bytes(mode: str, tokens: int, mem: MemoryConfig, size: int, index_bytes: int = 4,
                          float_bytes: int = 2) -> dict[str, dict[str, float]]:
    """Bytes one rank sends per memory layer per forward, {"paper": terms, "ours": terms}, each with a "total".

    tokens = bs, the tokens on this rank; slots K = heads * top_m (the paper's topm); pooled width E * D_v.
    paper: Huang et al. §5 (digest §5.5) with 4-byte indices and `float_bytes` (2 = bf16) for scores/values:
      dim  index 4 bs topm (P-1) + score 2 bs topm (P-1) + pooled 2 bs v_dim (P-1)/P  (v_dim = E D_v, pooled)
      row  index 4 bs topm (P-1)/P + values 2 bs topm v_dim (P-1)/P                   (v_dim = D_v, unpooled)
    ours: what ultramem.parallel.memory_parallel sends (the backward sends the same again as gradients); row mode
    assumes rows spread uniformly over the ranks (the IVE shuffle makes them so) and pools before sending back.
    """
    T, K, P = tokens, mem.heads * mem.top_m, size
    E, Dv, C, s, ib = mem.value_expansion, mem.value_dim, mem.num_cores, float_bytes, index_bytes
    if mode == "dim":
        paper = {"index": 4 * T * K * (P - 1), "score": 2 * T * K * (P - 1), "pooled": 2 * T * E * Dv * (P - 1) / P}
        c = memory_parallel_cores(Dv, C, P)
        ours = {"index": ib * T * K * (P - 1), "score": s * T * K * c * (P - 1), "pooled": s * T * E * Dv * (P - 1) / P}
    elif mode == "row":
        paper = {"index": 4 * T * K * (P - 1) / P, "values": 2 * T * K * Dv * (P - 1) / P}
        ours = {"index": ib * T * K * (P - 1) / P, "score": s * T * K * C * (P - 1) / P,
                "token_counts": 4 * T * (P - 1), "pooled": s * T * E * Dv * (P - 1)}
    else:
        raise ValueError(f"memory_parallel_bytes: mode {mode!r}; allowed: dim | row")
    return {name: {**terms, "total": sum(terms.values())} for name, terms in (("paper", paper), ("ours", ours))}


@dataclass(frozen=True)
class TrainMemory:
    """Estimated peak memory of one training process (bytes): sharded state, FSDP/DDP buffers, activations."""

    state: float  # parameters, gradients and AdamW moments held by this rank (TRAIN_STATE_BYTES per parameter)
    buffers: float  # FSDP: unsharded parameters and gradients of the units in flight; DDP: gradient buckets
    activations: float  # saved for the backward over one micro-batch, plus the output logits
    total: float

    @property
    def gb(self) -> float:
        return self.total / 1e9


def train_memory(cfg: ModelConfig, layout: ParallelLayout, micro_batch_size: int, seq_len: int,
                 compute_bytes: int = 2) -> TrainMemory:
    """Peak bytes per GPU for training `cfg` with `layout` (an estimate for planning; docs/parallelism.md).

    State: 16 bytes per parameter this rank holds (value tables / P_mp, experts / P_ep, the rest / W with FSDP).
    Buffers: with FSDP, two units (the one computing and the one prefetched) unsharded in `compute_bytes` plus one
    unit's unsharded fp32 gradients before the reduce-scatter; with DDP, its fp32 gradient buckets (a second copy
    of the replicated gradients). Activations per token and block, in `compute_bytes`-byte elements
    (Korthikanti et al. 2022, Table 2, with fused attention so no T^2 term): attention 11 d, norms 4 d, MLP
    3 d + 4 f (34 d for f = 4 d); an MoE FFN 3 d + k (4 d + 4 h) + 12 E; a memory layer its queries, slot indices
    and scores (and, under memory parallelism, those of the P ranks it pools for) and two pooled vectors; with
    activation checkpointing each block keeps only its input (2 d) and one block is recomputed at a time.
    Logits: 10 V bytes per token (bf16 logits, their fp32 copy for the loss, its gradient).
    """
    check_layout(cfg, layout)
    d, L, V, W = cfg.d_model, cfg.n_layers, cfg.vocab_size, layout.world_size
    pc = count_params(cfg)
    tokens = micro_batch_size * seq_len
    values = pc.sparse if cfg.memory is not None else 0
    experts = pc.sparse if cfg.family == "moe" else 0
    dense = pc.total - values - experts
    mp = layout.memory_parallel_size if layout.memory_parallel != "none" else 1
    held_values = values / mp if mp > 1 else values / (W if layout.fsdp else 1)
    held_experts = experts / layout.expert_parallel if layout.expert_parallel > 1 else experts / (W if layout.fsdp else 1)
    held_dense = dense / (W if layout.fsdp else 1)
    state = TRAIN_STATE_BYTES * (held_values + held_experts + held_dense)

    M = num_memory_layers(cfg)
    table = values / M if M else 0
    mem_dense = memory_layer_params(cfg.memory, d, cfg.family).dense if M else 0  # one memory layer's non-table
    block = (dense - pc.embedding - M * mem_dense) / L
    if layout.fsdp:
        units = [pc.embedding, block + (experts / L if layout.expert_parallel == 1 else 0)]
        if M:
            units.append(mem_dense + (table if mp == 1 else 0))
        biggest = max(units)
        buffers = 2 * biggest * compute_bytes + 4 * biggest
    else:
        buffers = 4 * (dense + (values if mp == 1 else 0) + (experts if layout.expert_parallel == 1 else 0))

    if cfg.family == "moe":
        k, h, E = cfg.moe.top_k, expert_hidden(cfg), cfg.moe.num_experts
        ffn = 3 * d + k * (4 * d + 4 * h) + 12 * E
    else:
        ffn = 3 * d + 4 * cfg.ffn_inner
    per_block = (11 * d + 4 * d + ffn) * compute_bytes / 2  # Korthikanti's counts are for 2-byte elements
    if layout.activation_checkpointing:
        blocks = L * d * compute_bytes + per_block
    else:
        blocks = L * per_block
    mem_layers = 0.0
    if M:
        mem = cfg.memory
        K, Hq = mem.heads * mem.top_m, mem.heads // mem.query_share
        gathered = mp if layout.memory_parallel == "dim" else 1
        slots = K * gathered * (4 + 4 + 4 * mem.num_cores)  # row ids, groups, scores kept for the backward
        mem_layers = M * (compute_bytes * (d + 4 * Hq * mem.key_dim + 2 * mem.value_expansion * mem.value_dim)
                          + slots)
    logits = 10 * V
    activations = tokens * (blocks + mem_layers + logits)
    return TrainMemory(state, buffers, activations, state + buffers + activations)
