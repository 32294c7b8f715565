"""Model families: one registry (`registry.py`) and one module per family, each registering itself on import.

    from ultramem.families import families, get_family, register
    [f.name for f in families()]            # ['dense', 'moe', 'pkm', 'ultramem', 'memory_plus', ...] (in order)
    get_family("moe").block                 # 'moe': the ModelConfig block the family owns
    get_family("ultramem").style.color      # how analysis/plots.py draws it

Adding a family = one module here (imported below) + its presets in ultramem/presets.py + a test; the steps and
what each `Family` field means: docs/families.md. Pure Python (no torch).
"""

from ultramem.families import dense, moe, pkm, ultramem  # noqa: F401  (registers the built-in families, in order)

# isort: split
# Families added later register after the built-in four, so the committed figures keep their order (imported in
# the order written: a family that must come earlier than a name sorts goes after another `# isort: split`).
from ultramem.families import memory_plus, ultramem_v2  # noqa: F401

# isort: split
from ultramem.families.registry import (
    Family,
    FFNParams,
    MemoryParams,
    ParallelHooks,
    PlotStyle,
    ValueLR,
    block_summary,
    expected_distinct,
    expert_module_types,
    families,
    family_names,
    get_family,
    register,
    unregister,
    value_module_types,
    value_tables,
)

__all__ = [
    "FFNParams",
    "Family",
    "MemoryParams",
    "ParallelHooks",
    "PlotStyle",
    "ValueLR",
    "block_summary",
    "expected_distinct",
    "expert_module_types",
    "families",
    "family_names",
    "get_family",
    "register",
    "unregister",
    "value_module_types",
    "value_tables",
]
