"""The parallel-layout memory model: which layouts a model accepts, what memory parallelism sends, and the memory
per GPU of a training process. Pure Python (no torch): sweep planning checks and prices layouts with it.

`ParallelLayout` mirrors RunConfig.parallel (experiments/config.py); `check_layout` refuses a layout the model
cannot use, naming the field and the fix; `memory_parallel_bytes` gives the paper's and our communication per
memory layer, `memory_parallel_traffic` what a whole model's memory layers send per micro-batch (by the names
`CommStats` records); `train_memory` estimates the peak bytes per GPU (docs/parallelism.md). What each family
allows (expert / memory parallelism) comes from its `Family.parallel` hooks (the tables memory parallelism splits:
`memory_tables`), its sizes from `ultramem.accounting`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ultramem.accounting import count_params, num_memory_layers
from ultramem.config import MemoryConfig, ModelConfig
from ultramem.errors import ConfigError
from ultramem.families import families, get_family
from ultramem.families.registry import MemoryTables

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
    fam = get_family(cfg.family)
    only_dp = fam.parallel.data_parallel_only
    mp_ok = fam.parallel.memory_parallel
    if only_dp and (layout.fsdp or ep > 1 or (mode != "none" and not mp_ok)):
        name = "fsdp" if layout.fsdp else "expert_parallel" if ep > 1 else "memory_parallel.mode"
        fix = ("parallel.fsdp: false, parallel.expert_parallel: 1" if mp_ok else
               "parallel.fsdp: false, parallel.expert_parallel: 1, parallel.memory_parallel.mode: none")
        raise ConfigError(f"parallel.{name}: model.family {cfg.family!r} trains its dense part with plain data "
                          f"parallelism only: {only_dp}; set {fix} (parallel.nproc > 1 runs DDP)")
    if ep > 1:
        if fam.parallel.expert_module is None:
            names = " or ".join(repr(f.name) for f in families() if f.parallel.expert_module is not None)
            raise ConfigError(f"parallel.expert_parallel: {ep} needs model.family {names} (got {cfg.family!r}); set 1")
        experts = fam.parallel.num_experts(cfg)
        if W % ep or experts % ep:
            raise ConfigError(f"parallel.expert_parallel: {ep} must divide parallel.nproc ({W}) and "
                              f"model.{fam.block}.num_experts ({experts})")
    if mode == "none":
        if P != 1:
            raise ConfigError(f"parallel.memory_parallel.size: {P} with mode 'none'; set mode dim|row or size 1")
        return
    if not mp_ok:
        titles = [f.title for f in families() if f.parallel.memory_parallel]
        titles = " and ".join([", ".join(titles[:-1]), titles[-1]] if len(titles) > 1 else titles)
        raise ConfigError(f"parallel.memory_parallel.mode: {mode!r} is implemented for {titles} value tables; "
                          f"model.family is {cfg.family!r}: set mode: none")
    if P < 2 or W % P:
        raise ConfigError(f"parallel.memory_parallel.size: {P} must be >= 2 and divide parallel.nproc ({W})")
    tables = memory_tables(cfg)
    if mode not in tables.modes:
        raise ConfigError(f"parallel.memory_parallel.mode: {mode!r} is not implemented for {fam.title} (its layers "
                          f"implement {' | '.join(tables.modes)}); set mode: {tables.modes[0]}")
    if mode == "dim":
        column_split_cores(tables, P)
    elif -(-tables.rows // P) * (P - 1) >= tables.rows:
        raise ConfigError(f"parallel.memory_parallel.size: {P} leaves a rank without value rows in mode 'row' "
                          f"({tables.block} tables of {tables.rows} rows in blocks of {-(-tables.rows // P)}); "
                          "use fewer ranks or mode 'dim'")
    if layout.activation_checkpointing and fam.build_shared is not None:
        # these families' memory layers sit inside the blocks that activation checkpointing recomputes
        raise ConfigError(f"parallel.activation_checkpointing: model.family {cfg.family!r} has its memory layers "
                          "inside the blocks, and recomputing a block under memory parallelism would repeat the "
                          "layer's communication; set activation_checkpointing: false (or memory_parallel.mode: "
                          "none)")


def memory_tables(cfg: ModelConfig) -> MemoryTables | None:
    """The value tables memory parallelism would split in `cfg`: the family's `memory_tables` hook, else
    `model.memory`'s per-layer tables (PKM, UltraMem); None without either."""
    fam = get_family(cfg.family)
    if fam.parallel.memory_tables is not None:
        return fam.parallel.memory_tables(cfg)
    if cfg.memory is None:
        return None
    return _tables_of(cfg.memory, num_memory_layers(cfg))


def _tables_of(mem: MemoryConfig, layers: int = 1) -> MemoryTables:
    return MemoryTables(block="model.memory", rows=mem.num_values, value_dim=mem.value_dim,
                        slots=mem.heads * mem.top_m, layers=layers, num_cores=mem.num_cores,
                        groups=mem.value_expansion)


def memory_parallel_cores(value_dim: int, num_cores: int, size: int, block: str = "model.memory",
                          value_field: str = "value_dim") -> int:
    """MCS cores whose scores one rank needs under the dimension-wise split: its D_v / P columns must lie inside
    one core's D_v / h columns (P a multiple of h: 1 core) or cover whole cores (h a multiple of P: h / P)."""
    if value_dim % size:
        raise ConfigError(f"parallel.memory_parallel.size: {size} must divide {block}.{value_field} ({value_dim}) "
                          "in mode 'dim' (each rank holds value_dim / size columns); use a divisor or mode 'row'")
    if size % num_cores and num_cores % size:
        raise ConfigError(f"parallel.memory_parallel.size: {size} must be a multiple or a divisor of "
                          f"{block}.num_cores ({num_cores}) in mode 'dim', so that each rank's columns "
                          "belong to whole MCS cores")
    return max(1, num_cores // size)


def column_split_cores(tables: MemoryTables, size: int) -> int:
    """`memory_parallel_cores` for every table split by columns (a pre-value table too: size must divide D_p)."""
    if tables.pre_value_dim % size:
        raise ConfigError(f"parallel.memory_parallel.size: {size} must divide {tables.block}.pre_value_dim "
                          f"({tables.pre_value_dim}) in mode 'dim' (each rank holds pre_value_dim / size columns "
                          "of the pre-value table); use a divisor of it")
    return memory_parallel_cores(tables.value_dim, tables.num_cores, size, tables.block, tables.value_field)


def memory_parallel_bytes(mode: str, tokens: int, mem: MemoryConfig | MemoryTables, size: int, index_bytes: int = 4,
                          float_bytes: int = 2) -> dict[str, dict[str, float]]:
    """Bytes one rank sends per memory layer per forward, {"paper": terms, "ours": terms}, each with a "total".

    `mem`: an UltraMem/PKM memory block, or any family's `MemoryTables` (`memory_tables(cfg)`). tokens = bs, the
    tokens on this rank; slots K = heads * top_m (the paper's topm); pooled width E * D_v.
    paper: Huang et al. §5 (digest §5.5) with 4-byte indices and `float_bytes` (2 = bf16) for scores/values:
      dim  index 4 bs topm (P-1) + score 2 bs topm (P-1) + pooled 2 bs v_dim (P-1)/P  (v_dim = E D_v, pooled)
      row  index 4 bs topm (P-1)/P + values 2 bs topm v_dim (P-1)/P                   (v_dim = D_v, unpooled)
    ours: what ultramem.parallel.memory_parallel sends (the backward sends the same again as gradients); row mode
    assumes rows spread uniformly over the ranks (the IVE shuffle makes them so) and pools before sending back.
    A table with pre-values (UltraMemV2, dim only; no "paper" entry) also sends each token's pre-value input by
    column shard, s bs D_p (P-1)/P ("pre_input"), and gets back the P - 1 other shards' partial pre-scores
    <p slice, P[row] slice>, s bs topm (P-1) ("pre_score"); its "score" terms are then the PEER weights a_k s_kc.
    """
    t = _tables_of(mem) if isinstance(mem, MemoryConfig) else mem
    T, K, P = tokens, t.slots, size
    E, Dv, C, s, ib = t.groups, t.value_dim, t.num_cores, float_bytes, index_bytes
    if mode == "dim":
        paper = {"index": 4 * T * K * (P - 1), "score": 2 * T * K * (P - 1), "pooled": 2 * T * E * Dv * (P - 1) / P}
        c = column_split_cores(t, P)
        ours = {"index": ib * T * K * (P - 1), "score": s * T * K * c * (P - 1), "pooled": s * T * E * Dv * (P - 1) / P}
        if t.pre_value_dim:
            ours.update(pre_input=s * T * t.pre_value_dim * (P - 1) / P, pre_score=s * T * K * (P - 1))
    elif mode == "row":
        if t.pre_value_dim:
            raise ValueError("memory_parallel_bytes: mode 'row' is not implemented for tables with pre-values")
        paper = {"index": 4 * T * K * (P - 1) / P, "values": 2 * T * K * Dv * (P - 1) / P}
        ours = {"index": ib * T * K * (P - 1) / P, "score": s * T * K * C * (P - 1) / P,
                "token_counts": 4 * T * (P - 1), "pooled": s * T * E * Dv * (P - 1)}
    else:
        raise ValueError(f"memory_parallel_bytes: mode {mode!r}; allowed: dim | row")
    out = {"paper": paper, "ours": ours} if not t.pre_value_dim else {"ours": ours}
    return {name: {**terms, "total": sum(terms.values())} for name, terms in out.items()}


GRADIENT_FREE = ("index", "token_counts")  # integer payloads: the backward sends nothing back for them


def memory_parallel_traffic(cfg: ModelConfig, mode: str, tokens: int, size: int, index_bytes: int = 4,
                            float_bytes: int = 2) -> dict[str, float]:
    """Bytes one rank sends for one micro-batch of `tokens` tokens, forward + backward, over all memory layers,
    under the names `CommStats` records: each "ours" term of `memory_parallel_bytes` times the layers, its
    "<name>_grad" twin (the reverse all-to-all of the backward) for every float term, and "meta": every layer
    first exchanges the ranks' token counts (one int64 all-gather, 8 (P-1) bytes). Row mode assumes rows spread
    uniformly over the ranks (index and score are then expectations). A micro-batch with tokens padded to the
    longest rank of a group counts the padded tokens."""
    t = memory_tables(cfg)
    if t is None:
        raise ValueError(f"memory_parallel_traffic: model.family {cfg.family!r} has no value tables")
    per_layer = memory_parallel_bytes(mode, tokens, t, size, index_bytes, float_bytes)["ours"]
    out: dict[str, float] = {"meta": 8 * (size - 1) * t.layers}
    for name, value in per_layer.items():
        if name == "total":
            continue
        out[name] = t.layers * value
        if name not in GRADIENT_FREE:
            out[f"{name}_grad"] = t.layers * value
    return out


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
    and scores (and, under memory parallelism, those of the P ranks it pools for) and two pooled vectors (layers
    inside the blocks, Memory+ and UltraMemV2: their ffn_activations, plus under dim memory parallelism the other
    ranks' slots and column slices they pool for); with
    activation checkpointing each block keeps only its input (2 d) and one block is recomputed at a time.
    Logits: 10 V bytes per token (bf16 logits, their fp32 copy for the loss, its gradient).
    """
    check_layout(cfg, layout)
    fam = get_family(cfg.family)
    d, L, V, W = cfg.d_model, cfg.n_layers, cfg.vocab_size, layout.world_size
    pc = count_params(cfg)
    tokens = micro_batch_size * seq_len
    # routed experts (expert parallelism splits them); families counting all FFN-side layers at once
    # (Family.model_params) have no routed experts: their sparse parameters are value tables
    experts = 0 if fam.model_params is not None else L * fam.ffn_params(cfg).sparse
    values = pc.sparse - experts  # memory value tables (memory parallelism splits them)
    dense = pc.total - values - experts
    mp = layout.memory_parallel_size if layout.memory_parallel != "none" else 1
    held_values = values / mp if mp > 1 else values / (W if layout.fsdp else 1)
    held_experts = experts / layout.expert_parallel if layout.expert_parallel > 1 else experts / (W if layout.fsdp else 1)
    held_dense = dense / (W if layout.fsdp else 1)
    state = TRAIN_STATE_BYTES * (held_values + held_experts + held_dense)

    M = num_memory_layers(cfg)
    table = values / M if M else 0
    mem_dense = fam.memory_params(cfg.memory, d).dense if M else 0  # one memory layer's non-table
    block = (dense - pc.embedding - M * mem_dense) / L
    if layout.fsdp:
        units = [pc.embedding, block + (experts / L if layout.expert_parallel == 1 else 0)]
        if M:
            units.append(mem_dense + (table if mp == 1 else 0))
        biggest = max(units)
        buffers = 2 * biggest * compute_bytes + 4 * biggest
    else:
        buffers = 4 * (dense + (values if mp == 1 else 0) + (experts if layout.expert_parallel == 1 else 0))

    ffn = fam.ffn_activations(cfg)
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
    elif layout.memory_parallel == "dim" and fam.parallel.memory_tables is not None:
        # layers inside the blocks (their own activations are in ffn_activations): what dim memory parallelism keeps
        # of the P - 1 other ranks' tokens for the backward: slot ids, the weights of the rank's cores, partial
        # pre-scores and the column slices of pre-inputs and pooled vectors
        t, P = memory_tables(cfg), layout.memory_parallel_size
        c = column_split_cores(t, P)
        per_token = 4 * t.slots + compute_bytes * (t.slots * (c + (1 if t.pre_value_dim else 0))
                                                   + (t.pre_value_dim + t.groups * t.value_dim) / P)
        mem_layers = t.layers * (P - 1) * per_token
    logits = 10 * V
    activations = tokens * (blocks + mem_layers + logits)
    return TrainMemory(state, buffers, activations, state + buffers + activations)
