"""LR schedule, optimizer groups and size-derived hyperparameters against closed forms and published numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from experiments import hparams
from experiments.config import TrainConfig
from experiments.trainer import lr_at, set_lr


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-3, "steps": 101, "warmup": 10, "min_lr_ratio": 0.1, **kw})


def test_warmup_is_linear_from_lr_over_warmup_to_peak():
    t = _train()
    assert [lr_at(s, t) for s in range(10)] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])


def test_cosine_runs_from_peak_to_ten_percent_at_the_last_step():
    t = _train()
    assert lr_at(10, t) == pytest.approx(1e-3)
    assert lr_at(100, t) == pytest.approx(1e-4)  # paper Table 4: cosine to 10%
    # first cosine step is 10, last is 100: the midpoint 55 sits halfway between peak and floor
    assert lr_at(55, t) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    # closed form at an arbitrary step
    s = 73
    expected = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))
    assert lr_at(s, t) == pytest.approx(expected)


def test_wsd_is_constant_then_cools_down_over_its_last_fraction():
    # 100 steps, warmup 10, cooldown 20% = the last 20 steps (80..99), linear to the 10% floor
    t = _train(steps=100, schedule="wsd", cooldown=0.2)
    assert [lr_at(s, t) for s in (10, 50, 79)] == pytest.approx([1e-3] * 3)
    assert [lr_at(s, t) for s in range(80, 100)] == pytest.approx(
        [1e-3 * (1 - 0.9 * (s - 79) / 20) for s in range(80, 100)])
    assert lr_at(99, t) == pytest.approx(1e-4)


def test_wsd_one_minus_sqrt_cooldown_to_zero():
    t = _train(steps=100, schedule="wsd", cooldown=0.25, cooldown_shape="1-sqrt", min_lr_ratio=0.0)
    # Hagele et al.: lr = peak (1 - sqrt((t - t0) / (T - t0))) over the cooldown
    assert [lr_at(s, t) for s in range(75, 100)] == pytest.approx(
        [1e-3 * (1 - math.sqrt((s - 74) / 25)) for s in range(75, 100)], abs=1e-12)
    assert lr_at(74, t) == pytest.approx(1e-3) and lr_at(99, t) == 0.0


def test_linear_schedule_runs_straight_from_peak_to_the_floor():
    t = _train(schedule="linear")  # steps 10..100 post-warmup
    assert [lr_at(s, t) for s in (10, 55, 100)] == pytest.approx([1e-3, 1e-3 - 0.5 * 0.9e-3, 1e-4])


def test_new_schedule_fields_at_their_defaults_leave_run_ids_unchanged():
    from experiments.config import run_id

    resolved = {"model": {"family": "dense"}, "train": {"lr": 1e-3, "steps": 10}}
    with_defaults = {**resolved, "train": {**resolved["train"], "schedule": "cosine", "cooldown": 0.2,
                                           "cooldown_shape": "linear"}}
    assert run_id(with_defaults) == run_id(resolved)
    assert run_id({**resolved, "train": {**resolved["train"], "schedule": "wsd"}}) != run_id(resolved)


def test_no_warmup_starts_at_peak():
    assert lr_at(0, _train(warmup=0)) == pytest.approx(1e-3)


def test_group_multiplier_is_a_function_of_training_progress():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=1.0)
    t = _train(warmup=0)
    seen = []
    mult = lambda progress: seen.append(progress) or 4.0 - 3.0 * progress
    base = set_lr(opt, [None, mult], 50, t)
    assert base == pytest.approx(lr_at(50, t))
    assert opt.param_groups[0]["lr"] == pytest.approx(base)
    assert seen == [pytest.approx(50 / 101)]
    assert opt.param_groups[1]["lr"] == pytest.approx(base * (4.0 - 3.0 * 50 / 101))


def test_lr_power_law_is_the_least_squares_fit_of_paper_table4():
    n = np.array([p for p, _ in hparams.PAPER_TABLE4_LR])
    lr = np.array([v for _, v in hparams.PAPER_TABLE4_LR])
    assert list(zip(n, lr, strict=True)) == [(151e6, 6e-4), (680e6, 2.5e-4), (1.6e9, 2e-4), (6.5e9, 1.2e-4)]
    slope, intercept = np.polyfit(np.log(n), np.log(lr), 1)
    assert pytest.approx(slope, rel=1e-3) == hparams.LR_EXPONENT
    assert pytest.approx(math.exp(intercept), rel=1e-3) == hparams.LR_COEF
    for size, published in hparams.PAPER_TABLE4_LR:
        assert hparams.learning_rate(int(size)) == pytest.approx(published, rel=0.2)


def test_lr_is_capped_for_tiny_models():
    assert hparams.learning_rate(1_000) == hparams.LR_MAX


def test_batch_size_follows_the_olmo_ladder_rule():
    # OLMo ladder: 160 sequences of 2048 tokens at 108M parameters, scaling as N^(2/3)
    assert hparams.batch_size(108_000_000, 2048) == 160
    assert hparams.batch_size(108_000_000 * 8, 2048) == 640  # 8^(2/3) = 4
    assert hparams.batch_size(108_000_000, 1024) == 320  # same tokens per step at half the context
    assert hparams.batch_size(108_000_000, 2048, multiple=3) % 3 == 0


def test_short_budgets_shrink_the_batch_to_keep_min_steps():
    seq_len, budget = 256, 256 * 1000
    b = hparams.batch_size(108_000_000, seq_len, token_budget=budget)
    assert b == 10  # 1000 sequences over MIN_STEPS = 100 steps
    assert hparams.num_steps(budget, b, seq_len) == hparams.MIN_STEPS


def test_warmup_fraction_and_steps():
    assert hparams.warmup_steps(0.01, 238_418) == 2385  # the paper's 1% of a long run
    assert hparams.warmup_steps(0.01, 1000) == 20  # short runs: at least min(20 steps, 5% of the run)
    assert hparams.warmup_steps(0.01, 391) == 20
    assert hparams.warmup_steps(0.01, 50) == 3
    assert hparams.warmup_steps(0.01, 5) == 1  # a nonzero fraction always warms up at least one step
    assert hparams.warmup_steps(0.5, 100) == 50
    assert hparams.warmup_steps(0.0, 50) == 0
    assert hparams.warmup_steps(25, 1000) == 25
    assert hparams.warmup_steps(25, 10) == 10


def test_trainer_adamw_is_fused_on_cpu_and_equals_the_textbook_update():
    """build_optimizer takes torch's fused AdamW on the CPU (docs/performance.md, issue 23); three steps of it equal
    Loshchilov & Hutter's decoupled-decay Adam written out here, group by group (weight decay per group)."""
    from experiments.trainer import build_optimizer
    from ultramem import build_model
    from ultramem.presets import get_preset

    torch.manual_seed(0)
    model = build_model(get_preset("ultramem-t1-x6"))
    t = _train(warmup=0)
    opt, _ = build_optimizer(model, t)
    assert opt.defaults["fused"] is True
    params = [(p, g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]]
    ref = [(p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)) for p, _, _ in params]
    gen = torch.Generator().manual_seed(3)
    b1, b2, eps = t.beta1, t.beta2, t.eps
    for step in range(1, 4):
        grads = [torch.randn(p.shape, generator=gen) for p, _, _ in params]
        for (p, _, _), g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, ((p, lr, wd), g) in enumerate(zip(params, grads, strict=True)):
            w, m, v = ref[i]
            w = w * (1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            w = w - lr * (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
            ref[i] = (w, m, v)
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
    assert {wd for _, _, wd in params} == {0.0, t.weight_decay}  # both kinds of group were checked


def test_adamw_kernel_is_a_choice_outside_the_run_id():
    from experiments.config import run_id
    from experiments.trainer import build_optimizer
    from ultramem import build_model
    from ultramem.presets import get_preset

    resolved = {"model": {"family": "dense"}, "train": {"lr": 1e-3, "steps": 10}}
    for kernel in ("fused", "for_loop", "auto"):
        assert run_id({**resolved, "train": {**resolved["train"], "adamw": kernel}}) == run_id(resolved)
    model = build_model(get_preset("dense-t1"))
    loop, _ = build_optimizer(model, _train(warmup=0).model_copy(update={"adamw": "for_loop"}))
    assert not loop.defaults["fused"] and loop.defaults["foreach"] is False
    fused, _ = build_optimizer(model, _train(warmup=0).model_copy(update={"adamw": "fused"}))
    assert fused.defaults["fused"] is True
