"""Faults a user meets through the `ultramem` command (issue 22, items 3-7, 9, 11-13), each through the real
command in a subprocess: the documented exit code, one `error:` line on stderr naming the file or field and the
fix, no traceback, nothing written where it should not be, nothing lost. docs/run_folder.md lists each fault."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments.config import run_config_from_dict, run_id
from experiments.resolve import resolve_run_config
from experiments.trainer import train
from runfolder import RunDir

ULTRAMEM = str(Path(sys.executable).parent / "ultramem")
TINY_TRAIN = {"steps": 2, "batch_size": 2, "seq_len": 16, "log_every": 1, "eval_every": 2, "eval_batches": 1,
              "ckpt_every": 2, "threads": 1, "knowledge_probe": False}


def _cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_ADDRESS": ""}
    return subprocess.run([ULTRAMEM, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


def _error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The single `error:` line of a refused command (asserting its exit code, no traceback, the needles)."""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _only_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """As _error_line, and the error is all that stderr holds (a refusal before anything started)."""
    line = _error_line(proc, code, *needles)
    assert proc.stderr.strip() == line, proc.stderr
    return line


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount(options) -> a fresh real tmpfs (root and mount permission needed), unmounted at the end."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> None:
    """Write until the disk refuses (ENOSPC): a full filesystem, for real."""
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == 28, err  # ENOSPC
    finally:
        os.close(fd)
    fd = os.open(mnt / "probe", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError):
            os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
        os.unlink(mnt / "probe")


def _run_yaml(tmp_path: Path, shakespeare_path: Path, name: str = "run.yaml", **train: object) -> Path:
    cfg = {"model": {"preset": "dense-t1"},
           "data": {"source": str(shakespeare_path), "cache_dir": str(tmp_path / "cache")},
           "train": {**TINY_TRAIN, **train}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sweep(tmp_path: Path, output_dir: str | Path, data: dict, train: dict | None = None,
           presets: tuple[str, ...] = ("dense-t1",), name: str = "faults") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "method": "grid", "output_dir": str(output_dir),
        "base": {"data": {"cache_dir": str(tmp_path / "cache"), **data}, "train": {**TINY_TRAIN, **(train or {})}},
        "parameters": {"model.preset": {"values": list(presets)}}, "seeds": [0],
        "resources": {"default": {"cpus": 1, "memory_gb": 1}}, "wandb": {"mode": "disabled"},
    }))
    return path


# ---- 7: a run or sweep file that is not UTF-8, or a folder ---------------------------------------------------------


@pytest.mark.parametrize("command", [("sweep", "plan"), ("sweep", "run"), ("sweep", "status"), ("train",),
                                     ("plots",)])
@pytest.mark.parametrize("kind", ["random bytes", "a folder"])
def test_a_file_that_is_not_utf8_yaml_or_is_a_folder_is_one_line(tmp_path, command, kind):
    path = tmp_path / "x.yaml"
    if kind == "a folder":
        path.mkdir()
    else:
        path.write_bytes(bytes([0xC3, 0x28]) + os.urandom(498))  # an invalid UTF-8 sequence first, then noise
    before = _tree(tmp_path)
    proc = _cli(*command, path, cwd=tmp_path)
    _only_error(proc, 2, str(path), "folder" if kind == "a folder" else "UTF-8")
    assert _tree(tmp_path) == before  # no runs/ folder, no report


# ---- 3: a run folder whose config.yaml is garbage ------------------------------------------------------------------

BAD_CONFIGS = {"random bytes": bytes([0xFF, 0xFE, 0x00, 0x81]) * 64, "a list": b"[1, 2]\n",
               "model: 5": b"model: 5\n"}


def _finished(root: Path, rid: str, family: str, active: float, val_loss: float) -> RunDir:
    """A finished run folder as the trainer leaves it (records written by hand from docs/run_folder.md)."""
    rd = RunDir(root / rid)
    rd.path.mkdir(parents=True)
    (rd.path / "config.yaml").write_text(yaml.safe_dump({"model": {"family": family, "n_layers": 2,
                                                                   "d_model": 32}}))
    (rd.path / "run.json").write_text(json.dumps({"schema": 1, "run_id": rid, "created_at": 1.0}))
    (rd.path / "status.json").write_text(json.dumps({"schema": 1, "state": "done", "attempts": 1}))
    tokens = int(20 * active)
    final = {"schema": 1, "run_id": rid, "name": rid, "sweep": "faults", "family": family, "preset": None,
             "seed": 0, "train_loss": val_loss, "val_loss": val_loss,
             "params": {"total": int(active), "active": int(active), "embedding": 0, "non_embedding": int(active),
                        "active_non_embedding": int(active), "sparse": 0},
             "total_params": int(active), "active_params": int(active), "non_embedding_params": int(active),
             "flops_per_token": 6 * active, "tokens": tokens, "flops": 6 * active * tokens, "steps": 10,
             "batch_size": 2, "seq_len": 16, "lr": 1e-3}
    (rd.path / "final.json").write_text(json.dumps(final))
    return rd


def test_plots_lists_run_folders_with_an_unreadable_config_and_goes_on(tmp_path):
    runs = tmp_path / "runs"
    good = [_finished(runs, f"good{i}", "dense", 1e4 * 2**i, 3.0 - 0.2 * i) for i in range(3)]
    bad = {}
    for i, (kind, content) in enumerate(BAD_CONFIGS.items()):
        rd = _finished(runs, f"bad{i}", "dense", 5e4, 2.5)
        rd.config_path.write_bytes(content)
        bad[rd.run_id] = kind
    proc = _cli("plots", runs, "--out", tmp_path / "report", "--bootstrap", "10")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    listed = report.split("Not included (not finished or unreadable): ", 1)[1].split("\n", 1)[0]
    for rid in bad:
        assert f"{rid} (unreadable: {runs / rid / 'config.yaml'}" in listed, listed
    ids = (tmp_path / "report" / "runs.csv").read_text().splitlines()
    assert sorted(line.split(",")[0] for line in ids[1:]) == [rd.run_id for rd in good]


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_train_into_a_folder_with_an_unreadable_config_says_what_to_do_and_writes_nothing(tmp_path,
                                                                                         shakespeare_path, kind):
    cfg = _run_yaml(tmp_path, shakespeare_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_bytes(BAD_CONFIGS[kind])
    proc = _cli("train", cfg, "--out", out)
    _only_error(proc, 2, str(out / "config.yaml"), "--force", "--out")
    assert _tree(out) == ["config.yaml"] and (out / "config.yaml").read_bytes() == BAD_CONFIGS[kind]


# ---- 13: refused before anything is written --------------------------------------------------------------------------


def test_a_foreign_out_folder_is_refused_without_leaving_a_lock(tmp_path, shakespeare_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    proc = _cli("train", _run_yaml(tmp_path, shakespeare_path), "--out", out)
    _only_error(proc, 2, str(out), "notes.txt", "--force")
    assert _tree(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes\n"


def test_a_dead_ray_address_is_refused_before_any_run_folder_is_written(tmp_path, shakespeare_path):
    runs = tmp_path / "runs"
    sweep = _sweep(tmp_path, runs, {"source": str(shakespeare_path)})
    proc = _cli("sweep", "run", sweep, "--address", "127.0.0.1:9", "--connect-timeout", "2", timeout=120)
    _only_error(proc, 2, "127.0.0.1:9", "--address")
    assert not runs.exists()


# ---- 6: an output_dir that cannot be written --------------------------------------------------------------------------


def test_an_output_dir_under_a_regular_file_is_one_line(tmp_path, shakespeare_path):
    (tmp_path / "afile").write_text("x")
    sweep = _sweep(tmp_path, tmp_path / "afile" / "runs", {"source": str(shakespeare_path)})
    proc = _cli("sweep", "run", sweep, "--backend", "local")
    _only_error(proc, 2, str(sweep), "output_dir", str(tmp_path / "afile" / "runs"), "writable")
    assert (tmp_path / "afile").read_text() == "x"


def test_a_read_only_output_dir_is_one_line(tmp_path, shakespeare_path, mount_tmpfs):
    """A read-only tmpfs mount: chmod does not stop root, a read-only filesystem does."""
    disk = mount_tmpfs("ro,size=64k")
    sweep = _sweep(tmp_path, disk / "runs", {"source": str(shakespeare_path)})
    proc = _cli("sweep", "run", sweep, "--backend", "local")
    _only_error(proc, 2, str(sweep), "output_dir", "Read-only file system")
    assert _tree(disk) == []


# ---- 4, 5: a full disk ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["new", "existing"])
def test_a_disk_full_at_start_is_one_line_and_leaves_no_lock(tmp_path, shakespeare_path, mount_tmpfs, folder):
    disk = mount_tmpfs("size=64k")
    out = disk / "run"
    if folder == "existing":
        out.mkdir()
    _fill(disk)
    proc = _cli("train", _run_yaml(tmp_path, shakespeare_path), "--out", out)
    _only_error(proc, 2, str(out), "No space left on device", "free space")
    assert _tree(disk) == (["filler", "run"] if folder == "existing" else ["filler"])


def test_a_disk_that_fills_mid_run_is_one_line_on_the_terminal(tmp_path, shakespeare_path, mount_tmpfs):
    disk = mount_tmpfs("size=512k")  # smaller than one dense-t1 checkpoint
    out = disk / "run"
    proc = _cli("train", _run_yaml(tmp_path, shakespeare_path, steps=4, batch_size=4, seq_len=32), "--out", out)
    line = _error_line(proc, 1, "No space left on device while writing ", "free space")
    assert str(RunDir(out).checkpoint_path(2)) in line
    status = RunDir(out).status()
    assert status["state"] == "failed" and status["error"].splitlines()[0].startswith(line[len("error: "):])


def test_a_disk_that_fills_inside_a_sweep_shows_the_runs_own_error(tmp_path, shakespeare_path, mount_tmpfs):
    disk = mount_tmpfs("size=512k")
    sweep = _sweep(tmp_path, disk / "runs", {"source": str(shakespeare_path)},
                   {"steps": 4, "batch_size": 4, "seq_len": 32})
    proc = _cli("sweep", "run", sweep, "--backend", "local", "--retries", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    outcome = next(line for line in proc.stdout.splitlines() if line.startswith("[1/1] failed"))
    assert "No space left on device while writing " in outcome and "attempt 2: exit code 1" in outcome, outcome
    (rd,) = list(RunDir(p) for p in (disk / "runs").iterdir() if p.is_dir())
    status = rd.status()
    assert status["attempts"] == 2 and status["error"].startswith("No space left on device while writing ")


# ---- 9: a final.json copied in from another run ---------------------------------------------------------------------


def test_a_final_json_of_another_run_is_not_taken_as_this_runs_result(tmp_path, shakespeare_path):
    runs = tmp_path / "runs"
    paths = {}
    for lr in (1e-3, 2e-3):
        cfg = run_config_from_dict(yaml.safe_load(_run_yaml(tmp_path, shakespeare_path, lr=lr).read_text()))
        rid = run_id(resolve_run_config(cfg).model_dump(mode="json"))
        train(cfg, runs / rid)
        paths[rid] = runs / rid
    (a, a_dir), (b, b_dir) = paths.items()
    b_final = json.loads((b_dir / "final.json").read_text())
    shutil.copyfile(a_dir / "final.json", b_dir / "final.json")

    proc = _cli("plots", runs, "--out", tmp_path / "report", "--bootstrap", "10")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    ids = [line.split(",")[0] for line in (tmp_path / "report" / "runs.csv").read_text().splitlines()[1:]]
    assert ids == [a]  # once, and B is not reported with A's numbers
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"{b} (unreadable: {b_dir / 'final.json'}: holds the result of run {a}" in report


    proc = _cli("train", tmp_path / "run.yaml", "--out", b_dir)  # (run.yaml is B's config: the last written)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"warning: {b_dir / 'final.json'}: holds the result of run {a}" in proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["run_id"] == b and printed["val_loss"] == b_final["val_loss"]
    assert json.loads((b_dir / "final.json").read_text())["run_id"] == b
    assert json.loads((a_dir / "final.json").read_text())["run_id"] == a


# ---- 11: data errors: `sweep plan` checks every source; inside a sweep the run's own error is shown -------------------


@pytest.mark.parametrize("kind, needle", [
    ("missing", "no such file"), ("empty", "is empty"), ("binary", "is not UTF-8 text"),
    ("too short", "fewer than one sequence of train.seq_len 16"),
])
def test_sweep_plan_checks_every_data_source_before_anything_trains(tmp_path, shakespeare_path, kind, needle):
    data = tmp_path / "corpus.txt"
    if kind == "empty":
        data.write_bytes(b"")
    elif kind == "binary":
        data.write_bytes(bytes(range(128, 256)) * 8)
    elif kind == "too short":
        data.write_text("To be.\n")
    runs = tmp_path / "runs"
    # the bad source is the grid's second one: every source is checked, not the first only
    sweep = _sweep(tmp_path, runs, {}, presets=("dense-t1",))
    spec = yaml.safe_load(sweep.read_text())
    spec["parameters"]["data.source"] = {"values": [str(shakespeare_path), str(data)]}
    sweep.write_text(yaml.safe_dump(spec))
    for action in ("plan", "run"):
        proc = _cli("sweep", action, sweep, *(["--backend", "local"] if action == "run" else []))
        _only_error(proc, 2, str(sweep), "data.source", str(data), needle)
    assert not runs.exists()


def test_a_data_error_inside_a_sweep_is_shown_and_not_retried(tmp_path):
    paragraphs = [f"Paragraph number {i} says a few words." for i in range(80)]
    data = tmp_path / "small.txt"
    data.write_text("\n\n".join(paragraphs))
    sweep = _sweep(tmp_path, tmp_path / "runs", {"source": str(data)}, {"batch_size": 8, "seq_len": 64})
    proc = _cli("sweep", "plan", sweep)
    assert proc.returncode == 0, proc.stderr  # long enough for a sequence; too small for a batch of its val split
    proc = _cli("sweep", "run", sweep, "--backend", "local", "--retries", "2")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    outcome = next(line for line in proc.stdout.splitlines() if line.startswith("[1/1] failed"))
    assert "'val' split" in outcome and str(data) in outcome and "1 attempt(s)" in outcome, outcome
    (rd,) = list(RunDir(p) for p in (tmp_path / "runs").iterdir() if p.is_dir())
    status = rd.status()
    assert status["attempts"] == 1 and "'val' split" in status["error"].splitlines()[0], status
    shown = _cli("sweep", "status", sweep)
    assert shown.returncode == 0
    assert any(line.startswith(f"{rd.run_id}: ") and "'val' split" in line for line in shown.stdout.splitlines())


# ---- 12: plots says which rows each fit used -----------------------------------------------------------------------


def test_plots_says_how_many_rows_each_fit_used_and_which_were_left_out(tmp_path):
    cols = ["run_id", "family", "state", "val_loss", "flops", "active_params", "total_params", "tokens", "seed"]
    rows = [[f"d{i}", "dense", "done", 3.0 - 0.3 * i, 1e12 * 4**i, 1e4 * 2**i, 1e4 * 2**i, 2e5 * 2**i, 0]
            for i in range(4)]
    rows += [["nan", "dense", "done", math.nan, 1e13, 5e4, 5e4, 1e6, 0],
             ["inf", "dense", "done", math.inf, 1e13, 6e4, 6e4, 1e6, 0],
             ["div", "dense", "diverged", 2.0, 1e13, 7e4, 7e4, 1e6, 0]]
    table = tmp_path / "runs.csv"
    table.write_text("\n".join(",".join(map(str, r)) for r in [cols, *rows]) + "\n")
    proc = _cli("plots", table, "--out", tmp_path / "report", "--bootstrap", "10")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "fit loss vs flops: rows used per family: dense 4 (of 7 rows)" in proc.stdout, proc.stdout
    left = next(line for line in proc.stdout.splitlines() if line.startswith("left out of the fits (3 rows): "))
    for part in ("nan (val_loss is nan)", "inf (val_loss is inf)", "div (state diverged)"):
        assert part in left, left
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Left out of the fits that need the value (3 of 7 rows" in report and "div (state diverged)" in report
    assert "| dense | 4 |" in report


# ---- a study continued from its committed table (`sweep run --done`) -------------------------------------------------


def test_sweep_run_done_skips_the_runs_of_a_committed_table_and_refuses_a_bad_one(tmp_path, shakespeare_path):
    runs = tmp_path / "runs"
    sweep = _sweep(tmp_path, runs, {"source": str(shakespeare_path)}, presets=("dense-t1", "moe-t1-2in12"))
    plan = json.loads(_cli("sweep", "plan", sweep, "--format", "json").stdout)
    ids = sorted(r["run_id"] for r in plan["runs"])
    table = tmp_path / "runs.csv"
    table.write_text("run_id,family,val_loss\n" + "".join(f"{i},x,2.0\n" for i in ids))
    proc = _cli("sweep", "run", sweep, "--backend", "local", "--done", table)
    assert proc.returncode == 0, proc.stderr
    assert f"--done {table}: 2 of the 2 runs finished there" in proc.stdout
    assert not any(runs.glob("*/final.json"))  # nothing trained
    _only_error(_cli("sweep", "run", sweep, "--backend", "local", "--done", tmp_path / "none.csv"), 2,
                "--done", "none.csv", "file not found")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    _only_error(_cli("sweep", "run", sweep, "--backend", "local", "--done", tmp_path / "bad.csv"), 2,
                "--done", "bad.csv", "no run_id column")
