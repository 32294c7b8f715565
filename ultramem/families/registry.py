"""The registry of model families, and the `Family` record each family module registers.

A family is one value of `ModelConfig.family`. Its record says everything the rest of the code needs to know about it,
so that no module compares family names: which config block it owns, how its layers are built, what they count
(parameters, FLOPs, decode traffic, activation memory), how they are sharded and grouped for the optimizer, and how
the family is drawn. docs/families.md explains each field and the steps to add a family.

Pure Python, and below `ultramem.config` in the import order: config resolves `model.family` here by name, so this
module imports nothing of the config, not even for annotations (`ModelCfg` and `MemoryCfg` below stand for its types),
and a family module imports the config types it needs (imports run one way: errors < registry < config < families;
tests/test_layering.py forbids cycles inside ultramem/). Importing this module runs `ultramem/families/__init__.py`,
which registers the built-in families; they import the config for annotations only. A family's build functions
import their torch modules when first called, so that configs, presets, accounting and sweep planning never import
torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from ultramem.errors import ConfigError

if TYPE_CHECKING:  # annotations only: this module stays torch-free
    from torch import nn

ModelCfg: TypeAlias = Any  # an ultramem.config.ModelConfig (config imports this registry, so not imported here)
MemoryCfg: TypeAlias = Any  # an ultramem.config.MemoryConfig (model.memory)


@dataclass(frozen=True)
class PlotStyle:
    """How analysis/plots.py draws the family (plain strings; the registry never imports matplotlib)."""

    label: str  # legend text
    color: str  # "#rrggbb"
    marker: str  # matplotlib marker code ("o", "s", "D", "^", ...)


@dataclass(frozen=True)
class FFNParams:
    """Parameters of one block's feed-forward layer."""

    dense: int  # read by every token (MLP matrices, a router)
    sparse: int = 0  # parameters tokens select from (routed experts)
    active_sparse: int = 0  # what one token reads of them (its top-k experts)


@dataclass(frozen=True)
class MemoryParams:
    """One memory layer: dense (read by every token), values (sparse table), active_values (read per token)."""

    dense: int
    values: int
    active_values: int


@dataclass(frozen=True)
class ValueLR:
    """The optimizer rule of a family's value tables (the optimizer's "values" group, ultramem/optim.py): their
    learning rate, and whether their gradients are clipped apart from the rest (the trainer's clip_gradients)."""

    mult: float = 1.0  # multiplier on the scheduled LR at progress 0 ...
    decay: float = 1.0  # ... decaying linearly to 1x at this fraction of training
    fixed: float | None = None  # an LR of their own instead: no multiplier (Memory+'s value_lr) ...
    fixed_scheduled: bool = False  # ... constant (False: ByteDance's port) or scaled by the run's schedule (Meta's)
    separate_clip: bool = False  # their gradients are clipped to train.grad_clip on their own (Meta's Memory+)
    weight_decay: float | None = None  # their weight decay; None: the run's (the official code decays values)


@dataclass(frozen=True)
class MemoryTables:
    """The value tables memory parallelism splits, and what one token's reads send (ultramem.layout, pure data).

    Families without a `ParallelHooks.memory_tables` hook get this from `model.memory` (PKM, UltraMem)."""

    block: str  # the config block whose fields messages name ("model.memory_v2")
    rows: int  # N: rows of each table
    value_dim: int  # D_v: columns of the value table
    slots: int  # K: rows one token reads per memory layer (heads x top_m)
    layers: int  # memory layers reading the tables (each pools once per forward)
    num_cores: int = 1  # C: cores weighting equal chunks of a value row (MCS / Tucker cores)
    groups: int = 1  # E: IVE groups a token's pooled vector is split into
    pre_value_dim: int = 0  # D_p: a pre-value table split like the values (UltraMemV2's PEER scores); 0: none
    modes: tuple[str, ...] = ("dim", "row")  # the parallel.memory_parallel modes its layers implement
    value_field: str = "value_dim"  # the field of `block` holding D_v, as messages name it


@dataclass(frozen=True)
class ParallelHooks:
    """What sharding (ultramem.parallel, experiments.distributed) and the optimizer groups (ultramem.optim) need.

    The type getters import torch modules when called; they are only called where torch is already in use.
    """

    # FFN module type whose routed experts expert parallelism splits (`w_in`/`w_out` [E, ...], `run_experts`,
    # `balance_counts`, `take_load`); None: no routed experts (parallel.expert_parallel must be 1, and
    # Transformer.expert_load() returns None).
    expert_module: Callable[[], type] | None = None
    num_experts: Callable[[ModelCfg], int] | None = None  # routed experts per block (expert_parallel divides it)
    # Memory layer (or table) type whose `values` table forms the optimizer's "values" group (value-table LR rule).
    value_module: Callable[[], type] | None = None
    value_params: tuple[str, ...] = ("values",)  # that type's parameters in the "values" group
    memory_parallel: bool = False  # parallel.memory_parallel may split those tables (modes: memory_tables' modes)
    # (cfg) -> the tables' shapes and reads (ultramem.layout's checks and byte counts); None: from model.memory
    memory_tables: Callable[[ModelCfg], MemoryTables] | None = None
    unused_parameters: bool = False  # a step may leave parameters without a gradient (DDP find_unused_parameters)
    # Why the family's dense part trains with plain data parallelism only: ultramem.layout refuses parallel.fsdp
    # and parallel.expert_parallel, and parallel.memory_parallel unless `memory_parallel` is set, naming this
    # reason; None: no such restriction.
    data_parallel_only: str | None = None


@dataclass(frozen=True)
class Family:
    """One model family. Fields are read by the module named in the comment; defaults mean "not this feature"."""

    name: str  # the value of ModelConfig.family
    title: str  # the name in messages and docs ("UltraMem")
    block: str | None  # the ModelConfig block it owns and requires ("moe", "memory"); None: no block (ultramem.config)
    style: PlotStyle  # analysis/plots.py
    # ---- every block's FFN: built by ultramem.model, counted by ultramem.accounting and ultramem.layout ----------
    # (cfg, block index) -> that block's FFN, d -> d; (cfg, block index, shared module) for a family with build_shared
    build_ffn: Callable[..., nn.Module]
    ffn_params: Callable[[ModelCfg], FFNParams]  # one block's FFN (its MLP, when blocks differ: see model_params)
    ffn_activations: Callable[[ModelCfg], int]  # elements per token one FFN keeps for the backward (2-byte)
    ffn_aux: bool = False  # the FFN's forward returns (y, aux dict) rather than y
    # How ultramem.model combines the layers' weighted "aux_loss": False, their mean (MegaBlocks/OLMoE, so MoE's
    # weights mean the same at any depth); True, their sum (UltraMemV2: ByteDance adds coefficient x loss in every
    # layer, so a coefficient means the official one)
    aux_sum: bool = False
    # (cfg, batch size) -> (parameters all FFNs read in one decode step, expected distinct experts per layer)
    decode_experts: Callable[[ModelCfg, int], tuple[float, float]] | None = None
    # ---- memory layers, placed by model.memory.layers (families/product_keys.py) ---------------------------------
    build_memory: Callable[[ModelCfg, int], nn.Module] | None = None  # (cfg, memory index) -> memory layer j
    memory_params: Callable[[MemoryCfg, int], MemoryParams] | None = None  # (memory block, d_model), one layer
    retrieval_flops: Callable[[MemoryCfg], int] | None = None  # parameter-free FLOPs per token, one memory layer
    # ---- memory layers inside the blocks, tables shared across blocks (memory_plus, ultramem_v2) -----------------
    # (cfg) -> a module every block's FFN may read (a value table shared by all memory layers), or None. The
    # Transformer builds it once as `self.shared` and calls build_ffn(cfg, i, shared) (ultramem.model).
    build_shared: Callable[[ModelCfg], nn.Module | None] | None = None
    # (cfg) -> FFNParams of ALL FFN-side layers and shared tables together (dense, sparse, what one token reads):
    # accounting.count_params uses it instead of n_layers x ffn_params (+ memory layers) when set.
    model_params: Callable[[ModelCfg], FFNParams] | None = None
    # (cfg) -> parameter-free FLOPs per token of every such memory layer (accounting.retrieval_flops)
    model_retrieval_flops: Callable[[ModelCfg], int] | None = None
    # (cfg, batch size) -> (parameters one decode step of B sequences reads from the value tables, expected distinct
    # value rows per memory layer) (accounting.decode_bytes)
    decode_values: Callable[[ModelCfg, int], tuple[float, float]] | None = None
    # ---- the rest --------------------------------------------------------------------------------------------------
    validate: Callable[[ModelCfg], None] | None = None  # checks beyond the block's own (raise ConfigError)
    summary: Callable[[ModelCfg, dict[str, int]], dict[str, Any]] | None = None  # final.json[summary_block]
    summary_block: str | None = None  # the final.json key of `summary` ("memory", "moe"); None: `block`
    # (cfg) -> the LR rule of the value tables (ultramem.optim); None: model.memory's value_lr_mult / value_lr_decay
    value_lr: Callable[[ModelCfg], ValueLR] | None = None
    parallel: ParallelHooks = field(default_factory=ParallelHooks)

    @property
    def sparse(self) -> bool:
        """Owns parameters tokens select from (routed experts, memory value tables): compared against dense."""
        return (self.parallel.expert_module is not None or self.build_memory is not None
                or self.parallel.value_module is not None)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add `family` (after the ones registered before it) and return it. Its name must be new."""
    if family.name in _REGISTRY:
        raise ValueError(f"family {family.name!r} is already registered")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", family.name):
        raise ValueError(f"family name {family.name!r}: use lowercase letters, digits and '_' (preset names are "
                         "'<family>-<size>...', so no '-')")
    memory = (family.build_memory, family.memory_params, family.retrieval_flops)
    if any(f is None for f in memory) != all(f is None for f in memory):
        raise ValueError(f"family {family.name!r}: build_memory, memory_params and retrieval_flops go together")
    if family.build_memory is not None and family.block != "memory":
        raise ValueError(f"family {family.name!r}: memory layers read the 'memory' block; set block='memory'")
    experts = (family.parallel.expert_module, family.parallel.num_experts, family.decode_experts)
    if any(f is None for f in experts) != all(f is None for f in experts):
        raise ValueError(f"family {family.name!r}: parallel.expert_module, parallel.num_experts and decode_experts "
                         "go together")
    if family.parallel.memory_parallel and family.parallel.value_module is None:
        raise ValueError(f"family {family.name!r}: parallel.memory_parallel needs parallel.value_module")
    if family.parallel.data_parallel_only and family.parallel.expert_module:
        raise ValueError(f"family {family.name!r}: parallel.data_parallel_only excludes expert parallelism")
    if family.parallel.memory_tables is not None and not family.parallel.memory_parallel:
        raise ValueError(f"family {family.name!r}: parallel.memory_tables describes what memory parallelism splits; "
                         "set parallel.memory_parallel")
    if family.build_memory is not None and family.model_params is not None:
        raise ValueError(f"family {family.name!r}: model_params counts every FFN-side layer; it replaces "
                         "build_memory's per-layer count, so use one or the other")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> Family:
    """Remove a family (tests register temporary ones); returns it."""
    return _REGISTRY.pop(name)


def get_family(name: str) -> Family:
    """The family registered as `name`; ConfigError naming model.family and the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"model.family: invalid value {name!r}; allowed: {' | '.join(_REGISTRY)}") from None


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order (dense, moe, pkm, ultramem, then any added later)."""
    return tuple(_REGISTRY.values())


def family_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


# ---- lookups across families -----------------------------------------------------------------------------------


def expert_module_types() -> tuple[type, ...]:
    """The FFN types expert parallelism splits (imports their torch modules)."""
    return tuple(f.parallel.expert_module() for f in families() if f.parallel.expert_module is not None)


def value_tables() -> tuple[tuple[type, tuple[str, ...]], ...]:
    """(value module type, names of its parameters in the optimizer's "values" group) per family that has one."""
    return tuple((f.parallel.value_module(), f.parallel.value_params) for f in families()
                 if f.parallel.value_module is not None)


def value_module_types(memory_parallel: bool = False) -> tuple[type, ...]:
    """The memory layer types with a `values` table (only those memory parallelism may split, if asked)."""
    return tuple(f.parallel.value_module() for f in families()
                 if f.parallel.value_module is not None and (f.parallel.memory_parallel or not memory_parallel))


def block_summary(cfg: ModelCfg, params: dict[str, int], block: str) -> dict[str, Any] | None:
    """What final.json records under `block` ("memory", "moe"): the family's summary if it files it there (its
    `summary_block`, by default the block it owns)."""
    fam = get_family(cfg.family)
    return fam.summary(cfg, params) if (fam.summary_block or fam.block) == block and fam.summary else None


# ---- arithmetic shared by the accounting hooks -------------------------------------------------------------------


def expected_distinct(n_items: int, n_draws: float, per_draw: int = 1) -> float:
    """E[#distinct items] when each of n_draws draws picks per_draw distinct items uniformly (coupon collector)."""
    return n_items * (1.0 - (1.0 - per_draw / n_items) ** n_draws)
