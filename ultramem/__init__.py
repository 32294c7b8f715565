"""UltraMem model library: dense, MoE, PKM and UltraMem transformers, presets and parameter/FLOP accounting.

Pure PyTorch. Importing `ultramem`, `ultramem.config`, `ultramem.families`, `ultramem.presets`,
`ultramem.accounting` or `ultramem.layout` does not import torch (so planning a sweep stays fast); the model classes
are imported lazily on first use. Model families (dense, moe, pkm, ultramem) are registered in `ultramem.families`.
"""

from ultramem.config import ConfigError, MemoryConfig, ModelConfig, MoEConfig

__all__ = ["ConfigError", "MemoryConfig", "ModelConfig", "MoEConfig", "build_model"]


def build_model(cfg: ModelConfig, device=None):  # noqa: ANN001, ANN201
    """Build the torch module for `cfg` (device='meta' allocates nothing)."""
    from ultramem.model import build_model as _build  # lazy: `import ultramem` must not import torch

    return _build(cfg, device=device)
