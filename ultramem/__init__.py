"""UltraMem model library: dense, MoE, PKM and UltraMem transformers, presets and parameter/FLOP accounting.

Pure PyTorch. Importing `ultramem`, `ultramem.config`, `ultramem.presets` or `ultramem.accounting` does not import
torch (so planning a sweep stays fast); the model classes are imported lazily on first use.
"""

from ultramem.config import ConfigError, MemoryConfig, ModelConfig, MoEConfig

__all__ = ["ConfigError", "MemoryConfig", "ModelConfig", "MoEConfig", "build_model"]


def build_model(cfg: ModelConfig, device=None):  # noqa: ANN001, ANN201
    """Build the torch module for `cfg` (device='meta' allocates nothing)."""
    from ultramem.model import build_model as _build

    return _build(cfg, device=device)
