"""Nothing read from a run folder or a sweep file runs code (docs/run_folder.md "Security model"), and out-of-range
values are validation errors (issue 22, items 1, 2, 8, 10 and 14), through the real `ultramem` command.

The attack is a pickle that creates a file when it is unpickled: placed where a checkpoint is read (an outside
folder named by train.branch_of, a run folder's checkpoints/, a DCP folder's .metadata or extras), it must be
refused with one line naming the file or field and the fix, and the file must not appear.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import interrupted_after

from experiments import checkpoint
from experiments.config import ParallelConfig
from experiments.distributed import Parallel, save_sharded
from runfolder import RunDir

ULTRAMEM = str(Path(sys.executable).parent / "ultramem")


class Payload:
    """Unpickling this calls open(path, 'w'): the file appears only if the loader runs code from the pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _ultramem(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != checkpoint.TRUST_ENV}
    full.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([ULTRAMEM, *args], capture_output=True, text=True, timeout=timeout, env=full)


def _one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The refusal: exit 2, no traceback, exactly one `error:` line, naming every word."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def _plant(path: Path, marker: Path, step: int = 0) -> None:
    """A checkpoint-shaped file holding the payload, with a checksum that matches (an attacker writes both)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": checkpoint.FORMAT_VERSION, "step": step, "model": {}, "x": Payload(marker)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    checkpoint.checksum_path(path).write_text(f"{digest}  {path.name}\n")


def test_the_payload_is_live(tmp_path):
    """The attack of this file works against an unsafe load (so each test below can fail)."""
    marker = tmp_path / "pwned"
    _plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


# ---- item 1: train.branch_of is a run id, a sibling folder, never a path --------------------------------------


def _evil_trunk(folder: Path, marker: Path) -> None:
    """An outside folder shaped like a trunk: a planted branch point at every step a tiny branch could start."""
    for step in range(0, 12):
        _plant(folder / "branch_points" / f"step_{step:08d}.pt", marker, step)


def _branch_args(shakespeare_path: Path, tmp_path: Path, out: Path, branch_of: str) -> list[str]:
    return ["train", "--preset", "dense-t1", "--data", str(shakespeare_path), "--steps", "4", "--out", str(out),
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.batch_size=4",
            "--set", "train.seq_len=32", "--set", "train.schedule=wsd", "--set", "train.threads=1",
            "--set", "train.knowledge_probe=false", "--set", "train.eval_batches=1",
            "--set", f"train.branch_of={branch_of}"]


@pytest.mark.parametrize("branch_of", ["ABS", "../evil", "../../evil", "dense-0123456789/../../evil", "..", ".",
                                       "evil", "dense-0123456789/x", "DENSE-0123456789", "dense-01234567"])
def test_branch_of_must_be_a_run_id(tmp_path, shakespeare_path, branch_of):
    marker = tmp_path / "pwned"
    _evil_trunk(tmp_path / "evil", marker)
    _evil_trunk(tmp_path / "sweep" / "evil", marker)
    out = tmp_path / "sweep" / "sub" / "branch"
    value = str(tmp_path / "evil") if branch_of == "ABS" else branch_of
    proc = _ultramem(*_branch_args(shakespeare_path, tmp_path, out, value))
    _one_error_line(proc, "train.branch_of", "run id", "not a path")
    assert not marker.exists()
    assert not out.exists()  # refused before anything is written


def test_a_trunk_that_links_out_of_the_sweep_folder_is_refused(tmp_path, shakespeare_path):
    marker = tmp_path / "pwned"
    _evil_trunk(tmp_path / "evil", marker)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "dense-0123456789").symlink_to(tmp_path / "evil")
    proc = _ultramem(*_branch_args(shakespeare_path, tmp_path, tmp_path / "sweep" / "branch", "dense-0123456789"))
    _one_error_line(proc, "train.branch_of", "leads out of")
    assert not marker.exists()


def test_a_planted_branch_point_in_a_real_sibling_is_refused_too(tmp_path, shakespeare_path):
    """A run id that is a sibling folder: the path is fine, the pickle in it is refused by the safe load."""
    marker = tmp_path / "pwned"
    _evil_trunk(tmp_path / "sweep" / "dense-0123456789", marker)
    proc = _ultramem(*_branch_args(shakespeare_path, tmp_path, tmp_path / "sweep" / "branch", "dense-0123456789"))
    _one_error_line(proc, "refused", "branch_points", checkpoint.TRUST_ENV)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["plan", "run"])
def test_branch_of_in_a_sweep_base_is_refused(tmp_path, command):
    marker = tmp_path / "pwned"
    _evil_trunk(tmp_path / "evil", marker)
    out = tmp_path / "runs"
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: s\noutput_dir: {out}\n"
                     "base: {data: {source: embedded}, train: {steps: 2, schedule: wsd, branch_of: ../../../evil}}\n"
                     "parameters:\n  model.preset: {values: [dense-t1]}\n")
    args = ["sweep", command, str(sweep)] + (["--backend", "local"] if command == "run" else [])
    _one_error_line(_ultramem(*args), "s.yaml", "train.branch_of", "not a path")
    assert not marker.exists() and not out.exists()


# ---- item 2: checkpoints hold tensors and plain values, and are read with weights_only=True ------------------


def _run_args(shakespeare_path: Path, tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "dense-t1", "--data", str(shakespeare_path), "--steps", "4", "--out", str(out),
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.batch_size=4",
            "--set", "train.seq_len=32", "--set", "train.ckpt_every=2", "--set", "train.keep_checkpoints=4",
            "--set", "train.log_every=2", "--set", "train.eval_every=2", "--set", "train.eval_batches=1",
            "--set", "train.knowledge_probe=false", *extra]




@pytest.fixture(scope="module")
def reference(tmp_path_factory, shakespeare_path):
    """An uninterrupted CLI run (1 thread) whose every checkpoint must load with weights_only=True."""
    tmp = tmp_path_factory.mktemp("ref")
    rd = RunDir(tmp / "run")
    proc = _ultramem(*_run_args(shakespeare_path, tmp, rd.path, "--set", "train.threads=1"))
    assert proc.returncode == 0, proc.stderr
    return rd


def test_every_checkpoint_of_a_run_loads_with_weights_only(reference):
    paths = reference.checkpoints()
    assert [p.name for p in paths] == [f"step_0000000{s}.pt" for s in (2, 4)]
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)  # raises on any Python object
        assert state["step"] == int(path.stem.split("_")[1])
        assert state["threads"] == 1
        assert isinstance(state["rng"][0]["numpy"]["keys"], torch.Tensor)


def test_a_sharded_checkpoint_loads_without_unpickling_objects(tmp_path):
    """A DCP folder of the trainer: its `.metadata` builds only DCP's records (no callables beyond them), and its
    extras come back through weights_only=True, RNG states included."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    rng = [checkpoint.rng_state(torch.device("cpu"))]
    rd = RunDir(tmp_path / "run")
    save_sharded(rd, 2, model, opt, {"rng": rng, "window": [(2, {"loss": 1.5})]}, keep=2, rank=0, world_size=1)
    fresh = torch.nn.Linear(8, 8)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    extras = Parallel(ParallelConfig().layout(1), torch.device("cpu")).load_latest(rd, fresh, fresh_opt)
    assert extras["step"] == 2 and extras["window"] == [(2, {"loss": 1.5})]
    assert torch.equal(extras["rng"][0]["numpy"]["keys"], rng[0]["numpy"]["keys"])
    assert torch.equal(fresh.weight, model.weight)


def _planted_resume(reference: RunDir, tmp_path: Path, marker: Path, with_checksum: bool) -> RunDir:
    rd = RunDir(tmp_path / "run")
    subprocess.run(["cp", "-a", str(reference.path), str(rd.path)], check=True)
    interrupted_after(rd, 2)
    _plant(rd.checkpoint_path(2), marker, 2)
    if not with_checksum:  # as a checkpoint written before checksums existed
        checkpoint.checksum_path(rd.checkpoint_path(2)).unlink()
    return rd


@pytest.mark.parametrize("with_checksum", [True, False])
def test_a_checkpoint_holding_an_object_is_refused(tmp_path, shakespeare_path, reference, with_checksum):
    marker = tmp_path / "pwned"
    rd = _planted_resume(reference, tmp_path, marker, with_checksum)
    proc = _ultramem(*_run_args(shakespeare_path, reference.path.parent, rd.path, "--set", "train.threads=1"))
    _one_error_line(proc, str(rd.checkpoint_path(2)), "refused", "weights_only=True", checkpoint.TRUST_ENV)
    assert not marker.exists()
    assert rd.checkpoint_path(2).exists() and not list(rd.ckpt_dir.glob("*.corrupt"))  # not mistaken for damage
    assert rd.status()["state"] == "failed" and "refused" in rd.status()["error"]


def _old_format(path: Path) -> None:
    """Rewrite a checkpoint as the trainer wrote it before safe loading: Python's RNG state as a tuple, NumPy's as
    its get_state tuple (an ndarray), checksum updated."""
    state = torch.load(path, weights_only=True)
    for r in state["rng"]:
        version, internal, gauss = r["python"]
        n = r["numpy"]
        r["python"] = (version, tuple(internal), gauss)
        r["numpy"] = ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    del state["threads"]
    torch.save(state, path)
    checkpoint.checksum_path(path).write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")


def test_an_older_checkpoint_needs_the_opt_in_and_then_resumes_bitwise(tmp_path, shakespeare_path, reference):
    rd = RunDir(tmp_path / "run")
    subprocess.run(["cp", "-a", str(reference.path), str(rd.path)], check=True)
    interrupted_after(rd, 2)
    _old_format(rd.checkpoint_path(2))
    args = _run_args(shakespeare_path, reference.path.parent, rd.path, "--set", "train.threads=1")

    _one_error_line(_ultramem(*args), "numpy", f"{checkpoint.TRUST_ENV}=1")
    proc = _ultramem(*args, env={checkpoint.TRUST_ENV: "1"})

    assert proc.returncode == 0, proc.stderr
    assert f"because {checkpoint.TRUST_ENV}=1" in proc.stderr
    assert rd.status()["resumed_from"] == 2
    want = torch.load(reference.checkpoint_path(4), weights_only=True)["model"]
    got = torch.load(rd.checkpoint_path(4), weights_only=True)["model"]  # written in the safe format again
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _sharded(tmp_path: Path, extras: dict) -> tuple[RunDir, torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    rd = RunDir(tmp_path / "run")
    save_sharded(rd, 2, model, opt, extras, keep=2, rank=0, world_size=1)
    return rd, model, opt


def test_a_sharded_checkpoint_with_planted_metadata_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    rd, model, opt = _sharded(tmp_path, {})
    folder = checkpoint.sharded_path(rd, 2)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    checkpoint.write_sharded_checksums(folder)  # the attacker rewrites the checksums too
    par = Parallel(ParallelConfig().layout(1), torch.device("cpu"))
    with pytest.raises(checkpoint.UnsafeCheckpoint, match=r"\.metadata: refused: (builtins|io)\.open"):
        par.load_latest(rd, model, opt)
    assert not marker.exists() and folder.is_dir()


def test_sharded_extras_holding_an_object_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    rd, model, opt = _sharded(tmp_path, {"x": Payload(marker)})
    par = Parallel(ParallelConfig().layout(1), torch.device("cpu"))
    with pytest.raises(checkpoint.UnsafeCheckpoint, match=r"step_00000002\.dcp \(extras\): refused"):
        par.load_latest(rd, model, opt)
    assert not marker.exists()


def test_read_refuses_objects_in_any_stream(tmp_path):
    """checkpoint.read on a file object (DCP's byte entries) refuses as on a path; plain values load."""
    marker = tmp_path / "pwned"
    good, bad = io.BytesIO(), io.BytesIO()
    torch.save({"a": [1, (2.5, None)], "t": torch.arange(3)}, good)
    torch.save([Payload(marker)], bad)
    assert checkpoint.read(good, "good")["a"] == [1, (2.5, None)]
    with pytest.raises(checkpoint.UnsafeCheckpoint, match="bad: refused"):
        checkpoint.read(bad, "bad")
    assert not marker.exists()


# ---- items 8 and 10: out-of-range values and an empty preset are validation errors -----------------------------


@pytest.mark.parametrize(("setting", "field"), [
    ("seed=-1", "seed"), ("seed=4294967296", "seed"), ("train.threads=0", "train.threads"),
    ("train.threads=-2", "train.threads"), ("train.tokens=-5xN", "train.tokens"), ("train.tokens=0", "train.tokens"),
    ("train.tokens='-1e6'", "train.tokens"), ("train.tokens=.inf", "train.tokens"),
    ("train.steps=0", "train.steps"), ("train.batch_size=-4", "train.batch_size"), ("train.lr=0", "train.lr"),
    ("train.micro_batch_size=0", "train.micro_batch_size"), ("data.vocab_size=0", "data.vocab_size"),
    ("train.branches=[0xN]", "train.branches"),
])
def test_out_of_range_values_are_one_line_errors(tmp_path, setting, field):
    out = tmp_path / "run"
    proc = _ultramem("train", "--preset", "dense-t1", "--steps", "2", "--out", str(out), "--set", setting)
    _one_error_line(proc, "command line", f"{field}:")
    assert not out.exists()


def test_a_negative_seed_in_a_sweep_is_refused_at_plan(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: s\noutput_dir: {tmp_path / 'runs'}\nbase: {{data: {{source: embedded}}}}\n"
                     "seeds: [0, -1]\nparameters:\n  model.preset: {values: [dense-t1]}\n")
    _one_error_line(_ultramem("sweep", "plan", str(sweep)), "s.yaml", "seed:", "greater than or equal to 0")


@pytest.mark.parametrize("preset", ["''", "null", "'  '"])
def test_an_empty_preset_is_refused_by_train(tmp_path, preset):
    out, cfg = tmp_path / "run", tmp_path / "run.yaml"
    cfg.write_text(f"model: {{preset: {preset}}}\ndata: {{source: embedded}}\ntrain: {{steps: 2}}\n")
    _one_error_line(_ultramem("train", str(cfg), "--out", str(out)), "run.yaml", "model:", "'preset' is empty",
                    "family")
    cfg.write_text("model: {preset: dense-t1}\ndata: {source: embedded}\ntrain: {steps: 2}\n")
    _one_error_line(_ultramem("train", str(cfg), "--out", str(out), "--set", f"model.preset={preset}"),
                    "run.yaml", "model:", "'preset' is empty", "family")
    assert not out.exists()


@pytest.mark.parametrize("model", ["parameters:\n  model.preset: {values: ['']}\n",
                                   "parameters:\n  model.preset: {values: [null]}\n",
                                   "presets:\n  mine: {n_layers: 2}\nparameters:\n  model.preset: {values: [mine]}\n"])
def test_an_empty_preset_is_refused_in_a_sweep_like_a_local_preset_without_one(tmp_path, model):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: s\noutput_dir: {tmp_path / 'runs'}\nbase: {{data: {{source: embedded}}}}\n{model}")
    line = _one_error_line(_ultramem("sweep", "plan", str(sweep)), "s.yaml", "model:", "preset", "family")
    assert "ultramem models" in line


# ---- item 14: the thread count is recorded, and a resume with another one warns --------------------------------


def test_a_resume_with_another_thread_count_warns_and_is_recorded(tmp_path, shakespeare_path, reference):
    rd = RunDir(tmp_path / "run")
    subprocess.run(["cp", "-a", str(reference.path), str(rd.path)], check=True)
    assert reference.status()["threads"] == 1
    interrupted_after(rd, 2)

    proc = _ultramem(*_run_args(shakespeare_path, reference.path.parent, rd.path, "--set", "train.threads=2"))

    assert proc.returncode == 0, proc.stderr
    assert "computed with 1 torch threads, this process has 2" in proc.stderr
    assert "train.threads: 1" in proc.stderr
    assert rd.status()["threads"] == 2 and rd.status()["resumed_from"] == 2
    assert json.loads((rd.path / "final.json").read_text())["run_id"] == reference.final()["run_id"]
