"""Training rules taken from the official code, each against a plain reference:

- Memory+'s value LR (`model.memory_plus.value_lr_schedule`): `constant` (ByteDance's port) keeps value_lr at every
  step; `scheduled` (Meta's lingua, whose LambdaLR scales every group's own LR) is value_lr x the run's schedule,
  checked against a hand-computed table of a 6-step cosine schedule;
- Memory+'s gradient clipping (`model.memory_plus.value_clip`): `separate` (Meta's train loop) clips the value
  table's gradients and the rest's each to train.grad_clip, `joint` (ByteDance's port, OLMo) one norm over all,
  checked against per-group norms computed in a plain loop;
- UltraMemV2's auxiliary losses are the sum over layers of coefficient x loss (ByteDance adds it in every layer),
  checked against a loop calling each layer on its own input.
"""

from __future__ import annotations

import math

import pytest
import torch

from experiments.config import run_config_from_dict, run_id
from experiments.resolve import resolve_run_config
from experiments.trainer import build_optimizer, clip_gradients, set_lr
from ultramem import build_model
from ultramem.config import ConfigError, ModelConfig
from ultramem.presets import get_preset


def memory_plus(**fields) -> ModelConfig:
    base = ModelConfig(family="memory_plus", vocab_size=61, seq_len=32, n_layers=3, d_model=32, n_heads=2,
                       ffn_hidden=64)
    mp = {"layers": "0,2", "num_keys": 6, "key_dim": 8, "heads": 2, "top_m": 4, "value_lr": 3e-3, **fields}
    return ModelConfig.from_dict({**base.to_dict(), "memory_plus": mp})


def train_config(steps: int = 6, warmup: int = 2, lr: float = 1e-2):
    return resolve_run_config(run_config_from_dict({
        "model": {"preset": "memory_plus-t1-x6"}, "data": {"source": "embedded"},
        "train": {"steps": steps, "batch_size": 4, "seq_len": 32, "lr": lr, "warmup": warmup, "schedule": "cosine",
                  "min_lr_ratio": 0.1}}, "test")).train


# ---- 1. the value LR --------------------------------------------------------------------------------------------

# cosine with 2 warmup steps over 6 steps to 10%: warmup (s + 1) / 2, then 0.1 + 0.45 (1 + cos(pi (s - 2) / 3))
SCHEDULE = [0.5, 1.0, 1.0, 0.1 + 0.45 * 1.5, 0.1 + 0.45 * 0.5, 0.1]


@pytest.mark.parametrize("rule", ["constant", "scheduled"])
def test_the_value_lr_follows_its_rule_step_by_step(rule):
    torch.manual_seed(0)
    t = train_config()
    opt, fns = build_optimizer(build_model(memory_plus(value_lr_schedule=rule)), t)
    names = [g["name"] for g in opt.param_groups]
    for step, factor in enumerate(SCHEDULE):
        set_lr(opt, fns, step, t)
        lrs = dict(zip(names, (g["lr"] for g in opt.param_groups), strict=True))
        want = 3e-3 * factor if rule == "scheduled" else 3e-3
        assert lrs["values"] == pytest.approx(want, rel=1e-12), step
        assert lrs["decay"] == pytest.approx(1e-2 * factor, rel=1e-12) == lrs["no_decay"]


def test_rule_fields_are_checked_and_enter_run_ids_only_away_from_their_defaults():
    with pytest.raises(ConfigError, match=r"model.memory_plus.value_lr_schedule.*constant \| scheduled"):
        memory_plus(value_lr_schedule="cosine")
    with pytest.raises(ConfigError, match=r"model.memory_plus.value_clip.*joint \| separate"):
        memory_plus(value_clip="apart")

    def rid(**mp):
        return run_id(resolve_run_config(run_config_from_dict({
            "model": {"preset": "memory_plus-t1-x6", "memory_plus": mp}, "data": {"source": "embedded"},
            "train": {"steps": 10, "batch_size": 4, "seq_len": 32}}, "test")).model_dump(mode="json"))

    cfg = resolve_run_config(run_config_from_dict({
        "model": {"preset": "memory_plus-t1-x6"}, "data": {"source": "embedded"},
        "train": {"steps": 10, "batch_size": 4, "seq_len": 32}}, "test")).model_dump(mode="json")
    old = {**cfg, "model": {**cfg["model"], "memory_plus": {
        k: v for k, v in cfg["model"]["memory_plus"].items() if k not in ("value_lr_schedule", "value_clip")}}}
    assert rid() == rid(value_lr_schedule="constant", value_clip="joint") == run_id(old)  # as before the fields
    assert len({rid(), rid(value_lr_schedule="scheduled"), rid(value_clip="separate")}) == 3


def test_presets_keep_the_rules_their_committed_runs_trained_with():
    for name in ("memory_plus-227m", "memory_plus-t1-x6", "memory_plus-t6-x6"):
        mp = get_preset(name).memory_plus
        assert (mp.value_lr_schedule, mp.value_clip) == ("constant", "joint")


# ---- 2. gradient clipping ---------------------------------------------------------------------------------------


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def norm(grads: dict[str, torch.Tensor], names) -> float:
    return math.sqrt(sum(float(grads[n].double().pow(2).sum()) for n in names))


@pytest.mark.parametrize("rule", ["joint", "separate"])
def test_clipping_by_group_matches_a_plain_loop(rule):
    torch.manual_seed(1)
    model = build_model(memory_plus(value_clip=rule))
    opt, _ = build_optimizer(model, train_config())
    idx = torch.randint(0, 61, (4, 16))
    model(idx, idx.roll(-1, 1)).loss.backward()
    before = grads_of(model)
    values = [n for n in before if n == "shared.values"]
    rest = [n for n in before if n not in values]
    assert values == ["shared.values"] and rest
    n_values, n_rest = norm(before, values), norm(before, rest)
    max_norm = math.sqrt(n_values * n_rest)  # between the two norms: only the larger group is over it alone

    total = clip_gradients(opt, model, max_norm)

    after = grads_of(model)
    assert float(total) == pytest.approx(math.hypot(n_values, n_rest), rel=1e-5)  # the norm before clipping
    if rule == "separate":  # Meta: each group's norm is clipped to max_norm on its own
        coef = {n: min(1.0, max_norm / ((n_values if n in values else n_rest) + 1e-6)) for n in before}
        assert norm(after, values) == pytest.approx(min(n_values, max_norm), rel=1e-5)
        assert norm(after, rest) == pytest.approx(min(n_rest, max_norm), rel=1e-5)
    else:  # one norm over all parameters
        coef = dict.fromkeys(before, min(1.0, max_norm / (math.hypot(n_values, n_rest) + 1e-6)))
        assert norm(after, [*values, *rest]) == pytest.approx(max_norm, rel=1e-5)
    for n, g in before.items():
        torch.testing.assert_close(after[n], g * coef[n], rtol=1e-5, atol=1e-12)


def test_without_a_separate_group_clipping_is_torchs_clip_over_all_parameters():
    torch.manual_seed(2)
    model = build_model(memory_plus())
    opt, _ = build_optimizer(model, train_config())
    idx = torch.randint(0, 61, (4, 16))
    model(idx, idx.roll(-1, 1)).loss.backward()
    copy = build_model(memory_plus())
    for p, q in zip(model.parameters(), copy.parameters(), strict=True):
        q.grad = p.grad.clone()
    a = clip_gradients(opt, model, 0.05)
    b = torch.nn.utils.clip_grad_norm_(copy.parameters(), 0.05)
    assert torch.equal(a, b)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), copy.parameters(), strict=True))


# ---- 3. UltraMemV2's auxiliary losses: a sum over layers --------------------------------------------------------


def test_ultramem_v2_aux_loss_is_the_sum_over_layers_of_each_layers_weighted_losses():
    torch.manual_seed(3)
    base = ModelConfig(family="ultramem_v2", vocab_size=61, seq_len=32, n_layers=3, d_model=32, n_heads=2,
                       ffn_hidden=64)
    v2 = {"num_keys": 4, "key_dim": 8, "value_dim": 12, "pre_value_dim": 4, "heads": 2, "top_m": 3,
          "share_ratio": 0.75, "init": "official", "balance_loss_weight": 0.01, "tucker_penalty": 0.5}
    model = build_model(ModelConfig.from_dict({**base.to_dict(), "memory_v2": v2}))
    inputs = []
    hooks = [b.ffn.memory.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
             for b in model.blocks]
    out = model(torch.randint(0, 61, (2, 8)))
    for h in hooks:
        h.remove()
    assert len(inputs) == 3
    want, balances = 0.0, []
    for block, h in zip(model.blocks, inputs, strict=True):  # each layer on its own input
        _, aux = block.ffn.memory(h)
        want += 0.01 * float(aux["balance_loss"]) + 0.5 * float(aux["tucker_penalty"])
        balances.append(float(aux["balance_loss"]))
    assert min(balances) > 0
    assert float(out.aux_loss.detach()) == pytest.approx(want, rel=1e-5)
    assert float(out.aux["balance_loss"]) == pytest.approx(sum(balances) / 3, rel=1e-5)  # logged: the mean
    assert out.aux_loss.requires_grad
