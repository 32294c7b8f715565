"""Optimizer parameter groups and the value-table learning-rate multiplier (UltraMem §2.6, "value lr decay").

Groups (each a dict torch optimizers accept, plus "name" and "lr_mult_fn"):
  decay     every weight with >= 2 dims that is not a value table (linears, embeddings, keys, cores, conv)
  no_decay  norm weights and other 1-dim parameters
  values    memory value tables (the `parallel.value_params` of every family's `parallel.value_module`: `values`
            of PKM and UltraMem layers and of Memory+ tables, `values` and `pre_values` of the UltraMemV2 table),
            with weight decay (the run's, or model.memory.value_weight_decay), at base LR x lr_mult_fn(progress), or, when the group has a "fixed_lr" (Memory+'s
            value_lr), at that LR: constant (no warmup, no decay), or with "fixed_lr_scheduled" scaled by the
            run's schedule, fixed_lr x schedule(step) / peak LR (the trainer's set_lr). With "clip_separately"
            its gradients are clipped on their own (Memory+'s value_clip: separate; the trainer's clip_gradients)

`lr_mult_fn(progress)` takes the training progress step / total_steps in [0, 1] and returns the multiplier the
trainer applies on top of its own schedule. For values it is the official `CosWithWarmup.get_lr` rule
    mult = 1 + (value_lr_mult - 1) * max(0, 1 - progress / value_lr_decay),
i.e. value_lr_mult at step 0, decaying linearly to 1x at progress = value_lr_decay and 1x after that.
The multiplier functions are small picklable objects, but the trainer should keep them out of the optimizer
(pass the groups without "lr_mult_fn") so optimizer checkpoints stay loadable with torch.load(weights_only=True).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ultramem.config import ModelConfig
from ultramem.families import ValueLR, get_family, value_tables


@dataclass(frozen=True)
class LinearDecayMultiplier:
    start: float = 1.0  # multiplier at progress 0
    decay_fraction: float = 1.0  # progress at which it reaches 1

    def __call__(self, progress: float) -> float:
        return value_lr_multiplier(progress, self.start, self.decay_fraction)


def value_lr_multiplier(progress: float, start: float, decay_fraction: float) -> float:
    return 1.0 + (start - 1.0) * max(0.0, 1.0 - progress / decay_fraction)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split `model`'s trainable parameters into the groups above; empty groups are left out."""
    tables = value_tables()
    value_ids = {id(getattr(m, name)) for m in model.modules() for kind, names in tables if isinstance(m, kind)
                 for name in names}
    decay, no_decay, values = [], [], []
    for p in model.parameters():  # shared (tied) parameters are yielded once
        if not p.requires_grad:
            continue
        if id(p) in value_ids:
            values.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    rule = value_lr(getattr(model, "cfg", None))
    value_decay = weight_decay if rule.weight_decay is None else rule.weight_decay
    value_group = {"name": "values", "params": values, "weight_decay": value_decay,
                   "lr_mult_fn": LinearDecayMultiplier(rule.mult, rule.decay)}
    if rule.fixed is not None:
        value_group["fixed_lr"] = rule.fixed
    # keys only away from today's rule, so that the optimizer state of earlier runs stays the same
    if rule.fixed_scheduled:
        value_group["fixed_lr_scheduled"] = True
    if rule.separate_clip:
        value_group["clip_separately"] = True
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr_mult_fn": LinearDecayMultiplier()},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_mult_fn": LinearDecayMultiplier()},
        value_group,
    ]
    return [g for g in groups if g["params"]]


def value_lr(cfg: object) -> ValueLR:
    """The value tables' LR rule: the family's `value_lr` hook, else model.memory's multiplier (PKM, UltraMem).
    `cfg` is the model's ModelConfig; anything else (a bare layer's own config, None) gets the plain 1x rule."""
    if not isinstance(cfg, ModelConfig):
        return ValueLR()
    fam = get_family(cfg.family)
    if fam.value_lr is not None:
        return fam.value_lr(cfg)
    mem = getattr(cfg, "memory", None)
    return (ValueLR(mem.value_lr_mult, mem.value_lr_decay, weight_decay=mem.value_weight_decay) if mem is not None
            else ValueLR())
