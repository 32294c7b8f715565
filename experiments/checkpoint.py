"""Checkpoints: one atomic file per save, `RUN_DIR/checkpoints/step_XXXXXXXX.pt`, the newest is the resume point.

A checkpoint holds everything the next optimizer step depends on, so a resumed run is bitwise the run that was
never interrupted (on CPU in fp32): model and optimizer state, the step (the LR schedule is a pure function of it),
the data loader's position, the trainer's logging window, and every RNG state (Python, NumPy, torch CPU and CUDA)
of every process. It is written to a temp file in the same folder and renamed, so a `kill -9` mid-save leaves the
previous checkpoint as the newest complete one.

Sharded runs (experiments/distributed.py) write `step_XXXXXXXX.dcp/` folders instead (torch.distributed.checkpoint,
one file per rank); `newest` and `prune` consider both kinds.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.runstore import RunDir

FORMAT_VERSION = 1
SHARDED_SUFFIX = ".dcp"


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states; on CUDA only its own device's generator (touching every visible GPU would
    create a context on each of them from every rank)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save(run_dir: RunDir, step: int, state: dict[str, Any], keep: int) -> Path:
    """Atomically write `state` as the checkpoint of `step`, then drop all but the newest `keep`."""
    path = run_dir.checkpoint_path(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT_VERSION, "step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    prune(run_dir, keep)
    return path


def load(path: Path) -> dict[str, Any]:
    """A single-file checkpoint (on CPU)."""
    # weights_only=False: the RNG states are Python/NumPy objects; the file is one this trainer wrote.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT_VERSION:
        raise RuntimeError(f"{path}: checkpoint format {state.get('format')!r}, this trainer reads "
                           f"{FORMAT_VERSION}; delete {path.parent} to restart the run from scratch")
    return state


def sharded_path(run_dir: RunDir, step: int) -> Path:
    return run_dir.ckpt_dir / f"step_{step:08d}{SHARDED_SUFFIX}"


def all_checkpoints(run_dir: RunDir) -> list[Path]:
    """Single-file and sharded checkpoints, oldest first (by step)."""
    if not run_dir.ckpt_dir.exists():
        return []
    found = [*run_dir.checkpoints(), *(p for p in run_dir.ckpt_dir.glob(f"step_*{SHARDED_SUFFIX}") if p.is_dir())]
    return sorted(found, key=lambda p: p.stem)


def newest(run_dir: RunDir) -> Path | None:
    found = all_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: RunDir, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints of either kind."""
    for path in all_checkpoints(run_dir)[:-keep]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
