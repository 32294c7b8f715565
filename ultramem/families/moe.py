"""The MoE family: every block's FFN is a dropless token-choice top-k mixture of experts (ultramem/moe.py), the
paper's MoE-<size>-2in<N> baseline. Owns the `moe` block (MoEConfig)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ultramem.families.registry import (
    Family,
    FFNParams,
    ParallelHooks,
    PlotStyle,
    expected_distinct,
    register,
)

if TYPE_CHECKING:  # annotations only: importing ultramem.config registers the families (this module) first
    from torch import nn

    from ultramem.config import ModelConfig


def _moe_ffn() -> type:
    from ultramem.moe import MoEFFN  # lazy: torch stays out of config and planning

    return MoEFFN


def expert_hidden(cfg: ModelConfig) -> int:
    """Inner width of each expert MLP (2 matrices, d -> h -> d)."""
    return cfg.moe.expert_hidden or cfg.ffn_inner


def build_ffn(cfg: ModelConfig, layer: int) -> nn.Module:
    return _moe_ffn()(cfg.d_model, cfg.ffn_inner, cfg.moe, cfg.init_std, cfg.n_layers, cfg.dropout)


def ffn_params(cfg: ModelConfig) -> FFNParams:
    """Router d x E (dense); E experts of 2 d h (sparse), of which each token reads top_k."""
    d, E, h = cfg.d_model, cfg.moe.num_experts, expert_hidden(cfg)
    return FFNParams(dense=d * E, sparse=E * 2 * d * h, active_sparse=cfg.moe.top_k * 2 * d * h)


def ffn_activations(cfg: ModelConfig) -> int:
    """3 d + k (4 d + 4 h) + 12 E elements per token: the MLP's terms for each of the top_k experts, plus routing."""
    d, k, h, E = cfg.d_model, cfg.moe.top_k, expert_hidden(cfg), cfg.moe.num_experts
    return 3 * d + k * (4 * d + 4 * h) + 12 * E


def decode_experts(cfg: ModelConfig, batch_size: int) -> tuple[float, float]:
    """Each token picks top_k of E experts, so a layer reads E (1 - (1 - k/E)^B) distinct experts (at most
    min(B k, E)) of 2 d h parameters each."""
    E, k = cfg.moe.num_experts, cfg.moe.top_k
    experts = expected_distinct(E, batch_size, k)
    return cfg.n_layers * experts * 2 * cfg.d_model * expert_hidden(cfg), experts


def num_experts(cfg: ModelConfig) -> int:
    return cfg.moe.num_experts


def summary(cfg: ModelConfig, params: dict[str, int]) -> dict[str, Any]:
    return {"num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k}


FAMILY = register(Family(
    name="moe",
    title="MoE",
    block="moe",
    style=PlotStyle(label="moe", color="#d9822b", marker="s"),
    build_ffn=build_ffn,
    ffn_aux=True,
    ffn_params=ffn_params,
    ffn_activations=ffn_activations,
    decode_experts=decode_experts,
    summary=summary,
    # an expert may receive no token in a micro-batch, so DDP must look for parameters without a gradient
    parallel=ParallelHooks(expert_module=_moe_ffn, num_experts=num_experts, unused_parameters=True),
))
