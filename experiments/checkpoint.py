"""Checkpoints: one atomic file per save, `RUN_DIR/checkpoints/step_XXXXXXXX.pt`, the newest is the resume point.

A checkpoint holds everything the next optimizer step depends on, so a resumed run is bitwise the run that was
never interrupted (on CPU in fp32): model and optimizer state, the step (the LR schedule is a pure function of it),
the data loader's position, the trainer's logging window, and every RNG state (Python, NumPy, torch CPU and CUDA)
of every process. It is written to a temp file in the same folder and renamed, so a `kill -9` mid-save leaves the
previous checkpoint as the newest complete one.

Sharded runs (experiments/distributed.py) write `step_XXXXXXXX.dcp/` folders instead (torch.distributed.checkpoint,
one file per rank); `newest` and `prune` consider both kinds.

Branch points: a WSD trunk with cooldown branches (`train.branches`) keeps the checkpoint of each branch step in
`RUN_DIR/branch_points/` (a hard link, or a copy where links are not supported, of the saved file or folder, with
its checksums), where `newest` and `prune` never look: a branch run starts from it (experiments/trainer.py).

Checksums: a file checkpoint has a sidecar `step_XXXXXXXX.pt.sha256`, a DCP folder a `checksums.sha256` inside it
(both in `sha256sum` format), so a damaged checkpoint (truncated, a flipped bit: torch.load reads those silently)
is recognised before it is used; `verify` raises CorruptCheckpoint and `move_aside` renames it to
`step_XXXXXXXX.pt.corrupt` (kept for inspection, invisible to `newest`/`all_checkpoints`/`prune`). Checkpoints
written before checksums existed have none and still load.

Safe loading: a checkpoint holds tensors and plain values only (ints, floats, strings, None, lists, tuples, dicts;
the RNG states converted to those), and is read with `torch.load(weights_only=True)`, which never runs code from
the file (a checksum detects damage, not tampering: whoever can write the file can write its checksum). A file that
holds anything else (a checkpoint of the trainer before safe loading, which kept NumPy's RNG state as an array, or
a crafted pickle) is refused with UnsafeCheckpoint, unless the user trusts the run folder and sets
ULTRAMEM_TRUST_CHECKPOINTS=1 for the resume (`read`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runfolder import RunDir, atomic_write, atomic_write_text
from ultramem.config import ConfigError

FORMAT_VERSION = 1  # the checksums live beside the payload, so adding them did not change the format
SHARDED_SUFFIX = ".dcp"
CHECKSUM_SUFFIX = ".sha256"  # step_XXXXXXXX.pt.sha256 beside a file checkpoint
SHARDED_CHECKSUMS = "checksums.sha256"  # inside a step_XXXXXXXX.dcp/ folder
CORRUPT_SUFFIX = ".corrupt"
TRUST_ENV = "ULTRAMEM_TRUST_CHECKPOINTS"  # =1: read checkpoints that hold arbitrary Python objects (older ones)


class CorruptCheckpoint(RuntimeError):
    """A checkpoint that fails its checksum, or (written without one) cannot be read. The message names it."""


class UnsafeCheckpoint(ConfigError):
    """A checkpoint holding Python objects that `torch.load(weights_only=True)` does not read: loading it could run
    code from the file. Not a damaged file (it is neither moved aside nor skipped): the user decides (exit 2)."""


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (a safe load reads them); on CUDA only its own
    device's generator (touching every visible GPU would create a context on each of them from every rank)."""
    version, internal, gauss = random.getstate()  # (3, 625 ints, float | None)
    _, keys, pos, has_gauss, cached = np.random.get_state()  # ('MT19937', uint32[624], int, int, float)
    return {
        "python": [int(version), [int(k) for k in internal], gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore `rng_state`'s states (or those of a checkpoint written before safe loading: Python's state as a
    tuple, NumPy's as its get_state tuple)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = ("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def trusted() -> bool:
    """Whether the user opted in to reading checkpoints with arbitrary Python objects (ULTRAMEM_TRUST_CHECKPOINTS=1)."""
    return os.environ.get(TRUST_ENV, "") == "1"


def read(source: Path | Any, name: str) -> Any:
    """`torch.load` of a checkpoint file (a path, or a seekable file object) that never runs code from it: tensors
    and plain values only (weights_only=True), on the CPU.

    A file that holds other Python objects raises UnsafeCheckpoint naming `name` and them, unless trusted()
    (then it is loaded in full, with a warning). Other read errors (a damaged file) propagate unchanged."""
    try:
        return torch.load(_rewound(source), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = _unsafe_globals(source)
        if not unsafe:
            raise
    shown = ", ".join(unsafe[:4]) + (f" and {len(unsafe) - 4} more" if len(unsafe) > 4 else "")
    if not trusted():
        raise UnsafeCheckpoint(
            f"{name}: refused: it holds Python objects ({shown}) that a safe load (torch.load weights_only=True) "
            "does not read, because unpickling them can run code from the file. Checkpoints of this trainer from "
            "before safe loading hold NumPy's RNG state that way: if you wrote this run folder yourself, run the "
            f"same command again with {TRUST_ENV}=1 (the next checkpoint is written in the safe format); otherwise "
            "delete the file (and its .sha256) to resume from an older checkpoint or start over") from None
    print(f"warning: {name}: loading Python objects ({shown}) in full because {TRUST_ENV}=1: this runs code from "
          "the file; only do this for run folders you wrote", file=sys.stderr, flush=True)
    return torch.load(_rewound(source), map_location="cpu", weights_only=False)


def _rewound(source: Any) -> Any:
    if hasattr(source, "seek"):
        source.seek(0)
    return source


def _unsafe_globals(source: Any) -> list[str]:
    """The Python objects (module.name) a checkpoint's pickle refers to that a safe load refuses; [] when the file
    cannot be parsed that far (damaged)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(_rewound(source))
    except Exception:
        return []


def save(run_dir: RunDir, step: int, state: dict[str, Any], keep: int) -> Path:
    """Atomically write `state` as the checkpoint of `step` and its checksum, then drop all but the newest `keep`."""
    path = run_dir.checkpoint_path(step)
    side = checksum_path(path)
    with contextlib.suppress(FileNotFoundError):
        side.unlink()  # one of an earlier save of this step: it must never describe the new file
    digest = hashlib.sha256()
    atomic_write(path, lambda f: torch.save({"format": FORMAT_VERSION, "step": step, **state}, _Hashing(f, digest)))
    atomic_write_text(side, f"{digest.hexdigest()}  {path.name}\n")
    prune(run_dir, keep)
    return path


def load(path: Path, verified: bool | None = None) -> dict[str, Any]:
    """A single-file checkpoint (on CPU, read safely: `read`), verified against its checksum when it has one
    (`verified`: the caller already did: True when it matched, False when there is none).

    Raises CorruptCheckpoint when it is damaged (checksum mismatch, or no checksum and torch cannot read it), and
    UnsafeCheckpoint when it holds Python objects besides tensors and plain values."""
    if verified is None:
        verified = verify(path)
    try:
        state = read(path, str(path))
    except UnsafeCheckpoint:
        raise
    except Exception as err:
        if verified:
            raise
        raise CorruptCheckpoint(f"{path}: cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{path}: holds a {type(state).__name__}, not a checkpoint")
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
    """Drop all but the newest `keep` checkpoints of either kind (with their checksums)."""
    for path in all_checkpoints(run_dir)[:-keep]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            for p in (path, checksum_path(path)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def keep_branch_point(run_dir: RunDir, step: int) -> Path | None:
    """Keep the checkpoint of `step` (in checkpoints/) in branch_points/ unless it is there already; return the
    kept path, None when checkpoints/ has no such checkpoint. The kept path appears complete or not at all."""
    kept = run_dir.branch_point(step)
    if kept is not None:
        return kept
    src = next((p for p in (run_dir.checkpoint_path(step), sharded_path(run_dir, step)) if p.exists()), None)
    if src is None:
        return None
    run_dir.branch_dir.mkdir(parents=True, exist_ok=True)
    dst = run_dir.branch_dir / src.name
    tmp = run_dir.branch_dir / f".{src.name}.tmp"
    if src.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
    else:
        if checksum_path(src).exists():  # the checksum first: the checkpoint's name appears last
            _replace_with_link(checksum_path(src), checksum_path(dst))
        _replace_with_link(src, tmp)
    os.replace(tmp, dst)
    return dst


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _replace_with_link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    _link_or_copy(src, tmp)
    os.replace(tmp, dst)


# ---- checksums and damaged checkpoints ---------------------------------------------------------------------------


def checksum_path(path: Path) -> Path:
    """Where the checksums of checkpoint `path` are: a sidecar for a file, a file inside a DCP folder."""
    return path / SHARDED_CHECKSUMS if path.suffix == SHARDED_SUFFIX else path.with_name(path.name + CHECKSUM_SUFFIX)


def write_sharded_checksums(folder: Path) -> None:
    """The checksum of every file of a DCP folder (call once all ranks have written it, before it is renamed)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != SHARDED_CHECKSUMS)
    atomic_write_text(folder / SHARDED_CHECKSUMS, "".join(f"{_sha256(folder / n)}  {n}\n" for n in names))


def verify(path: Path) -> bool:
    """Check checkpoint `path` (a file or a DCP folder) against its checksums: True when they match, False when it
    has none (written before checksums existed); CorruptCheckpoint naming the damaged file otherwise."""
    side = checksum_path(path)
    try:
        text = side.read_text()
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptCheckpoint(f"{side}: checksum file unreadable ({err})") from None
    folder = path if path.is_dir() else path.parent
    entries = [line.split(None, 1) for line in text.splitlines() if line.strip()]
    if not entries or any(len(e) != 2 or len(e[0]) != 64 for e in entries):
        raise CorruptCheckpoint(f"{side}: malformed checksum file")
    for want, name in entries:
        file = folder / name.strip()
        try:
            got = _sha256(file)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{file}: missing (listed in {side})") from None
        if got != want:
            raise CorruptCheckpoint(f"{file}: checksum mismatch ({file.stat().st_size:,} bytes; sha256 {got[:12]}..., "
                                    f"{side.name} says {want[:12]}...): the file is damaged (truncated or altered)")
    return True


def move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint (and its sidecar) to `<name>.corrupt[N]`, where nothing counts it; return the
    new path. Never deletes: the file is evidence."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{n}")
        n += 1
    side = checksum_path(path)
    os.replace(path, target)
    if path.suffix != SHARDED_SUFFIX and side.exists():
        os.replace(side, target.with_name(target.name + CHECKSUM_SUFFIX))
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Hashing:
    """A write-only file that hashes what passes through it (torch.save writes its zip sequentially)."""

    def __init__(self, f: Any, digest: Any):
        self.f, self.digest = f, digest

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()
