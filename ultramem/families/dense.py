"""The dense family: every block's FFN is the 2-matrix GELU MLP (d -> ffn_inner -> d). No config block.

Its FFN functions are the ones the memory families (pkm, ultramem) use too: they add memory layers to this model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ultramem.families.registry import Family, FFNParams, PlotStyle, register

if TYPE_CHECKING:  # annotations only: importing ultramem.config registers the families (this module) first
    from torch import nn

    from ultramem.config import ModelConfig


def build_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    from ultramem.mlp import MLP  # lazy: torch stays out of config and planning

    return MLP(cfg.d_model, cfg.ffn_inner, cfg.init_std, cfg.n_layers, cfg.dropout)


def mlp_params(cfg: ModelConfig) -> FFNParams:
    return FFNParams(dense=2 * cfg.d_model * cfg.ffn_inner)


def mlp_activations(cfg: ModelConfig) -> int:
    """Korthikanti et al. 2022, Table 2: 3 d + 4 f elements per token (34 d for f = 4 d with attention's 15 d)."""
    return 3 * cfg.d_model + 4 * cfg.ffn_inner


FAMILY = register(Family(
    name="dense",
    title="Dense",
    block=None,
    style=PlotStyle(label="dense", color="#3b6ea8", marker="o"),
    build_ffn=build_mlp,
    ffn_params=mlp_params,
    ffn_activations=mlp_activations,
))
