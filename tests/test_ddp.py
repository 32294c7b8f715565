"""DDP under torchrun on CPU (gloo, 2 processes) trains the same run as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from experiments.config import run_config_from_dict
from experiments.resolve import resolve_run_config
from runfolder import RunDir


def _prepare(run_dir, shakespeare_path, cache, preset, nproc):
    # The single process accumulates two micro-batches of 2, the same partition as 2 processes x 2 sequences: the
    # MoE balance loss is computed per micro-batch, so the micro-batch size is part of the objective.
    cfg = run_config_from_dict({
        "model": {"preset": preset},
        "data": {"source": str(shakespeare_path), "cache_dir": str(cache)},
        "train": {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "seq_len": 32, "log_every": 1,
                  "eval_every": 4, "eval_batches": 2, "ckpt_every": 4, "threads": 1, "knowledge_probe": False},
        "parallel": {"nproc": nproc},
    }, "test")
    rd = RunDir(run_dir)
    rd.write_config(resolve_run_config(cfg).model_dump(mode="json"))
    return rd


def _launch(rd: RunDir, nproc: int) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (prefix if nproc > 1 else [sys.executable]) + ["-m", "experiments.run_one", str(rd.path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("preset", ["moe-t1-2in12", "ultramem-t1-x6", "memory_plus-t1-x6", "ultramem_v2-t1-x6"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, shakespeare_path, preset):
    cache = tmp_path / "cache"
    single = _prepare(tmp_path / "single", shakespeare_path, cache, preset, nproc=1)
    ddp = _prepare(tmp_path / "ddp", shakespeare_path, cache, preset, nproc=2)

    one = _launch(single, 1)
    assert one.returncode == 0, one.stderr
    two = _launch(ddp, 2)
    assert two.returncode == 0, two.stderr

    def curve(rd, kind, key):
        return [(r["step"], r[key]) for r in rd.metrics() if r["kind"] == kind]

    ref, got = curve(single, "train", "loss"), curve(ddp, "train", "loss")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in ref], rel=1e-4)
    assert [v for _, v in curve(ddp, "train", "grad_norm")] == \
           pytest.approx([v for _, v in curve(single, "train", "grad_norm")], rel=1e-3)
    assert ddp.final()["val_loss"] == pytest.approx(single.final()["val_loss"], rel=1e-4)
    assert ddp.final()["tokens"] == single.final()["tokens"] == 4 * 4 * 32
    assert ddp.status()["state"] == "done"
