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
        if not self.config_path.exists():
            return None
        with open(self.config_path) as f:
            return yaml.safe_load(f)

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
        return read_jsonl(self.metrics_path)

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop metric lines logged after the checkpoint we resume from (they will be re-logged)."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    # ---- final
    def write_final(self, final: Final | dict[str, Any]) -> None:
        record = final if isinstance(final, Final) else Final.from_dict(final, self.final_path)
        atomic_write_json(self.final_path, record.to_dict())

    def read_final(self) -> Final | None:
        """The final record, None before the run finished. RecordError if unreadable."""
        return self._read_record(self.final_path, Final)

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
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def iter_run_dirs(root: str | Path) -> Iterator[RunDir]:
    """Every run folder (a folder with config.yaml) below `root`, sorted by path."""
    root = Path(root)
    if not root.exists():
        return
    for cfg in sorted(root.rglob("config.yaml")):
        if "checkpoints" in cfg.parts or "wandb" in cfg.parts:
            continue
        yield RunDir(cfg.parent)
