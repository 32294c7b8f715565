"""Atomic file writes (temp file in the same folder + fsync + rename) and tolerant readers.

Every file of a run folder, every checkpoint, every data-cache manifest and every report table is written through
here, so a `kill -9` or a full disk mid-write leaves the previous file, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(f)` on a temp file beside `path`, fsync it and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it: set and restore, once at import
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=json_default) + "\n")


def atomic_write_yaml(path: str | Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def json_default(o: Any) -> Any:
    """numpy/torch scalars and paths, as JSON."""
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path, default: Any = None) -> Any:
    """The parsed file, `default` when it does not exist (a malformed file raises json.JSONDecodeError)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete lines; a torn line (killed mid-write) or one that is not UTF-8 JSON is ignored."""
    out = []
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    line = raw.decode().strip()
                    if line:
                        out.append(json.loads(line))
                except ValueError:  # UnicodeDecodeError, json.JSONDecodeError
                    continue
    except FileNotFoundError:
        pass
    return out


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
