"""Model families: one registry (`registry.py`) and one module per family, each registering itself on import.

    from ultramem.families import families, get_family, register
    [f.name for f in families()]            # ['dense', 'moe', 'pkm', 'ultramem'] (registration order)
    get_family("moe").block                 # 'moe': the ModelConfig block the family owns
    get_family("ultramem").style.color      # how analysis/plots.py draws it

Adding a family = one module here (imported below) + its presets in ultramem/presets.py + a test; the steps and
what each `Family` field means: docs/families.md. Pure Python (no torch).
"""

from ultramem.families import dense, moe, pkm, ultramem  # noqa: F401  (registers the built-in families, in order)
from ultramem.families.registry import (
    Family,
    FFNParams,
    MemoryParams,
    ParallelHooks,
    PlotStyle,
    block_summary,
    expected_distinct,
    expert_module_types,
    families,
    family_names,
    get_family,
    register,
    unregister,
    value_module_types,
)

__all__ = [
    "FFNParams",
    "Family",
    "MemoryParams",
    "ParallelHooks",
    "PlotStyle",
    "block_summary",
    "expected_distinct",
    "expert_module_types",
    "families",
    "family_names",
    "get_family",
    "register",
    "unregister",
    "value_module_types",
]
