"""Bad inputs a user must act on: values that validate but cannot train, duplicate YAML keys, data files that
cannot be read or are too small, an unwritable --out, a full disk. Each is refused with exit code 2 (a sweep does
not retry it) and one message naming the file, the field and the fix; a full disk is named in status.json."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from cli.main import main
from experiments.config import load_yaml, parse_set, run_config_from_dict
from experiments.trainer import train
from runfolder import RunDir
from ultramem.config import ConfigError, deep_merge

ULTRAMEM = str(Path(sys.executable).parent / "ultramem")


def _train_cli(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["train", *args])
    return rc, capsys.readouterr().err


# ---- values that validate but cannot train ---------------------------------------------------------------------


@pytest.mark.parametrize("snippet, field", [
    ("train: {lr: .nan}", "train.lr"),
    ("train: {lr: -1}", "train.lr"),
    ("train: {lr: 0}", "train.lr"),
    ("train: {lr: .inf}", "train.lr"),
    ("train: {steps: true}", "train.steps"),
    ("train: {batch_size: true}", "train.batch_size"),
    ("train: {warmup: .nan}", "train.warmup"),
    ("train: {warmup: .inf}", "train.warmup"),
    ("train: {weight_decay: .nan}", "train.weight_decay"),
    ("train: {grad_clip: -1}", "train.grad_clip"),
    ("train: {min_lr_ratio: .nan}", "train.min_lr_ratio"),
    ("train: {eps: 0}", "train.eps"),
    ("train: {beta2: 1.5}", "train.beta2"),
    ("train: {tokens: .nan}", "train.tokens"),
    ("train: {tokens: -5}", "train.tokens"),
    ("seed: true", "seed"),
    ("parallel: {nproc: true}", "parallel.nproc"),
])
def test_values_that_cannot_train_are_refused_at_validation(tmp_path, capsys, snippet, field):
    base = {"model": {"preset": "dense-t1"}, "data": {"cache_dir": str(tmp_path / "cache")},
            "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "knowledge_probe": False}}
    cfg = tmp_path / "my_run.yaml"
    cfg.write_text(yaml.safe_dump(deep_merge(base, yaml.safe_load(snippet))))
    rc, err = _train_cli(capsys, str(cfg), "--out", str(tmp_path / "run"))
    assert rc == 2, err
    assert "my_run.yaml" in err and field in err, err
    assert not (tmp_path / "run").exists()


def test_a_boolean_step_count_exits_2_from_the_real_command(tmp_path):
    cfg = tmp_path / "my_run.yaml"
    cfg.write_text("model: {preset: dense-t1}\ntrain: {steps: true, lr: .nan}\n")
    proc = subprocess.run([ULTRAMEM, "train", str(cfg), "--out", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "train.steps" in proc.stderr and "boolean" in proc.stderr and "train.lr" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_good_values_still_validate():
    cfg = run_config_from_dict({"train": {"steps": 10, "lr": 3e-4, "warmup": 0, "grad_clip": 0, "tokens": "20xN",
                                          "batch_size": "auto", "compile": True}, "seed": 3})
    assert (cfg.train.steps, cfg.train.lr, cfg.train.compile, cfg.seed) == (10, 3e-4, True, 3)


# ---- duplicate YAML keys -----------------------------------------------------------------------------------------


def test_duplicate_yaml_keys_are_refused_naming_both_lines(tmp_path, capsys):
    cfg = tmp_path / "my_run.yaml"
    cfg.write_text("model: {preset: dense-t1}\ntrain:\n  lr: 0.001\n  steps: 10\n  lr: 0.01\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(cfg)
    msg = str(info.value)
    assert "my_run.yaml" in msg and "'lr'" in msg and "line 3" in msg and "line 5" in msg, msg

    rc, err = _train_cli(capsys, str(cfg), "--out", str(tmp_path / "run"))
    assert rc == 2 and "'lr'" in err and "line 3" in err and "line 5" in err

    cfg.write_text("model: {preset: dense-t1}\nmodel: {preset: dense-t3}\n")
    with pytest.raises(ConfigError, match=r"'model' is given twice, at line 1 and at line 2"):
        load_yaml(cfg)
    with pytest.raises(ConfigError, match="given twice"):
        parse_set(["train={lr: 1, lr: 2}"])


def test_merge_keys_may_still_be_overridden(tmp_path):
    cfg = tmp_path / "my_run.yaml"
    cfg.write_text("defaults: &d {lr: 0.001, steps: 10}\ntrain:\n  <<: *d\n  lr: 0.01\n")
    assert load_yaml(cfg)["train"] == {"lr": 0.01, "steps": 10}


# ---- data files ----------------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind, content, needle", [
    ("empty", b"", "is empty"),
    ("random bytes", bytes(range(128, 256)) * 64, "is not UTF-8 text"),
    ("blank lines", b"\n\n   \n\t\n", "has no text lines"),
])
def test_an_unusable_text_file_is_named_with_the_fix(tmp_path, capsys, kind, content, needle):
    data = _write(tmp_path / "corpus.txt", content)
    rc, err = _train_cli(capsys, "--preset", "dense-t1", "--data", str(data), "--steps", "2",
                         "--out", str(tmp_path / "run"), "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert rc == 2, err
    assert str(data) in err and needle in err, err
    assert "DatasetGenerationError" not in err


def test_a_data_file_too_small_for_one_validation_batch_exits_2(tmp_path, capsys):
    paragraphs = [f"Paragraph number {i} says a few words." for i in range(80)]
    data = _write(tmp_path / "small.txt", "\n\n".join(paragraphs).encode())
    rc, err = _train_cli(capsys, "--preset", "dense-t1", "--data", str(data), "--steps", "2",
                         "--out", str(tmp_path / "run"), "--set", f"data.cache_dir={tmp_path / 'cache'}",
                         "--set", "train.batch_size=8", "--set", "train.seq_len=64")
    assert rc == 2, err
    assert "'val' split" in err and str(data) in err and "train.seq_len" in err and "data.val_fraction" in err, err
    assert "Traceback" not in err


# ---- the run folder: unwritable, full ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["under a file", "/dev/null", "/proc"])
def test_an_unwritable_out_is_one_line_naming_the_path(tmp_path, capsys, where):
    if where == "under a file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "run"
    elif where == "/dev/null":
        out = Path("/dev/null")
    else:
        out = Path(f"/proc/ultramem-{uuid.uuid4().hex[:8]}")
    rc, err = _train_cli(capsys, "--preset", "dense-t1", "--data", "embedded", "--steps", "1", "--out", str(out))
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out ") and str(out) in lines[0], err
    assert "writable" in lines[0]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 512 KiB tmpfs (root and mount permission needed): smaller than one dense-t1 checkpoint."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_named_in_status_json(small_tmpfs, tmp_path, shakespeare_path):
    cfg = run_config_from_dict({
        "model": {"preset": "dense-t1"},
        "data": {"source": str(shakespeare_path), "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 4, "batch_size": 4, "seq_len": 32, "log_every": 2, "eval_every": 2, "eval_batches": 1,
                  "ckpt_every": 2, "threads": 1, "knowledge_probe": False},
    }, "test")
    rd = RunDir(small_tmpfs / "run")
    with pytest.raises(Exception):  # noqa: B017 (torch reports the failed write as it likes)
        train(cfg, rd.path)
    status = rd.status()
    assert status["state"] == "failed"
    error = status["error"]
    assert error.startswith("No space left on device while writing "), error
    assert str(rd.checkpoint_path(2)) in error and "free space or move --out" in error, error
