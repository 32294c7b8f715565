"""kill -9 in the middle of a run, then the same command again: the final state is bitwise the uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from experiments.config import run_config_from_dict
from experiments.resolve import resolve_run_config
from runfolder import RunDir

STEPS, CKPT_EVERY = 40, 10


def _prepare(run_dir, shakespeare_path, cache, preset, value_updates="dense"):
    cfg = run_config_from_dict({
        "model": {"preset": preset},
        "data": {"source": str(shakespeare_path), "cache_dir": str(cache)},
        "train": {"steps": STEPS, "batch_size": 4, "seq_len": 32, "log_every": 5, "eval_every": 20,
                  "eval_batches": 2, "ckpt_every": CKPT_EVERY, "threads": 1, "knowledge_probe": False,
                  "value_updates": value_updates},
    }, "test")
    rd = RunDir(run_dir)
    rd.write_config(resolve_run_config(cfg).model_dump(mode="json"))
    return rd


def _run_one(rd: RunDir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.run_one", str(rd.path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _final_params(rd: RunDir) -> dict[str, torch.Tensor]:
    return torch.load(rd.checkpoint_path(STEPS), map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
# memory buffers, value tables and Tucker refresh included; rows_read: RowSparseAdamW's state in the checkpoint
@pytest.mark.parametrize("preset,value_updates", [("ultramem-t1-x6", "dense"), ("ultramem-t1-x6", "rows_read")])
def test_kill_9_then_rerun_reaches_the_uninterrupted_final_state(tmp_path, shakespeare_path, preset, value_updates):
    cache = tmp_path / "cache"
    ref = _prepare(tmp_path / "ref", shakespeare_path, cache, preset, value_updates)
    assert _run_one(ref).wait(timeout=900) == 0

    rd = _prepare(tmp_path / "killed", shakespeare_path, cache, preset, value_updates)
    proc = _run_one(rd)
    deadline = time.time() + 600
    while not rd.checkpoints() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = int(rd.checkpoints()[-1].stem.split("_")[1])
    assert killed_at < STEPS and rd.final() is None, "the kill should land mid-run"
    assert rd.status()["state"] == "running"  # a SIGKILLed process leaves no terminal state behind

    rerun = _run_one(rd)
    assert rerun.wait(timeout=900) == 0, rerun.stderr.read().decode()

    want, got = ref.final(), rd.final()
    for key in ("train_loss", "val_loss", "tokens", "flops", "steps", "params", "lr"):
        assert got[key] == want[key], key
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in rd.metrics()] == \
           [(r["step"], r.get("loss"), r.get("val_loss")) for r in ref.metrics()]
    a, b = _final_params(ref), _final_params(rd)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
