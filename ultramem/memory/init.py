"""Initialisation of memory layers (UltraMem §2.5), one function per choice of `memory.init`.

  paper    (v1 paper, "improved init"): values V ~ N(0, E / (2 m H L)), with L the number of transformer layers
           (lucidrains' `layers_for_mem_init`). The selected scores are calibrated to have RMS 1 by Monte Carlo:
           with unit-RMS queries and key-norm weight 1/sqrt(D_k), each per-rank score is ~ N(0, 1); the scores of
           the selected slots are measured on random inputs and the query scale is set to 1/sqrt(RMS), which is
           exact because every score is bilinear in (row query, column query). Each token then pools H*m slots
           spread over E groups, so each pooled coordinate has variance (H m / E) * E[s^2] * E/(2 m H L) = 1/(2L),
           the "MLP-style" variance the paper aims for. The value projection is a residual-branch output projection
           and is depth-scaled like the FFN's: N(0, init_std^2 / (2L)) (paper §2.5 / PR3: "output projection
           depth-scaled like the FFN ff_out"). Measured, not assumed: with the official N(0, 1/(E D_v)) projection
           the memory output at init has std ~0.4 against ~0.02 for the FFN output, swamps the residual stream,
           and ultramem-t2-x6 ends 150 steps at val loss 2.56 vs dense-t2's 2.34; depth-scaled, it ends at 1.89.
           The paper (per secondary sources) states the calibration as "mean selected score ~ 1"; calibrating the
           RMS instead is what makes the output variance come out at 1/(2L). Softmax scores sum to 1 per head and
           are not calibrated.
  official (released v1 code `reset_parameters`): V ~ N(0, 0.02), q/k-norm weights 1/D_k^0.33.
  xlm      (PKM, Lample et al. / facebookresearch XLM): V ~ N(0, 1/D_v), keys U(-1/sqrt(D_k), 1/sqrt(D_k)),
           query projection N(0, 1/d), norm weights 1.

In all modes the Tucker cores are U(0, 1). The value projection (`value_proj_std`) is N(0, init_std^2 / (2L)) for
`paper`, N(0, 1/(E D_v)) for `official` (released code) and N(0, 1/D_v) for `xlm`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: ultramem.config imports the family registry, which builds these layers
    from ultramem.config import MemoryConfig

CALIBRATION_SAMPLES = 2048
CALIBRATION_SEED = 0


def value_std(cfg: MemoryConfig, n_layers: int) -> float:
    if cfg.init == "paper":
        return math.sqrt(cfg.value_expansion / (2 * cfg.top_m * cfg.heads * n_layers))
    if cfg.init == "official":
        return 0.02
    return cfg.value_dim**-0.5


def value_proj_std(cfg: MemoryConfig, n_layers: int, init_std: float) -> float:
    """Std of the value projection Linear(E*D_v, d) for `cfg.init` (see the module docstring)."""
    if cfg.init == "paper":
        return init_std / math.sqrt(2 * n_layers)
    if cfg.init == "official":
        return (cfg.value_expansion * cfg.value_dim) ** -0.5
    return cfg.value_dim**-0.5


def init_query_and_keys(query: nn.Module, keys: nn.Parameter, key_norm: nn.RMSNorm | None, cfg: MemoryConfig,
                        d_model: int) -> None:
    """Query projection, keys and the q/k-norm weights for `cfg.init` (calibration, if any, comes after)."""
    Dk = cfg.key_dim
    if cfg.init == "xlm":
        nn.init.normal_(query.proj.weight, std=d_model**-0.5)
        nn.init.uniform_(keys, -(Dk**-0.5), Dk**-0.5)
    else:
        nn.init.normal_(query.proj.weight, std=Dk**-0.5)
        nn.init.normal_(keys, std=Dk**-0.5)
    q_weight = {"paper": 1.0, "official": Dk**-0.33, "xlm": 1.0}[cfg.init]
    k_weight = {"paper": Dk**-0.5, "official": Dk**-0.33, "xlm": 1.0}[cfg.init]
    if query.norm is not None:
        nn.init.constant_(query.norm.weight, q_weight)
    if key_norm is not None:
        nn.init.constant_(key_norm.weight, k_weight)


@torch.no_grad()
def calibrate_scores(layer: nn.Module, query: nn.Module, d_model: int) -> float | None:
    """Scale the queries so the selected scores have RMS 1 on unit-variance inputs (paper init only).

    `layer.selected_scores(x)` returns the post-activation weights the layer pools values with. Returns the
    measured RMS before scaling (None when nothing was calibrated). Uses its own generator, so it does not
    advance the global RNG.
    """
    cfg: MemoryConfig = layer.cfg
    if cfg.init != "paper" or cfg.score == "softmax" or layer.values.is_meta:
        return None
    gen = torch.Generator().manual_seed(CALIBRATION_SEED)
    x = torch.randn(1, CALIBRATION_SAMPLES, d_model, generator=gen, device="cpu").to(layer.values.device)
    rms = layer.selected_scores(x).float().pow(2).mean().sqrt().item()
    query.scale_(rms**-0.5)
    return rms
