"""The run folder: the source of truth for one run. Every write is atomic (temp file + rename).

Layout of `<runs_dir>/<run_id>/` (documented in docs/run_folder.md):
  config.yaml      resolved RunConfig
  status.json      {state, step, total_steps, tokens, error, attempts, created_at, started_at, updated_at, ...}
  metrics.jsonl    one JSON object per line ({"kind": "train"|"eval", "step": ..., ...})
  final.json       final metrics (val_loss, train_loss, params, tokens, flops, ...)
  checkpoints/     step_XXXXXXXX.pt (atomic), newest is the resume point
  lock             advisory lock held by the process training this run
  claim            advisory lock held by the scheduler task that launches (and retries) the training process
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

STATES = ("pending", "running", "done", "failed", "diverged")
TERMINAL = ("done", "diverged")  # states a re-run does not retry (failed runs are retried)


def now() -> float:
    return time.time()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_write_yaml(path: str | Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path, default: Any = None) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete lines; a torn last line (killed mid-write) is ignored."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out


class RunDir:
    """Accessors for one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final_path(self) -> Path:
        return self.path / "final.json"

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def lock_path(self) -> Path:
        return self.path / "lock"

    # config
    def write_config(self, resolved: dict[str, Any]) -> None:
        atomic_write_yaml(self.config_path, resolved)

    def read_config(self) -> dict[str, Any] | None:
        if not self.config_path.exists():
            return None
        with open(self.config_path) as f:
            return yaml.safe_load(f)

    # status
    def status(self) -> dict[str, Any]:
        return read_json(self.status_path, default={"state": "pending"})

    def update_status(self, **fields: Any) -> dict[str, Any]:
        status = self.status()
        t = now()
        status.setdefault("created_at", t)
        if fields.get("state") == "running" and status.get("state") != "running":
            status["started_at"] = t
        if fields.get("state") in ("done", "failed", "diverged"):
            status["finished_at"] = t
        status.update(fields)
        status["updated_at"] = t
        status["host"] = socket.gethostname()
        status["pid"] = os.getpid()
        atomic_write_json(self.status_path, status)
        return status

    # metrics
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one line. A single write() of a short line; readers skip a torn last line."""
        self.path.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, default=_json_default) + "\n"
        with open(self.metrics_path, "a") as f:
            f.write(line)
            f.flush()

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop metric lines logged after the checkpoint we resume from (they will be re-logged)."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    # final
    def write_final(self, final: dict[str, Any]) -> None:
        atomic_write_json(self.final_path, final)

    def final(self) -> dict[str, Any] | None:
        return read_json(self.final_path)

    # checkpoints
    def checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.exists():
            return []
        return sorted(self.ckpt_dir.glob("step_*.pt"))

    def checkpoint_path(self, step: int) -> Path:
        return self.ckpt_dir / f"step_{step:08d}.pt"

    @property
    def claim_path(self) -> Path:
        return self.path / "claim"

    def lock(self, blocking: bool = False) -> contextlib.AbstractContextManager[bool]:
        """An exclusive advisory lock (flock) on the run. Yields False if another process holds it."""
        return _flock(self.path, self.lock_path, blocking)

    def claim(self, blocking: bool = False) -> contextlib.AbstractContextManager[bool]:
        """The scheduler's lock on the run (a separate file from the trainer's `lock`, which the training process
        it launches takes). Held for all attempts, so two schedulers never train one run twice."""
        return _flock(self.path, self.claim_path, blocking)


@contextlib.contextmanager
def _flock(folder: Path, path: Path, blocking: bool) -> Iterator[bool]:
    import fcntl

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
