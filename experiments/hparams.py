"""Batch size, peak learning rate, step count and warmup derived from model size: the one place they come from.

OLMo-ladder style (allenai/OLMo `scripts/ladder.py`): a run states only its model and token budget, and the
optimisation hyperparameters follow from the model's size N by stated formulas. N is always the **active**
parameter count from `ultramem.accounting` (embeddings included), so a MoE or UltraMem model gets the
hyperparameters of the dense model with the same compute per token, as in the paper (Table 4 lists one LR per
activated size for every family).

Batch size (OLMo ladder, after DeepSeek LLM's batch-size law):
    B_tokens(N) = 160 * 2048 * (N / 108e6) ** (2/3)        tokens per optimizer step
    batch_size  = round(B_tokens / seq_len)                sequences, rounded to a multiple of the world size
and then capped so the budget is split into at least MIN_STEPS optimizer steps: a scaling-law point trained for
ten steps would measure the warmup, not the model.

Peak learning rate: a power law fitted (least squares in log-log) to the UltraMem paper's Table 4
(151M: 6e-4, 680M: 2.5e-4, 1.6B: 2e-4, 6.5B: 1.2e-4):
    lr(N) = LR_COEF * N ** LR_EXPONENT = 1.507 * N ** -0.4207  (5.5e-4 at 151M, 2.9e-4 at 680M)
capped at LR_MAX = 3e-3, since tiny CPU models sit up to three decades below the fitted range (the fit crosses
3e-3 at 2.6M params). The cap is measured: byte-level tinyshakespeare, 200 steps of 16 x 64 tokens, warmup +
cosine, dense-t1 (115k params) and dense-tiny (357k) both reached their lowest loss at 3e-3 among 1e-3, 3e-3,
6e-3, 1e-2 and 3e-2 (2.35 vs 2.61 at 1e-3 and 2.64 at 1e-2 for dense-t1). The OLMo ladder's own rule
(0.0047 * (N/108e6)**(-1/3)) is 7x the paper's LR at 151M, so the paper's numbers win for this suite.

The IsoFLOP rule (`isoflop_hparams`; a sweep with `method: isoflop` and `isoflop.hparams: isoflop` opts in, and
every value lands in each run's config.yaml) keeps the batch and LR above and adds what Porian et al. 2024
("Resolving discrepancies in compute-optimal scaling", §3.3-3.5) found to matter at small scale:
  - one batch size for all the budgets a size serves (a WSD trunk and its cooldown branches share it), capped so
    the *shortest* of them still gets MIN_STEPS steps;
  - warmup that scales with N and stays much shorter than D: WARMUP_TOKENS_PER_PARAM x N tokens (Porian: warmup
    tokens = N, which keeps the compute-optimal D at >= 5x the warmup), at most WARMUP_MAX_SHARE of the shortest
    run's steps, at least one step;
  - AdamW beta2 = BETA2_SMALL_BATCH (0.99) below BETA2_BATCH_TOKENS tokens per step (Porian: beta2 = 0.95 is
    suboptimal at 128 sequences of 2048 tokens and below; 0.99 and 0.999 were better), else the paper's 0.95.
None of these constants is tuned on this suite's tiny models; they are the published rule, stated once here.
The one measured addition is `isoflop.batch: steps` (steps_batch_size, BATCH_TARGET_STEPS): a batch from the run's
length instead of the model's size, for tiny models whose short runs the ladder batch starves of steps.

The fitted rule (`isoflop.hparams: fitted` + `isoflop.hparams_file`; load_fitted_rule, fitted_lr) keeps the IsoFLOP
rule's batch, warmup and beta2 and takes the peak LR from a per-family law lr*(N) = coef x N^exponent that an LR
scan measured (`method: lr_scan`, `ultramem hparams`, analysis/hparams.py; docs/sweeps.md "LR scans"). It refuses
a family the file has no law for and a size outside the range the law was fitted on, unless the sweep allows a
stated extrapolation (`isoflop.hparams_extrapolate`: the largest factor in N beyond the range; the plan lists each
extrapolated size).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ultramem.config import ConfigError

# Batch size: OLMo ladder constants (160 sequences of 2048 tokens at 108M parameters, growing as N^(2/3)).
BATCH_TOKENS_REF = 160 * 2048
BATCH_PARAMS_REF = 108e6
BATCH_EXPONENT = 2 / 3
MIN_STEPS = 100

# Warmup floor for short runs (see warmup_steps).
MIN_WARMUP_STEPS = 20
SHORT_RUN_WARMUP_FRACTION = 0.05

# Learning rate: the UltraMem paper's Table 4 and the power law fitted to it.
PAPER_TABLE4_LR = ((151e6, 6e-4), (680e6, 2.5e-4), (1.6e9, 2e-4), (6.5e9, 1.2e-4))
LR_COEF = 1.5073
LR_EXPONENT = -0.42068
LR_MAX = 3e-3


def batch_tokens(active_params: int) -> float:
    """OLMo-ladder tokens per optimizer step for a model with `active_params` parameters."""
    return BATCH_TOKENS_REF * (active_params / BATCH_PARAMS_REF) ** BATCH_EXPONENT


def batch_size(active_params: int, seq_len: int, token_budget: int | None = None, multiple: int = 1) -> int:
    """Sequences per optimizer step: the ladder rule, capped for >= MIN_STEPS steps, a multiple of `multiple`."""
    seqs = batch_tokens(active_params) / seq_len
    if token_budget is not None:
        seqs = min(seqs, token_budget / (MIN_STEPS * seq_len))
    return max(multiple, multiple * round(seqs / multiple))


def learning_rate(active_params: int) -> float:
    """Peak AdamW LR: the power law fitted to paper Table 4, capped at LR_MAX."""
    return min(LR_MAX, LR_COEF * active_params**LR_EXPONENT)


def num_steps(token_budget: int, batch_size: int, seq_len: int) -> int:
    """Optimizer steps that cover `token_budget` (rounded to the nearest step, at least one)."""
    return max(1, round(token_budget / (batch_size * seq_len)))


def warmup_steps(warmup: float, steps: int) -> int:
    """`warmup` < 1 is a fraction of the steps (paper: 0.01), >= 1 a number of steps; never more than `steps`.

    A fraction gets a floor for short runs: at least min(MIN_WARMUP_STEPS, 5% of the steps). The paper's 1% of a
    238k-step run is 2,384 steps; 1% of a 391-step CPU run is 4, which measurably hurts deeper models: dense-t5
    (6 layers) on tinyshakespeare, 130 steps of 8 x 256 bytes at lr 3e-3, ends at val loss 2.65 with 4 warmup
    steps and 2.17 with 20 (2.23 with 20 at lr 1e-3). Give a number of steps (>= 1) to bypass the floor.
    """
    if warmup >= 1:
        return min(int(warmup), steps)
    n = math.ceil(warmup * steps)
    if warmup > 0:
        n = max(n, min(MIN_WARMUP_STEPS, math.ceil(SHORT_RUN_WARMUP_FRACTION * steps)))
    return min(n, steps)


# ---- the IsoFLOP rule (Porian et al. 2024), opted into by `isoflop.hparams: isoflop` in a sweep ----------------

WARMUP_TOKENS_PER_PARAM = 1.0  # Porian et al.: warmup tokens = N
WARMUP_MAX_SHARE = 0.1  # never more than this share of the shortest run's steps
BETA2_SMALL_BATCH = 0.99
BETA2_LARGE_BATCH = 0.95  # the paper's Table 4 (TrainConfig's default)
BETA2_BATCH_TOKENS = 128 * 2048  # Porian et al.: beta2 0.95 hurts at <= 128 sequences of 2048 tokens


# Batch from the run's length (`isoflop.batch: steps`): about BATCH_TARGET_STEPS optimizer steps per run, at least one
# sequence per step. Measured on this suite (docs/training.md "Batch from the run's length"): byte-level
# tinyshakespeare, dense s1-s10 at 0.12M-3.9M tokens, the ladder's batch (OLMo's N^(2/3), 3-22 sequences of 256,
# capped for 100 steps) loses 0.1-0.4 nats against one sequence per step in the runs under ~1M tokens, while runs
# of 3-4M tokens are best at 4 sequences: ~4k steps in every case.
BATCH_TARGET_STEPS = 4096


def isoflop_warmup_steps(active_params: int, tokens_per_step: int, shortest_steps: int) -> int:
    """WARMUP_TOKENS_PER_PARAM x N tokens in steps, capped at WARMUP_MAX_SHARE of the shortest run, at least 1."""
    steps = math.ceil(WARMUP_TOKENS_PER_PARAM * active_params / tokens_per_step)
    return max(1, min(steps, math.floor(WARMUP_MAX_SHARE * shortest_steps)))


def beta2(tokens_per_step: int) -> float:
    """AdamW beta2 for a batch of `tokens_per_step` tokens: raised at small batch (Porian et al. 2024)."""
    return BETA2_SMALL_BATCH if tokens_per_step < BETA2_BATCH_TOKENS else BETA2_LARGE_BATCH


def steps_batch_size(tokens: float, seq_len: int, steps: int = BATCH_TARGET_STEPS, multiple: int = 1) -> int:
    """Sequences per step that split a run of `tokens` into about `steps` optimizer steps: tokens / (steps x
    seq_len) rounded to a power of two (at least one sequence), then up to a multiple of `multiple`."""
    seqs = tokens / (steps * seq_len)
    seqs = 2 ** max(0, round(math.log2(seqs))) if seqs > 0 else 1
    return multiple * math.ceil(seqs / multiple)


def isoflop_hparams(active_params: int, seq_len: int, shortest_tokens: int, multiple: int = 1,
                    batch: int | None = None) -> dict[str, float]:
    """The train fields the IsoFLOP rule sets for a model of `active_params` whose shortest run (the smallest
    budget it serves: a cooldown branch, or the run itself) is `shortest_tokens` long: batch_size (sequences),
    lr, warmup (steps) and beta2. One set of values serves a WSD trunk and all its branches. `batch` (sequences)
    replaces the ladder batch (`isoflop.batch: steps` passes steps_batch_size's)."""
    if batch is None:
        batch = batch_size(active_params, seq_len, shortest_tokens, multiple)
    else:  # still >= MIN_STEPS steps in the shortest run
        batch = min(batch, batch_size(1e30, seq_len, shortest_tokens, multiple))
    shortest = num_steps(shortest_tokens, batch, seq_len)
    return {"batch_size": batch, "lr": learning_rate(active_params),
            "warmup": isoflop_warmup_steps(active_params, batch * seq_len, shortest),
            "beta2": beta2(batch * seq_len)}


# ---- the fitted rule (`isoflop.hparams: fitted`): per-family lr*(N) laws measured by an LR scan ----------------

FITTED_RULE_KIND = "ultramem-lr-rule"  # analysis/hparams.py RULE_KIND writes the same


def load_fitted_rule(path: str | Path) -> dict[str, Any]:
    """The fitted-rule JSON that `ultramem hparams` writes (`lr_rule.json`): {kind, version, families: {family:
    {coef, exponent, n_min, n_max, ...}}}. JSON only (nothing in it is executed); ConfigError naming the file."""
    path = Path(path)
    try:
        with open(path) as f:
            rule = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"isoflop.hparams_file: {path} not found; write it with `ultramem hparams "
                          "SWEEP_OR_RUNS --out DIR` (DIR/lr_rule.json) or fix the path (relative to the sweep file)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"isoflop.hparams_file: {path} is not a readable JSON file: {err}") from None
    if not isinstance(rule, dict) or rule.get("kind") != FITTED_RULE_KIND or not isinstance(rule.get("families"),
                                                                                             dict):
        raise ConfigError(f"isoflop.hparams_file: {path} is not a fitted LR rule (expected a JSON object with "
                          f"kind: {FITTED_RULE_KIND!r} and families; `ultramem hparams` writes one)")
    for fam, law in rule["families"].items():
        if not isinstance(law, dict) or not all(isinstance(law.get(k), int | float)
                                                for k in ("coef", "exponent", "n_min", "n_max")):
            raise ConfigError(f"isoflop.hparams_file: {path}: families.{fam} needs numbers coef, exponent, n_min "
                              "and n_max")
    return {**rule, "path": str(path)}


def fitted_lr(rule: dict[str, Any], family: str, active_params: int, where: str, extrapolate: float = 1.0) -> float:
    """Peak LR coef x N^exponent of `family`'s fitted law, for N inside the range of sizes it was fitted on, or up
    to `extrapolate` times beyond it (`isoflop.hparams_extrapolate`; 1: none; `extrapolation` says by how much)."""
    laws = rule["families"]
    if family not in laws:
        raise ConfigError(f"{where}: {rule['path']} has no fitted LR law for family {family!r} (it has "
                          f"{', '.join(sorted(laws)) or 'none'}); scan {family} (method: lr_scan, then `ultramem "
                          "hparams`) or drop it from isoflop.ladder")
    law = laws[family]
    lr = float(law["coef"] * active_params ** law["exponent"])
    factor = extrapolation(rule, family, active_params)
    if factor > extrapolate * (1 + 1e-9):
        lo, hi = law["n_min"], law["n_max"]
        side = "above" if active_params > hi else "below"
        raise ConfigError(
            f"{where}: N = {active_params:,} active parameters is {side} the range {family}'s LR law was fitted on "
            f"in {rule['path']} ({lo:,.0f}-{hi:,.0f}); using it would extrapolate lr*(N) = {law['coef']:.4g} x "
            f"N^{law['exponent']:.4g} by {factor:.3g}x in N (to {lr:.3g}); scan that size too, remove it from "
            f"isoflop.ladder, or allow it with isoflop.hparams_extrapolate: {math.ceil(factor * 10) / 10:g} (`sweep "
            "plan` then lists each extrapolated size)")
    return lr


def extrapolation(rule: dict[str, Any], family: str, active_params: int) -> float:
    """How far N lies outside `family`'s fitted range, as a factor in N: 1 inside it, hi_or_lo ratio outside."""
    law = rule["families"][family]
    lo, hi = float(law["n_min"]), float(law["n_max"])
    if active_params > hi * (1 + 1e-9):
        return active_params / hi
    if active_params < lo * (1 - 1e-9):
        return lo / active_params
    return 1.0
