"""resolve_run_config: every field concrete, budgets and derived hyperparameters right, fast, idempotent."""

from __future__ import annotations

import subprocess
import sys

import pytest

from experiments import hparams
from experiments.config import run_config_from_dict
from experiments.resolve import model_config, resolve_run_config
from ultramem import build_model
from ultramem.accounting import count_params
from ultramem.config import ConfigError
from ultramem.presets import get_preset


def _cfg(**sections):
    data = {"model": {"preset": "dense-tiny"}, "data": {"source": "embedded"}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return run_config_from_dict(data, "test.yaml")


def test_preset_is_expanded_into_every_model_field_with_the_tokenizer_vocab():
    r = resolve_run_config(_cfg(model={"preset": "ultramem-tiny", "memory.top_m": 8}))
    preset = get_preset("ultramem-tiny").to_dict()
    assert r.model["preset"] == "ultramem-tiny"
    assert set(r.model) - {"preset"} == set(preset)
    assert set(r.model["memory"]) == set(preset["memory"])
    assert r.model["vocab_size"] == 257  # 256 bytes + end-of-document
    assert r.model["memory"]["top_m"] == 8
    assert r.model["n_layers"] == preset["n_layers"]


def test_token_budget_in_multiples_of_active_params():
    r = resolve_run_config(_cfg(train={"tokens": "20xN"}))
    active = sum(p.numel() for p in build_model(model_config(r)).parameters())  # dense: every param is active
    t = r.train
    assert t.tokens == t.steps * t.batch_size * t.seq_len
    assert abs(t.tokens - 20 * active) <= t.batch_size * t.seq_len / 2  # rounded to whole steps


def test_steps_override_the_token_budget():
    r = resolve_run_config(_cfg(train={"tokens": "5e9", "steps": 7, "batch_size": 4, "seq_len": 32}))
    assert (r.train.steps, r.train.tokens) == (7, 7 * 4 * 32)


def test_auto_batch_and_lr_follow_hparams_and_explicit_values_win():
    r = resolve_run_config(_cfg(train={"tokens": 10_000_000}))
    n = count_params(model_config(r)).active
    assert r.train.lr == pytest.approx(hparams.learning_rate(n))
    assert r.train.batch_size == hparams.batch_size(n, r.train.seq_len, 10_000_000)
    r2 = resolve_run_config(_cfg(train={"lr": 1e-3, "batch_size": 12, "micro_batch_size": 4, "steps": 3}))
    assert (r2.train.lr, r2.train.batch_size, r2.train.micro_batch_size) == (1e-3, 12, 4)


def test_warmup_becomes_steps_and_micro_batch_defaults_to_the_per_process_batch():
    r = resolve_run_config(_cfg(train={"steps": 250, "batch_size": 8, "warmup": 0.01},
                                parallel={"nproc": 2}))
    assert r.train.warmup == 13  # ceil(2.5), floored at min(20, ceil(5% of 250)) for a short run
    assert r.train.micro_batch_size == 4


def test_resolving_twice_changes_nothing():
    once = resolve_run_config(_cfg(model={"preset": "moe-tiny"}, train={"tokens": "2xN"}))
    twice = resolve_run_config(once)
    assert twice.model_dump() == once.model_dump()


@pytest.mark.parametrize("train, parallel, needle", [
    ({"micro_batch_size": 3, "batch_size": 8, "steps": 1}, {}, "train.micro_batch_size"),
    ({"batch_size": 5, "steps": 1}, {"nproc": 2}, "train.batch_size"),
    ({"seq_len": 4096, "steps": 1}, {}, "train.seq_len"),
    ({"tokens": "lots"}, {}, "train.tokens"),
])
def test_errors_name_the_file_and_field(train, parallel, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        resolve_run_config(_cfg(train=train, parallel=parallel), "my_run.yaml")
    assert "my_run.yaml" in str(info.value)


def test_unknown_model_key_is_named():
    with pytest.raises(ConfigError, match="top_mm") as info:
        resolve_run_config(_cfg(model={"preset": "ultramem-tiny", "memory.top_mm": 8}), "my_run.yaml")
    assert "my_run.yaml" in str(info.value)


def test_model_vocab_below_the_tokenizer_is_refused():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        resolve_run_config(_cfg(model={"preset": "dense-tiny", "vocab_size": 100}))


def test_resolve_imports_no_torch():
    code = ("import sys\n"
            "from experiments.config import run_config_from_dict\n"
            "from experiments.resolve import resolve_run_config\n"
            "resolve_run_config(run_config_from_dict({'model': {'preset': 'ultramem-151m-x12'}}))\n"
            "assert 'torch' not in sys.modules, 'resolve imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
