"""RunConfig -> resolved RunConfig: every field concrete, ready to be saved as the run's `config.yaml`.

Resolution is fast (no torch, no data loading), so a sweep plans 1,000 runs in a second:
  - model: the preset expanded into every ModelConfig field (the preset name is kept for identity),
    vocab_size from the tokenizer (`experiments.data.tokenizer_vocab_size`) unless set explicitly;
  - train.seq_len: the model's context unless set;
  - train.batch_size / train.lr: derived from the active parameter count (`experiments.hparams`) when 'auto';
  - train.micro_batch_size: sequences per forward/backward on one process (default: no accumulation);
  - train.steps and train.tokens: both set, tokens = steps * batch_size * seq_len (the budget in tokens or
    'KxN' multiples of the active parameters is rounded to whole optimizer steps);
  - train.warmup: a number of steps.
Resolving a resolved config returns it unchanged.
"""

from __future__ import annotations

from typing import Any

from experiments import hparams
from experiments.config import RunConfig, parse_token_budget, resolve_model, run_config_from_dict
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
    return {
        **t.model_dump(mode="json"),
        "tokens": steps * batch * seq_len,
        "steps": steps,
        "batch_size": batch,
        "micro_batch_size": micro,
        "seq_len": seq_len,
        "lr": float(lr),
        "warmup": hparams.warmup_steps(t.warmup, steps),
    }
