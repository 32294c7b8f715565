"""`RunDir`: the files of one run folder, read and written as their records (runfolder.records).

Layout of `<runs_dir>/<run_id>/` (docs/run_folder.md):
  run.json         marker: this folder is a run folder, of this run id and folder schema
  config.yaml      the resolved RunConfig
  status.json      Status
  metrics.jsonl    TrainRow / EvalRow, one JSON object per line
  final.json       Final
  checkpoints/     step_XXXXXXXX.pt (or .dcp/ when sharded); the newest is the resume point
  branch_points/   a WSD trunk's checkpoints where its cooldown branches start (same names; never pruned)
  lock             flock held by the process training this run
  claim            flock held by the scheduler task that launches (and retries) the training process
  train.log        stdout/stderr of every attempt launched by a scheduler
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from runfolder.atomic import atomic_write_json, atomic_write_text, atomic_write_yaml, json_default, read_jsonl
from runfolder.records import EvalRow, Final, Marker, RecordError, Status, TrainRow


class RunDir:
    """Accessors for one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def run_id(self) -> str:
        return self.path.name

    # ---- paths
    @property
    def marker_path(self) -> Path:
        return self.path / Marker.FILE

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def status_path(self) -> Path:
        return self.path / Status.FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final_path(self) -> Path:
        return self.path / Final.FILE

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def lock_path(self) -> Path:
        return self.path / "lock"

    @property
    def claim_path(self) -> Path:
        return self.path / "claim"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    # ---- marker + resolved config
    def write_config(self, resolved: dict[str, Any], run_id: str | None = None) -> None:
        """config.yaml, and the run.json marker naming `run_id` when it is given (the run id is a function of the
        config that experiments.config owns; writers that know it pass it)."""
        atomic_write_yaml(self.config_path, resolved)
        if run_id is None:
            return
        old = self._read_record(self.marker_path, Marker)
        if old is None or old.run_id != run_id:
            atomic_write_json(self.marker_path, Marker(run_id, time.time()).to_dict())

    def read_config(self) -> dict[str, Any] | None:
        """config.yaml as a mapping, None when it does not exist. RecordError (naming the file) when it is not
        a readable YAML mapping whose blocks (model, train, data, ...) are mappings."""
        try:
            text = self.config_path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as err:
            raise RecordError(f"{self.config_path}: not a YAML text file (byte {err.start:,} is not UTF-8)") from None
        except OSError as err:
            raise RecordError(f"{self.config_path}: cannot read ({err.strerror or err})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecordError(f"{self.config_path}: not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(data, dict):
            raise RecordError(f"{self.config_path}: expected a mapping of a run's config, found "
                              f"{type(data).__name__}")
        for key in _CONFIG_BLOCKS:
            if key in data and not isinstance(data[key], dict):
                raise RecordError(f"{self.config_path}: `{key}` is {data[key]!r}, expected a mapping")
        return data

    def read_marker(self) -> Marker | None:
        return self._read_record(self.marker_path, Marker)

    def foreign_entries(self) -> list[str]:
        """Entries of a folder without config.yaml that a fresh run folder would not hold yet: a sign that the
        folder belongs to something else (writing a run into it would overwrite its files)."""
        if not self.path.is_dir() or self.config_path.exists():
            return []
        early = {self.lock_path.name, self.claim_path.name, self.status_path.name, self.log_path.name}
        return sorted(p.name for p in self.path.iterdir() if p.name not in early and not p.name.startswith(".")
                      and not (p.name == self.marker_path.name and self.read_marker() is not None))

    # ---- status
    def read_status(self) -> Status:
        """The status record; a pending one when status.json does not exist yet. RecordError if unreadable."""
        return self._read_record(self.status_path, Status) or Status()

    def status(self) -> dict[str, Any]:
        """status.json as a dict (every key of Status)."""
        return self.read_status().to_dict()

    def update_status(self, **fields: Any) -> Status:
        """Read-modify-write status.json; an unreadable one is replaced (the run folder's checkpoints and metrics
        still say where the run is)."""
        try:
            status = self.read_status()
        except RecordError:
            status = Status()
        t = time.time()
        if status.created_at is None:
            status.created_at = t
        if fields.get("state") == "running" and status.state != "running":
            status.started_at = t
        if fields.get("state") in ("done", "failed", "diverged"):
            status.finished_at = t
        status = Status.from_dict({**status.to_dict(), **fields, "updated_at": t, "host": socket.gethostname(),
                                   "pid": os.getpid()}, self.status_path)
        atomic_write_json(self.status_path, status.to_dict())
        return status

    # ---- metrics
    def append_metrics(self, row: TrainRow | EvalRow | dict[str, Any]) -> None:
        """Append one line: a single write() of a short line; readers skip a torn line."""
        self.path.mkdir(parents=True, exist_ok=True)
        record = row if isinstance(row, dict) else row.to_dict()
        line = json.dumps(record, sort_keys=True, default=json_default) + "\n"
        with open(self.metrics_path, "a") as f:
            f.write(line)
            f.flush()

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl; a torn line, or one that is not a row (not an object, a number field that is
        not a number), is skipped."""
        return [r for r in read_jsonl(self.metrics_path) if _is_row(r)]

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop metric lines logged after the checkpoint we resume from (they will be re-logged)."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    # ---- final
    def write_final(self, final: Final | dict[str, Any]) -> None:
        record = final if isinstance(final, Final) else Final.from_dict(final, self.final_path)
        atomic_write_json(self.final_path, record.to_dict())

    def read_final(self) -> Final | None:
        """The final record, None before the run finished. RecordError if unreadable, or if it holds another run
        than the folder's marker (run.json) names: a final.json copied in from elsewhere is not this run's result."""
        final = self._read_record(self.final_path, Final)
        if final is None:
            return None
        marker = self.read_marker()
        if marker is not None and final.run_id != marker.run_id:
            raise RecordError(f"{self.final_path}: holds the result of run {final.run_id}, but this folder is run "
                              f"{marker.run_id} (its run.json); a copied-in final.json is not this run's: delete it "
                              "and train the run again to rewrite it")
        return final

    def final(self) -> dict[str, Any] | None:
        record = self.read_final()
        return None if record is None else record.to_dict()

    # ---- checkpoints
    def checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.exists():
            return []
        return sorted(self.ckpt_dir.glob("step_*.pt"))

    def checkpoint_path(self, step: int) -> Path:
        return self.ckpt_dir / f"step_{step:08d}.pt"

    @property
    def branch_dir(self) -> Path:
        return self.path / "branch_points"

    def branch_point(self, step: int) -> Path | None:
        """The kept checkpoint (file or sharded folder) of `step` where a cooldown branch starts, once complete."""
        for path in (self.branch_dir / f"step_{step:08d}.pt", self.branch_dir / f"step_{step:08d}.dcp"):
            if path.exists():
                return path
        return None

    # ---- locks
    def lock(self, blocking: bool = False) -> contextlib.AbstractContextManager[bool]:
        """The training process's exclusive advisory lock (flock). Yields False if another process holds it."""
        return _flock(self.path, self.lock_path, blocking)

    def claim(self, blocking: bool = False) -> contextlib.AbstractContextManager[bool]:
        """The scheduler's lock on the run (a separate file from the trainer's `lock`, which the training process
        it launches takes). Held for all attempts, so two schedulers never train one run twice."""
        return _flock(self.path, self.claim_path, blocking)

    def lock_owner(self) -> str:
        """Who holds the training lock, as its file says ("held by HOST PID")."""
        try:
            return "held by " + self.lock_path.read_text().strip()
        except OSError:
            return "lock file unreadable"

    # ---- helpers
    @staticmethod
    def _read_record(path: Path, cls: Any) -> Any:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise RecordError(f"{path}: cannot read ({err})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
        try:
            return cls.from_dict(data, path)
        except TypeError as err:  # a required field missing
            raise RecordError(f"{path}: {err}") from None


@contextlib.contextmanager
def _flock(folder: Path, path: Path, blocking: bool) -> Iterator[bool]:
    folder.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        except OSError:  # a full disk: leave no empty lock file behind (the caller reports the error)
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_ROW_NUMBERS = ("step", "tokens", "flops", "loss", "val_loss", "tokens_per_s")  # numbers where present


def _is_row(row: Any) -> bool:
    return isinstance(row, dict) and all(
        isinstance(row[k], int | float) and not isinstance(row[k], bool) for k in _ROW_NUMBERS if k in row)


_CONFIG_BLOCKS = ("model", "train", "data", "parallel", "wandb")  # RunConfig's blocks: mappings when present


def iter_run_dirs(root: str | Path) -> Iterator[RunDir]:
    """Every run folder (a folder with config.yaml) below `root`, sorted by path."""
    root = Path(root)
    if not root.exists():
        return
    for cfg in sorted(root.rglob("config.yaml")):
        if "checkpoints" in cfg.parts or "wandb" in cfg.parts:
            continue
        yield RunDir(cfg.parent)
