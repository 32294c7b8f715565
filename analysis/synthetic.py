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

from analysis.chinchilla import HOFFMANN_2022, ChinchillaLaw
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


# ---- L(N, D): an IsoFLOP grid of WSD trunks and cooldown branches, per family -----------------------------------


def _lnd_laws() -> dict[str, ChinchillaLaw]:
    """Dense: Hoffmann et al.'s fit; the sparse families need fewer parameters (smaller A) and differ in α or β,
    so that a per-family fit has something to tell apart."""
    return {"dense": HOFFMANN_2022,
            "moe": ChinchillaLaw(E=1.69337368, A=330.0, B=410.722827, alpha=0.35, beta=0.2849083),
            "ultramem": ChinchillaLaw(E=1.69337368, A=300.0, B=400.0, alpha=0.33917084, beta=0.29)}


@dataclass(frozen=True)
class LNDTruth:
    """An IsoFLOP study drawn from known per-family laws L(N, D) = E + A/N^α + B/D^β.

    Training FLOPs per token are F = flops_per_param·N (7.2, not 6: the compute C = F·D in `flops` is the
    project's count, and an analysis that assumed 6ND would misplace D by 20%). Each size serves the budgets whose
    D/N = C/(F·N²) lies in `tokens_per_param`, as the isoflop sweep method lays them (experiments/sweep/isoflop.py),
    and `seeds` independent trunks per size give the seed clusters. Noise is multiplicative, independent per run.
    """

    laws: dict[str, ChinchillaLaw] = field(default_factory=_lnd_laws)
    sizes: tuple[float, ...] = tuple(float(n) for n in np.geomspace(2e7, 2e9, 21))  # 1.26x apart
    budgets: tuple[float, ...] = tuple(float(c) for c in np.geomspace(1e18, 3.16e19, 6))  # 1.5 decades
    tokens_per_param: tuple[float, float] = (2.0, 200.0)
    flops_per_param: float = 7.2
    seeds: int = 2
    noise: float = 0.002
    batch_tokens: int = 2**20  # tokens per optimizer step (steps in the run folders)
    cooldown: float = 0.2


def write_synthetic_isoflop(root: str | Path, truth: LNDTruth | None = None, *, seed: int = 0) -> LNDTruth:
    """Run folders as the trainer writes them for an IsoFLOP sweep served by WSD trunks: per family, size and seed
    one trunk at the largest budget it serves (`train.branches` lists the others) and one cooldown branch folder
    per smaller budget (`train.branch_of` = the trunk's run id, metrics from its branch step on)."""
    truth = truth or LNDTruth()
    root = Path(root)
    rng = np.random.default_rng(seed)
    lo, hi = truth.tokens_per_param
    for family, law in truth.laws.items():
        for i, n in enumerate(truth.sizes):
            fpt = truth.flops_per_param * n
            budgets = [c for c in truth.budgets if lo <= c / (fpt * n) <= hi]
            if not budgets:
                continue
            tokens = [round(c / fpt) for c in budgets]
            for s in range(truth.seeds):
                trunk = f"{family}-n{i}-s{s}"
                steps = max(1, round(tokens[-1] / truth.batch_tokens))
                for j, d in enumerate(tokens):
                    own = j == len(tokens) - 1
                    run_id = trunk if own else f"{trunk}-b{j}"
                    train = {"schedule": "wsd", "tokens": d, "cooldown": truth.cooldown,
                             "branches": tokens[:-1] if own else [], "branch_of": None if own else trunk,
                             "lr_mult_steps": None if own else steps}
                    loss = float(law(n, d) * math.exp(truth.noise * rng.standard_normal()))
                    _lnd_run(root, run_id, family, n, d, fpt, loss, s, train, truth, rng)
    return truth


def _lnd_run(root: Path, run_id: str, family: str, n: float, d: int, fpt: float, loss: float, seed: int,
             train: dict, truth: LNDTruth, rng: np.random.Generator) -> None:
    steps = max(1, round(d / truth.batch_tokens))
    first = 0 if train["branch_of"] is None else steps - max(1, round(truth.cooldown * steps))  # its branch step
    rd = RunDir(root / run_id)
    rd.write_config({"name": run_id, "sweep": "synthetic_isoflop", "seed": seed,
                     "model": {"family": family}, "train": {**train, "steps": steps}}, run_id)
    for s in sorted({first + 1, (first + steps) // 2, steps} - {0}):
        frac = s / steps
        at = {"step": s, "tokens": d * frac, "flops": fpt * d * frac}
        curve = loss * (1 + 0.3 * (1 - frac))
        rd.append_metrics(TrainRow(**at, loss=curve * (1 + 0.01 * rng.standard_normal()), aux_loss=0.0, aux={},
                                   lr=1e-3, grad_norm=1.0))
    rd.append_metrics(EvalRow(step=steps, tokens=d, flops=fpt * d, val_loss=loss))
    active, total = int(round(n)), int(round(n if family == "dense" else 6 * n))
    rd.write_final(Final(
        run_id=run_id, name=run_id, sweep="synthetic_isoflop", family=family, preset=None, seed=seed,
        train_loss=loss * 1.01, val_loss=loss,
        params={"total": total, "active": active, "embedding": 0, "non_embedding": total,
                "active_non_embedding": active, "sparse": total - active},
        total_params=total, active_params=active, non_embedding_params=total, flops_per_token=fpt, tokens=int(d),
        flops=fpt * d, steps=steps, batch_size=truth.batch_tokens // 2048, seq_len=2048, lr=1e-3,
        wall_s=1.0, tokens_per_s=float(d), tokenizer="byte", vocab_size=256, data_source="synthetic"))
    rd.update_status(state="done", step=steps, total_steps=steps)
