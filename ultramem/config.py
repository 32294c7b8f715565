"""Typed model configuration shared by every family (dense, MoE, PKM, UltraMem; the registry: ultramem/families).

A `ModelConfig` is plain data: it is what presets define, what sweeps override field by field and what every run
saves in its resolved `config.yaml`. `ModelConfig.from_dict` rejects unknown keys with the dotted path of the bad
key and the allowed names, so a typo in YAML never passes silently.

Shapes that the rest of the library (model, accounting) relies on are stated next to each field. Which block a
family needs, and any check of its own, come from its `Family` record, looked up by name in the registry
(ultramem/families/registry.py, which imports nothing of this module): the family modules import these types, so
imports run one way, registry < config < families (tests/test_layering.py forbids cycles inside ultramem/).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from ultramem.errors import ConfigError
from ultramem.errors import check as _check
from ultramem.families.registry import families, get_family  # by name: the family modules import this module
from ultramem.memory.placement import memory_plus_blocks, parse_layers


@dataclass
class MoEConfig:
    """Token-choice top-k MoE FFN replacing the dense MLP in every block (paper's "MoE-<size>-2in<N>")."""

    num_experts: int = 8  # number of routed experts per block
    top_k: int = 2  # experts per token
    expert_hidden: int = 0  # inner width of each expert MLP (2 matrices, d->h->d); 0 = the model's ffn_hidden
    balance_loss_weight: float = 0.01  # Switch load-balancing loss coefficient (E * sum_i f_i P_i)
    z_loss_weight: float = 0.001  # ST-MoE router z-loss coefficient (mean logsumexp(logits)^2)
    grouped_mm: str = "auto"  # auto | on | off: use torch._grouped_mm for the expert matmuls when supported
    normalize_gates: bool = True  # renormalise the top-k router probs to sum to 1 (official OLMoE/MegaBlocks: false)

    def validate(self, path: str = "model.moe") -> None:
        _check(self.num_experts >= 1, f"{path}.num_experts", self.num_experts, "an integer >= 1")
        _check(1 <= self.top_k <= self.num_experts, f"{path}.top_k", self.top_k, f"1..num_experts ({self.num_experts})")
        _check(self.expert_hidden >= 0, f"{path}.expert_hidden", self.expert_hidden, "an integer >= 0")
        _check(self.grouped_mm in ("auto", "on", "off"), f"{path}.grouped_mm", self.grouped_mm, "auto | on | off")


@dataclass
class MemoryConfig:
    """A product-key memory: PKM (Lample et al. 2019) or UltraMem v1 (Huang et al. 2025).

    Per memory layer (shapes for UltraMem; PKM has E=1, r=1, h=1 and additive row + column scores, no cores):
      - physical value table V: [num_keys**2, value_dim]                       (N = num_keys**2 rows)
      - key grid per side: n' = num_keys * sqrt(value_expansion)               (IVE: E*N virtual slots)
      - keys: [heads, 2 (row/col), n', key_dim, tucker_rank]
      - query projection: Linear(d_model, (heads // query_share) * 2 * key_dim)
      - Tucker cores: [num_cores, heads, tucker_rank, tucker_rank]
      - value projection: Linear(value_expansion * value_dim, d_model)       (if value_proj)
    Every token selects top_m slots per head, so heads * top_m value rows are read per token per layer.
    """

    layers: str = "every"  # "every" (one memory layer per block) or skip-layer spec "a:b/c:d" (0-indexed blocks):
    #                       memory j reads the pre-FFN normalised state of block a, its output is added after block b
    num_keys: int = 32  # n: physical sub-keys per side; N = n**2 physical value rows per layer
    key_dim: int = 32  # D_k: width of the row query and of the column query (each)
    value_dim: int = 64  # D_v: width of one physical value row
    heads: int = 2  # H: key sets, each with its own top_m selection; the heads share the value table
    query_share: int = 2  # heads that share one query projection (paper's "share query"); must divide heads
    top_m: int = 16  # m: slots selected per head per token
    score: str = "none"  # activation on selected scores: none (UltraMem: raw scores) | softmax (PKM) | relu
    qk_norm: bool = True  # RMSNorm (affine) on queries and keys
    query_conv: int = 0  # kernel size of the causal depthwise conv before the query projection; 0 = off
    value_proj: bool = True  # "half value dim + projection": Linear(E*D_v -> d_model); if False D_v*E must == d_model
    tucker_rank: int = 2  # r: rank of the Tucker core (TDQKR); 1 = plain product keys
    num_cores: int = 2  # h: MCS cores; core c weights columns [c*D_v/h, (c+1)*D_v/h) of each value
    value_expansion: int = 4  # E: IVE virtual copies (a perfect square); 1 = no expansion
    tucker_penalty: float = 0.0  # alpha of the Tucker-core penalty alpha/(r-1) sum relu(lambda_i - tau)^2 (paper 1e-3)
    tucker_margin: float = 0.15  # tau of that penalty
    # UltraMem only: beta of UltraMemV2's key-balance loss on the stage-1 scores (V2 Eq. 18-20; v1 has none: 0)
    balance_loss_weight: float = 0.0
    init: str = "paper"  # paper: V ~ N(0, E/(2 m H L)) + score calibration; official: released code; xlm: PKM's
    value_lr_mult: float = 4.0  # value-table LR multiplier at step 0 (official code 4; v1 explainers 10)
    value_lr_decay: float = 1.0  # fraction of training over which that multiplier decays linearly to 1
    # weight decay of the value tables; None: the run's train.weight_decay, as the official code (values decay)
    value_weight_decay: float | None = None
    dropout: float = 0.0  # dropout on the memory output

    @property
    def key_expansion(self) -> int:
        return math.isqrt(self.value_expansion)

    @property
    def keys_per_side(self) -> int:
        return self.num_keys * self.key_expansion

    @property
    def num_values(self) -> int:
        return self.num_keys**2

    def validate(self, path: str = "model.memory") -> None:
        E = self.value_expansion
        _check(E >= 1 and math.isqrt(E) ** 2 == E, f"{path}.value_expansion", E, "a perfect square (1, 4, 9, 16)")
        _check(self.num_keys >= 2, f"{path}.num_keys", self.num_keys, "an integer >= 2")
        _check(self.heads >= 1 and self.heads % self.query_share == 0, f"{path}.query_share", self.query_share,
               f"a divisor of heads ({self.heads})")
        _check(1 <= self.top_m <= self.keys_per_side, f"{path}.top_m", self.top_m,
               f"1..keys_per_side ({self.keys_per_side})")
        _check(self.score in ("none", "softmax", "relu"), f"{path}.score", self.score, "none | softmax | relu")
        _check(self.tucker_rank >= 1, f"{path}.tucker_rank", self.tucker_rank, "an integer >= 1")
        _check(self.num_cores >= 1 and self.value_dim % self.num_cores == 0, f"{path}.num_cores", self.num_cores,
               f"a divisor of value_dim ({self.value_dim})")
        _check(self.init in ("paper", "official", "xlm"), f"{path}.init", self.init, "paper | official | xlm")
        _check(self.tucker_penalty >= 0.0, f"{path}.tucker_penalty", self.tucker_penalty, "a number >= 0")
        _check(self.tucker_penalty == 0.0 or self.tucker_rank >= 2, f"{path}.tucker_penalty", self.tucker_penalty,
               "0 when tucker_rank is 1 (the penalty acts on singular values 2..r)")
        _check(self.balance_loss_weight >= 0.0, f"{path}.balance_loss_weight", self.balance_loss_weight,
               "a number >= 0 (0: off, the v1 paper's setting; UltraMemV2 used 1e-3)")
        _check(0.0 <= self.dropout < 1.0, f"{path}.dropout", self.dropout, "a fraction in [0, 1)")
        _check(self.value_lr_mult >= 1.0, f"{path}.value_lr_mult", self.value_lr_mult, "a number >= 1")
        _check(0.0 < self.value_lr_decay <= 1.0, f"{path}.value_lr_decay", self.value_lr_decay, "a fraction in (0, 1]")
        _check(self.value_weight_decay is None or self.value_weight_decay >= 0.0, f"{path}.value_weight_decay",
               self.value_weight_decay, "null (the run's weight_decay) or a number >= 0")
        _check(self.query_conv >= 0, f"{path}.query_conv", self.query_conv, "0 (off) or a kernel size >= 1")


@dataclass
class UltraMemV2Config:
    """UltraMemV2 (ByteDance Seed 2025, arXiv 2508.18756): a memory layer in every block, beside the FFN.

    With L memory layers and n = keys_per_side(L):
      - one global table for all layers: values [Nall, value_dim] and pre_values [Nall, pre_value_dim],
        Nall = num_keys**2 * L rows (`table_rows`)
      - layer l reads the ring window of n**2 rows starting at row l * num_keys**2, wrapping mod Nall
      - per layer: keys [heads, 2 (row/col), n, key_dim, tucker_rank]; cores [num_cores, heads, r, r];
        query_proj Linear(d_model, heads * 2 * (tucker_rank if query_per_rank else 1) * key_dim);
        pre_values_proj Linear(d_model, pre_value_dim); values_proj Linear(value_dim, d_model); 2 RMSNorm(key_dim)
    Every token reads heads * top_m rows of both tables per layer.
    """

    num_keys: int = 32  # knum: physical keys per side per layer; the global table has num_keys**2 * L rows
    key_dim: int = 32  # D_k: width of each row / column query and key
    value_dim: int = 48  # D_v: width of a value row (the paper prefers D_p:D_v = 1:3)
    pre_value_dim: int = 16  # D_p: width of a pre-value row (PEER-style: a_k = <pre_values_proj(h), P[row_k]>)
    heads: int = 1  # H: key sets, each with its own query and top_m selection; all heads share the tables
    top_m: int = 16  # m (official knn): rows kept per side by the rank-1 filter, and final slots per head
    tucker_rank: int = 2  # r: rank of the Tucker cores
    num_cores: int = 2  # C: Tucker cores; core c weights chunk c of D_v / C columns of each value row
    query_per_rank: bool = True  # separate queries per Tucker rank, S^(j) = K^(j) q^(j) (paper; not the code's wiring)
    share_ratio: float = 0.0  # 0: private windows (= 1/L); else mem_share_ratio: n = floor(sqrt(Nall * share_ratio))
    balance_loss_weight: float = 0.0  # coefficient of the key-balance loss (Eq. 18-20); the paper's V2 uses 0
    tucker_penalty: float = 0.0  # coefficient of sum_{i>=2} relu(lambda_i - tau)^2 (Eq. 17); the paper's V2 uses 0
    tucker_margin: float = 0.15  # tau of that penalty
    value_lr_mult: float = 4.0  # LR multiplier of values and pre_values at step 0 (official 4x -> 1x)
    value_lr_decay: float = 1.0  # fraction of training over which that multiplier decays linearly to 1
    init: str = "paper"  # paper: table std matched to the FFN output variance (App. A); official: released code
    glu_act: bool = False  # GELU on the pre-value score a_k (official mem_use_glu_act; off by default)
    dropout: float = 0.0  # dropout on the memory output

    def table_rows(self, num_layers: int) -> int:
        """Nall: rows of the global values / pre_values tables for `num_layers` memory layers."""
        return self.num_keys**2 * num_layers

    def keys_per_side(self, num_layers: int) -> int:
        """n (official knum'): keys per side of every layer; its window holds n**2 rows of the global table."""
        if self.share_ratio == 0.0:
            return self.num_keys
        # floor(sqrt(x)) = isqrt(floor(x)); the factor keeps an exact square from rounding down to the next one
        return math.isqrt(math.floor(self.table_rows(num_layers) * self.share_ratio * (1 + 1e-12)))

    def validate(self, path: str = "model.memory_v2", num_layers: int | None = None) -> None:
        _check(self.num_keys >= 2, f"{path}.num_keys", self.num_keys, "an integer >= 2")
        for name in ("key_dim", "value_dim", "pre_value_dim", "heads", "tucker_rank"):
            _check(getattr(self, name) >= 1, f"{path}.{name}", getattr(self, name), "an integer >= 1")
        if num_layers is not None:
            n = self.keys_per_side(num_layers)
            _check(1 <= self.top_m <= n, f"{path}.top_m", self.top_m, f"1..keys_per_side ({n})")
        elif self.share_ratio == 0.0:
            _check(1 <= self.top_m <= self.num_keys, f"{path}.top_m", self.top_m, f"1..num_keys ({self.num_keys})")
        else:
            _check(self.top_m >= 1, f"{path}.top_m", self.top_m, "an integer >= 1 (and <= keys_per_side)")
        _check(self.num_cores >= 1 and self.value_dim % self.num_cores == 0, f"{path}.num_cores", self.num_cores,
               f"a divisor of value_dim ({self.value_dim})")
        _check(0.0 <= self.share_ratio <= 1.0, f"{path}.share_ratio", self.share_ratio,
               "0 (private windows) or a fraction in (0, 1]")
        _check(self.balance_loss_weight >= 0.0, f"{path}.balance_loss_weight", self.balance_loss_weight,
               "a number >= 0")
        _check(self.tucker_penalty >= 0.0, f"{path}.tucker_penalty", self.tucker_penalty, "a number >= 0")
        _check(self.tucker_penalty == 0.0 or self.tucker_rank >= 2, f"{path}.tucker_penalty", self.tucker_penalty,
               "0 when tucker_rank is 1 (the penalty acts on singular values 2..r)")
        _check(self.tucker_margin >= 0.0, f"{path}.tucker_margin", self.tucker_margin, "a number >= 0")
        _check(self.value_lr_mult >= 1.0, f"{path}.value_lr_mult", self.value_lr_mult, "a number >= 1")
        _check(0.0 < self.value_lr_decay <= 1.0, f"{path}.value_lr_decay", self.value_lr_decay, "a fraction in (0, 1]")
        _check(self.init in ("paper", "official"), f"{path}.init", self.init, "paper | official")
        _check(0.0 <= self.dropout < 1.0, f"{path}.dropout", self.dropout, "a fraction in [0, 1)")


VALUE_LR_SCHEDULES = ("constant", "scheduled")  # MemoryPlusConfig.value_lr_schedule: ByteDance's port, Meta's
VALUE_CLIPS = ("joint", "separate")  # MemoryPlusConfig.value_clip: ByteDance's port (and OLMo), Meta's


@dataclass
class MemoryPlusConfig:
    """Memory+ (Meta, "Memory Layers at Scale", arXiv 2412.09764): product-key memory layers with one shared table.

    Per memory layer (ultramem/memory/memory_plus.py; Dv = value_dim or d_model, N = num_keys**2):
      - query projection: Linear(d_model, heads * key_dim) with bias; each head's query is split into two halves
      - keys: [2 * heads * num_keys, key_dim // 2] (per head and half)
      - swilu W1: Linear(d_model, Dv) with bias (if swilu); output W2: Linear(Dv, d_model) with bias
      - value table V: [N, Dv], one for all memory layers when shared_values
    Every token reads heads * top_m value rows per layer (softmax over each head's top_m).
    """

    layers: str = "auto"  # comma-separated 0-indexed blocks holding a memory layer ("4,12,20"), or "auto": 3 centred
    #                      blocks, middle = n_layers // 2 +- max(1, n_layers // 3): Meta's at 24 layers (4,12,20) and
    #                      12 (2,6,10), extrapolated elsewhere (32 -> 6,16,26; Meta's 7B keeps 4,12,20): placement.py
    replace_ffn: bool = True  # True: the memory replaces those blocks' FFN (Meta); False: FFN kept, memory beside it
    #                           (ByteDance's port). Either way it reads the FFN's normalised input
    num_keys: int = 1024  # sqrt(N): sub-keys per half (per head); N = num_keys**2 value rows
    key_dim: int = 512  # full key/query width per head (even); each half has key_dim // 2 (Meta's k_dim)
    heads: int = 4  # query heads, each with its own keys and top_m; their rows form one bag per token
    top_m: int = 32  # values selected per head per token (Meta's knn); also the per-half top-k
    value_dim: int = 0  # Dv, width of a value row; 0 = d_model (Meta's v_dim = D)
    qk_norm: bool = False  # RMSNorm on query halves and keys (paper §3.1.4 "when needed"; the released code has none)
    swilu: bool = True  # True: out = W2(y * silu(W1 x)) (Eq. 2); False: out = W2(y)
    value_lr: float = 1e-3  # the value table's own LR (Meta's value_fixed_lr, 1e-3), applied as value_lr_schedule says
    value_lr_schedule: str = "constant"  # constant: value_lr at every step, no warmup, no decay (ByteDance's port);
    #                                      scheduled: value_lr is the table's peak LR, scaled by the run's warmup and
    #                                      decay like every other group (Meta's lingua: LambdaLR over all groups)
    value_clip: str = "joint"  # joint: one gradient norm over all parameters, clipped to train.grad_clip (ByteDance's
    #                            port, OLMo); separate: the value table's gradients are clipped to train.grad_clip
    #                            on their own and the rest on theirs (Meta's apps/main/train.py)
    shared_values: bool = True  # True: one value table for every memory layer; False: a private table per layer
    dropout: float = 0.0  # dropout on the memory output

    @property
    def num_values(self) -> int:
        return self.num_keys**2

    def validate(self, path: str = "model.memory_plus") -> None:
        spec = self.layers.strip()
        _check(spec == "auto" or all(p.strip().isdigit() for p in spec.split(",")), f"{path}.layers", self.layers,
               "'auto' or comma-separated 0-indexed block indices (e.g. '4,12,20')")
        _check(self.num_keys >= 2, f"{path}.num_keys", self.num_keys, "an integer >= 2")
        _check(self.key_dim >= 2 and self.key_dim % 2 == 0, f"{path}.key_dim", self.key_dim, "an even integer >= 2")
        _check(self.heads >= 1, f"{path}.heads", self.heads, "an integer >= 1 (Meta uses 4 and requires >= 2)")
        _check(1 <= self.top_m <= self.num_keys, f"{path}.top_m", self.top_m, f"1..num_keys ({self.num_keys})")
        _check(self.value_dim >= 0, f"{path}.value_dim", self.value_dim, "0 (= d_model) or an integer >= 1")
        _check(self.value_lr > 0.0, f"{path}.value_lr", self.value_lr, "a number > 0")
        _check(self.value_lr_schedule in VALUE_LR_SCHEDULES, f"{path}.value_lr_schedule", self.value_lr_schedule,
               " | ".join(VALUE_LR_SCHEDULES))
        _check(self.value_clip in VALUE_CLIPS, f"{path}.value_clip", self.value_clip, " | ".join(VALUE_CLIPS))
        _check(0.0 <= self.dropout < 1.0, f"{path}.dropout", self.dropout, "a fraction in [0, 1)")


@dataclass
class ModelConfig:
    """A decoder-only transformer (pre-norm, RoPE, causal SDPA) of one family."""

    family: str = "dense"  # a registered family: dense | moe | pkm | ultramem | memory_plus | ... (ultramem.families)
    vocab_size: int = 256
    seq_len: int = 256  # maximum context length (RoPE tables)
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    ffn_hidden: int = 0  # inner width of the dense MLP (2 matrices, GELU); 0 = 4 * d_model
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    init_std: float = 0.02  # std of linear/embedding init; residual projections are scaled by 1/sqrt(2 n_layers)
    moe: MoEConfig | None = None  # required exactly when the family's block is "moe" (family moe)
    memory: MemoryConfig | None = None  # required exactly when the family's block is "memory" (pkm, ultramem)
    memory_plus: MemoryPlusConfig | None = None  # required exactly when the family's block is "memory_plus"
    memory_v2: UltraMemV2Config | None = None  # required exactly when the family's block is "memory_v2" (ultramem_v2)

    @property
    def ffn_inner(self) -> int:
        return self.ffn_hidden or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> ModelConfig:
        family = get_family(self.family)  # ConfigError naming model.family and the registered families
        _check(self.d_model % self.n_heads == 0 and self.head_dim % 2 == 0, "model.n_heads", self.n_heads,
               f"a divisor of d_model ({self.d_model}) leaving an even head_dim for RoPE")
        _check(self.norm in ("rmsnorm", "layernorm"), "model.norm", self.norm, "rmsnorm | layernorm")
        for name in ("vocab_size", "seq_len", "n_layers", "d_model"):
            _check(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "an integer >= 1")
        for block in BLOCKS:
            owners = " or ".join(repr(f.name) for f in families() if f.block == block)
            _check((family.block == block) == (getattr(self, block) is not None), f"model.{block}",
                   getattr(self, block), f"a {block} block exactly when family is {owners}" if owners else
                   f"no {block} block (no registered family owns it)")
        if self.moe is not None:
            self.moe.validate()
        if self.memory is not None:
            self._validate_memory(self.memory)
        if self.memory_plus is not None:
            self.memory_plus.validate()
            memory_plus_blocks(self.memory_plus.layers, self.n_layers)
        if self.memory_v2 is not None:
            self.memory_v2.validate(num_layers=self.n_layers)
        if family.validate is not None:
            family.validate(self)
        return self

    def _validate_memory(self, mem: MemoryConfig) -> None:
        mem.validate()
        parse_layers(mem.layers, self.n_layers)
        if not mem.value_proj:
            _check(mem.value_expansion * mem.value_dim == self.d_model, "model.memory.value_dim", mem.value_dim,
                   f"d_model / value_expansion ({self.d_model} / {mem.value_expansion}) when value_proj is false")

    # ---- conversion -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field, with a block that is None left out unless it is one of ALWAYS_WRITTEN_BLOCKS (see there)."""
        out = dataclasses.asdict(self)
        for block in BLOCKS:
            if block not in ALWAYS_WRITTEN_BLOCKS and out[block] is None:
                del out[block]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "model") -> ModelConfig:
        return _from_dict(cls, data, path).validate()

    def override(self, overrides: dict[str, Any], path: str = "model") -> ModelConfig:
        """A new config with `overrides` (nested dict, or dotted keys like 'memory.top_m') applied field by field."""
        merged = deep_merge(self.to_dict(), expand_dotted(overrides))
        return ModelConfig.from_dict(merged, path)


# The blocks a family may own (Family.block).
BLOCKS: dict[str, type] = {"moe": MoEConfig, "memory": MemoryConfig, "memory_plus": MemoryPlusConfig,
                           "memory_v2": UltraMemV2Config}
# Run ids hash the resolved model config, ModelConfig.to_dict(). The blocks that existed when the committed sweeps
# ran are always written (None included); every block added since is left out while it is None, so that adding
# a block changes no existing config, run id or finished sweep (tests/test_run_ids.py freezes them). A new block
# needs nothing here: it is simply not in this tuple.
ALWAYS_WRITTEN_BLOCKS: tuple[str, ...] = ("moe", "memory")


def _from_dict(cls: type, data: dict[str, Any], path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__} ({data!r})")
    allowed = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in BLOCKS and cls is ModelConfig:
            kwargs[name] = None if value is None else _from_dict(BLOCKS[name], value, f"{path}.{name}")
            continue
        default = getattr(cls(), name) if name not in BLOCKS else None
        kwargs[name] = _coerce(value, default, f"{path}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, path: str) -> Any:
    """Check a scalar against the type of its default; ints are accepted where floats are expected."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def expand_dotted(d: dict[str, Any]) -> dict[str, Any]:
    """{'memory.top_m': 8} -> {'memory': {'top_m': 8}} (recursively; plain nested dicts pass through)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        value = expand_dotted(value) if isinstance(value, dict) else value
        head, *rest = key.split(".")
        if rest:
            value = expand_dotted({".".join(rest): value})
        if head in out and isinstance(out[head], dict) and isinstance(value, dict):
            out[head] = deep_merge(out[head], value)
        else:
            out[head] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge; `update` wins. A None base sub-dict is replaced by the update's dict."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


__all__ = [
    "BLOCKS",
    "ConfigError",
    "MoEConfig",
    "MemoryConfig",
    "MemoryPlusConfig",
    "ModelConfig",
    "UltraMemV2Config",
    "expand_dotted",
    "deep_merge",
]
