"""Run folders of a synthetic study drawn from known laws, written with the run store's own writers.

For checking the analysis end to end against a known truth (tests, the notebook, the coverage benchmark): every
loss is generated from a stated law plus noise, so a correct analysis recovers the law, the effective compute
multipliers and the memory slope within its intervals. Nothing here is ever presented as a measured result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.fit import PowerLaw
from runfolder import EvalRow, Final, RunDir, TrainRow


@dataclass(frozen=True)
class SyntheticTruth:
    dense: PowerLaw = PowerLaw(E=1.6, A=60.0, alpha=0.12)  # L(C) of dense models, C in FLOPs
    multipliers: dict[str, float] = field(default_factory=lambda: {"moe": 1.8, "ultramem": 2.5})
    memory_c0: float = 3.2  # UltraMem at a fixed backbone: L = c0 − k·ln(memory values)
    memory_k: float = 0.05
    noise: float = 0.004  # sd of the multiplicative (log-space) noise on every loss
    tokens_per_param: float = 20.0


def _run(root: Path, run_id: str, family: str, n_layers: int, d_model: int, active: float, total: float,
         loss: float, truth: SyntheticTruth, rng: np.random.Generator, memory: dict | None = None,
         moe: dict | None = None, facts: int = 200, sweep: str = "synthetic") -> None:
    tokens = truth.tokens_per_param * active
    fpt = 6 * active
    rd = RunDir(root / run_id)
    rd.write_config({"name": run_id, "sweep": sweep, "seed": 0,
                     "model": {"family": family, "n_layers": n_layers, "d_model": d_model}})
    steps = 10
    for s in range(1, steps + 1):
        frac = s / steps
        curve = loss * (1 + 0.6 * (1 - frac) ** 2)  # decays onto the final loss
        at = {"step": s * 10, "tokens": tokens * frac, "flops": fpt * tokens * frac}
        rd.append_metrics(TrainRow(**at, loss=curve * (1 + 0.01 * rng.standard_normal()), aux_loss=0.0, aux={},
                                   lr=1e-3, grad_norm=1.0))
        if s % 5 == 0:
            rd.append_metrics(EvalRow(**at, val_loss=curve))
    recall = 1 / (1 + math.exp(-(math.log(total) - 14.0)))  # more parameters store more facts
    rd.write_final(Final(
        run_id=run_id, name=run_id, sweep=sweep, family=family, preset=None, seed=0,
        train_loss=loss * 1.01, val_loss=loss,
        params={"total": total, "active": active, "embedding": 0, "non_embedding": total,
                "active_non_embedding": active, "sparse": total - active},
        total_params=total, active_params=active, non_embedding_params=total,
        flops_per_token=fpt, tokens=tokens, flops=fpt * tokens, steps=steps * 10,
        batch_size=8, seq_len=128, lr=1e-3, memory=memory, moe=moe,
        knowledge={"facts": facts, "recall": recall, "heldout_recall": recall / 4, "bits_stored": recall * facts * 5.0},
        wall_s=1.0, tokens_per_s=tokens, tokenizer="byte", vocab_size=256, data_source="synthetic",
    ))
    rd.update_status(state="done", step=steps * 10, total_steps=steps * 10)


def write_synthetic_ladder(root: str | Path, *, sizes: int = 5, seed: int = 0,
                           truth: SyntheticTruth | None = None,
                           late: dict[str, float] | None = None) -> SyntheticTruth:
    """`sizes` activated sizes of each family: dense, and each family in `truth.multipliers` (moe, ultramem).

    Sparse models have 8× the dense total parameters and reach the loss of dense models trained with
    `multipliers[family]` times their compute: L = dense(M·C)·exp(noise).
    late: {run id: factor} adds a second seed of that run, `<run id>-late`, whose loss is `factor` times the law's
    (a run that trained late, the outlier a robust fit should resist).
    """
    late = late or {}
    truth = truth or SyntheticTruth()
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(sizes):
        n_layers, d_model = 2 + i, 64 * (i + 1)
        active = 12 * n_layers * d_model**2
        c = 6 * active * truth.tokens_per_param * active
        _run(root, f"dense-{i}", "dense", n_layers, d_model, active, active, _noisy(truth.dense(c), truth, rng),
             truth, rng)
        for fam, mult in truth.multipliers.items():
            extra = {"moe": {"num_experts": 16, "top_k": 2}} if fam == "moe" else {
                "memory": {"num_values": 4096, "top_m": 16, "heads": 2, "value_expansion": 4, "num_layers": 1,
                           "value_params": 7 * active}}
            _run(root, f"{fam}-{i}", fam, n_layers, d_model, active, 8 * active,
                 _noisy(truth.dense(mult * c), truth, rng), truth, rng, **extra)
            if f"{fam}-{i}" in late:
                _run(root, f"{fam}-{i}-late", fam, n_layers, d_model, active, 8 * active,
                     late[f"{fam}-{i}"] * truth.dense(mult * c), truth, rng, **extra)
    return truth


def write_synthetic_memory_sweep(root: str | Path, *, sizes: int = 4, seed: int = 0,
                                 truth: SyntheticTruth | None = None) -> SyntheticTruth:
    """UltraMem at one backbone with `sizes` memory sizes (1024·4^j values): L = c0 − k·ln(values)·exp(noise).

    A sweep of its own, as a real memory-size study would be: mixed into the ladder's runs directory it would
    put several sparsities into one family law.
    """
    truth = truth or SyntheticTruth()
    root = Path(root)
    rng = np.random.default_rng(seed)
    active = 12 * 2 * 64**2
    for j in range(sizes):
        slots = 1024 * 4**j
        loss = _noisy(truth.memory_c0 - truth.memory_k * math.log(slots), truth, rng)
        memory = {"num_values": slots, "top_m": 16, "heads": 2, "value_expansion": 4, "num_layers": 1,
                  "value_params": slots * 64}
        _run(root, f"ultramem-mem{j}", "ultramem", 2, 64, active, active + slots * 64, loss, truth, rng,
             memory=memory, sweep="synthetic_memory")
    return truth


def _noisy(value: float, truth: SyntheticTruth, rng: np.random.Generator) -> float:
    return float(value * math.exp(truth.noise * rng.standard_normal()))
