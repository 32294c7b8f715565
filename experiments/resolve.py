"""RunConfig -> resolved RunConfig: every field concrete, ready to be saved as the run's `config.yaml`.

Resolution is fast (no torch, no data loading), so a sweep plans 1,000 runs in a second:
  - model: the preset expanded into every ModelConfig field (the preset name is kept for identity),
    vocab_size from the tokenizer (`experiments.data.tokenizer_vocab_size`) unless set explicitly;
  - train.seq_len: the model's context unless set;
  - train.batch_size / train.lr: derived from the active parameter count (`experiments.hparams`) when 'auto';
  - train.micro_batch_size: sequences per forward/backward on one process (default: no accumulation);
  - train.steps and train.tokens: both set, tokens = steps * batch_size * seq_len (the budget in tokens or
    'KxN' multiples of the active parameters is rounded to whole optimizer steps);
  - train.warmup: a number of steps;
  - train.branches (a WSD trunk's cooldown branches): each budget in tokens, rounded to whole steps, ascending.
Resolving a resolved config returns it unchanged.
"""

from __future__ import annotations

from typing import Any

from experiments import hparams
from experiments.config import (
    RunConfig,
    parse_token_budget,
    resolve_model,
    run_config_from_dict,
    wsd_cooldown_start,
)
from experiments.data.tokenizers import tokenizer_vocab_size
from ultramem.accounting import count_params
from ultramem.config import ConfigError, ModelConfig


def resolve_run_config(cfg: RunConfig, source: str = "<config>") -> RunConfig:
    """The resolved form of `cfg`. Errors name `source` and the field to fix."""
    vocab = tokenizer_vocab_size(cfg.data)
    model = resolve_model(cfg.model, vocab, source)
    if model.vocab_size < vocab:
        raise ConfigError(f"{source}: model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({vocab}); remove model.vocab_size or set it to at least {vocab}")
    train = _resolve_train(cfg, model, count_params(model).active, source)
    data = cfg.model_dump(mode="json")
    data["model"] = _model_dict(cfg.model, model)
    data["train"] = train
    return run_config_from_dict(data, source)


def model_config(cfg: RunConfig) -> ModelConfig:
    """The ModelConfig of a resolved RunConfig (its vocab size is already in the model fields)."""
    return resolve_model(cfg.model, None)


def _model_dict(spec: dict[str, Any], model: ModelConfig) -> dict[str, Any]:
    preset = spec.get("preset")
    return {"preset": preset, **model.to_dict()} if preset else model.to_dict()


def _resolve_train(cfg: RunConfig, model: ModelConfig, active: int, source: str) -> dict[str, Any]:
    t, nproc = cfg.train, cfg.parallel.nproc
    seq_len = t.seq_len or model.seq_len
    if seq_len > model.seq_len:
        raise ConfigError(f"{source}: train.seq_len ({seq_len}) exceeds model.seq_len ({model.seq_len}), the "
                          f"RoPE table length; set model.seq_len: {seq_len} or a smaller train.seq_len")
    budget = None if t.steps is not None else parse_token_budget(t.tokens, active, f"{source}: train.tokens")
    batch = hparams.batch_size(active, seq_len, budget, nproc) if t.batch_size == "auto" else t.batch_size
    if batch < 1 or batch % nproc:
        raise ConfigError(f"{source}: train.batch_size ({batch}) must be a positive multiple of parallel.nproc "
                          f"({nproc}): it is the global number of sequences per optimizer step")
    per_rank = batch // nproc
    micro = t.micro_batch_size or per_rank
    if micro < 1 or per_rank % micro:
        raise ConfigError(f"{source}: train.micro_batch_size ({micro}) must divide the sequences each process "
                          f"handles per step (batch_size / nproc = {per_rank})")
    if t.steps is not None and t.steps < 1:
        raise ConfigError(f"{source}: train.steps ({t.steps}) must be >= 1")
    steps = t.steps if t.steps is not None else hparams.num_steps(budget, batch, seq_len)
    lr = hparams.learning_rate(active) if t.lr == "auto" else t.lr
    warmup = hparams.warmup_steps(t.warmup, steps)
    branches = _resolve_branches(t, active, steps, batch, seq_len, warmup, source)
    return {
        **t.model_dump(mode="json"),
        "tokens": steps * batch * seq_len,
        "steps": steps,
        "batch_size": batch,
        "micro_batch_size": micro,
        "seq_len": seq_len,
        "lr": float(lr),
        "warmup": warmup,
        "branches": branches,
    }


def _resolve_branches(t: Any, active: int, steps: int, batch: int, seq_len: int, warmup: int,
                      source: str) -> list[int]:
    """A WSD trunk's branch budgets in tokens (whole steps), ascending; each must leave the trunk in its stable
    phase: its branch step (where its own cooldown starts) at or before the trunk's cooldown start."""
    if t.branch_of is not None and t.schedule != "wsd":
        raise ConfigError(f"{source}: train.branch_of is set (a cooldown branch) but train.schedule is "
                          f"{t.schedule!r}; a branch is a WSD run")
    if not t.branches:
        return []
    where = f"{source}: train.branches"
    if t.schedule != "wsd":
        raise ConfigError(f"{where}: cooldown branches need train.schedule: wsd (got {t.schedule!r}): a branch "
                          "leaves the trunk's constant-LR phase")
    if t.branch_of is not None:
        raise ConfigError(f"{where}: a branch (train.branch_of is set) cannot have branches of its own")
    trunk_start = wsd_cooldown_start(steps, warmup, t.cooldown)
    out: dict[int, Any] = {}
    for budget in t.branches:
        n = hparams.num_steps(parse_token_budget(budget, active, where), batch, seq_len)
        start = wsd_cooldown_start(n, warmup, t.cooldown)
        if n >= steps or start > trunk_start:
            raise ConfigError(f"{where}: budget {budget!r} ({n} steps of {batch} x {seq_len} tokens) is not below "
                              f"the trunk's own budget ({steps} steps, stable until step {trunk_start}); a branch "
                              "must end before the trunk's cooldown starts")
        if start < 1:
            raise ConfigError(f"{where}: budget {budget!r} ({n} steps) is so short that its cooldown starts at "
                              "step 0; train it as a run of its own")
        if n in out:
            raise ConfigError(f"{where}: budgets {out[n]!r} and {budget!r} round to the same {n} steps; drop one")
        out[n] = budget
    return [n * batch * seq_len for n in sorted(out)]
