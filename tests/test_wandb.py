"""W&B mirror: offline mode writes a real run directory inside the run folder; a W&B failure never stops training."""

from __future__ import annotations

import time

import pytest

from experiments.config import run_config_from_dict
from experiments.tracking import flatten
from experiments.trainer import train
from runfolder import RunDir


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


def run_cfg(shakespeare_path, cache, wandb):
    return run_config_from_dict({
        "sweep": "wandb-test-sweep",
        "model": {"preset": "dense-t1"},
        "data": {"source": str(shakespeare_path), "cache_dir": str(cache)},
        "train": {"steps": 2, "batch_size": 4, "seq_len": 32, "log_every": 1, "eval_every": 2, "eval_batches": 1,
                  "threads": 1, "knowledge_probe": False},
        "wandb": wandb,
    }, "test")


def test_offline_mode_writes_a_real_run_directory_in_the_run_folder(tmp_path, shakespeare_path, cache,
                                                                     monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config's mode applies when the variable is unset
    final = train(run_cfg(shakespeare_path, cache, {"mode": "offline", "project": "um-test"}), tmp_path / "run")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = runs[0]
    assert run.name.endswith(final["run_id"])  # the W&B id is the run id, so a resumed attempt continues it
    needles = (b"n_params_active", b"flops_per_token", b"wandb-test-sweep", b"dense", b"val_loss")
    # wandb-core writes the offline log asynchronously: run.finish() can return before the writer has flushed
    deadline = time.monotonic() + 60
    while True:
        data = (run / f"run-{final['run_id']}.wandb").read_bytes()
        missing = [n for n in needles if n not in data]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing, missing


def test_wandb_mode_environment_variable_overrides_the_config(tmp_path, shakespeare_path, cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    train(run_cfg(shakespeare_path, cache, {"mode": "offline"}), tmp_path / "run")
    assert not (tmp_path / "run" / "wandb").exists()


def test_a_failing_wandb_init_does_not_stop_training(tmp_path, shakespeare_path, cache, monkeypatch, capfd):
    # online mode with no API key anywhere: wandb.init raises (a real failure, not a simulated one)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    final = train(run_cfg(shakespeare_path, cache, {"mode": "online"}), tmp_path / "run")
    assert RunDir(tmp_path / "run").status()["state"] == "done"
    assert final["val_loss"] is not None
    assert "W&B init failed" in capfd.readouterr().err


def test_flatten_nests_with_slashes_and_drops_none():
    assert flatten({"loss": 1.0, "mfu": None, "aux": {"moe_z": 2.0, "x": {"y": 3}}}) == \
        {"loss": 1.0, "aux/moe_z": 2.0, "aux/x/y": 3}
