"""`ultramem train` from the command line: the quick form trains dense, MoE and UltraMem on tinyshakespeare well
below the text's unigram entropy; config errors name the key and the file."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ULTRAMEM = str(Path(sys.executable).parent / "ultramem")


def unigram_entropy_nats(path: Path) -> float:
    """Entropy of the byte distribution of the file: the loss of the best model that ignores context."""
    counts = collections.Counter(path.read_bytes())
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def _ultramem(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([ULTRAMEM, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dense-t1", "moe-t1-2in12", "ultramem-t1-x6"])
def test_quick_form_trains_well_below_the_unigram_entropy(tmp_path, shakespeare_path, preset):
    out = tmp_path / "run"
    proc = _ultramem("train", "--preset", preset, "--data", str(shakespeare_path), "--steps", "300",
                     "--out", str(out), "--set", f"data.cache_dir={tmp_path / 'cache'}",
                     "--set", "train.batch_size=8", "--set", "train.seq_len=64", "--set", "train.threads=1",
                     "--set", "train.eval_every=300", "--set", "train.eval_batches=4")
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "final.json").read_text())
    for key in ("val_loss", "train_loss", "tokens", "active_params"):
        assert final[key] is not None, key
    assert final["tokens"] == 300 * 8 * 64
    entropy = unigram_entropy_nats(shakespeare_path)  # 3.31 nats for tinyshakespeare
    assert final["val_loss"] < 0.8 * entropy, (final["val_loss"], entropy)
    assert final["train_loss"] < 0.8 * entropy
    assert json.loads(proc.stdout.strip().splitlines()[-1])["val_loss"] == final["val_loss"]


def test_unknown_keys_are_errors_naming_the_key_and_the_file(tmp_path):
    cfg = tmp_path / "my_run.yaml"
    cfg.write_text("model: {preset: dense-t1}\ntrain: {lrr: 0.001}\n")
    proc = _ultramem("train", str(cfg), "--out", str(tmp_path / "run"), timeout=300)
    assert proc.returncode == 2
    assert "lrr" in proc.stderr and "my_run.yaml" in proc.stderr and "unknown key" in proc.stderr

    proc = _ultramem("train", str(cfg), "--set", "train.lrr=1", "--set", "model.memory.top_mm=3", timeout=300)
    assert proc.returncode == 2 and "lrr" in proc.stderr

    cfg.write_text("model: {preset: ultramem-t1-x6, memory: {top_mm: 3}}\n")
    proc = _ultramem("train", str(cfg), "--out", str(tmp_path / "run"), timeout=300)
    assert proc.returncode == 2
    assert "top_mm" in proc.stderr and "my_run.yaml" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing is created for a config that does not resolve
