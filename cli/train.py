"""Train one run into its run folder; re-running the same command resumes it (docs/training.md).

  ultramem train CONFIG.yaml [--set train.lr=1e-3 ...] [--out DIR]
  ultramem train --preset dense-tiny --data ../shared/data/tinyshakespeare.txt --steps 300 --out runs/first

The quick form needs no YAML: --preset, --data (a local file/dir/glob, 'embedded' or 'hf:<dataset>') and --steps
also override a CONFIG.yaml. The folder defaults to runs/<run_id>. With parallel.nproc > 1 the run is launched
under `torchrun --standalone --nproc_per_node=K` (DDP). Exit codes: 0 done, 1 failed, 2 bad configuration,
3 diverged, 4 the run is being trained by another process.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ultramem.config import ConfigError

HELP = "train one run (auto-resumes from its newest checkpoint)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="run YAML (a RunConfig; see docs/training.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set train.lr=1e-3 --set model.memory.top_m=8 (repeatable)")
    parser.add_argument("--preset", help="model preset (see `ultramem models`); replaces the config's model block")
    parser.add_argument("--data", help="data.source: a local text/json/jsonl/parquet file, 'embedded' or 'hf:NAME'")
    parser.add_argument("--steps", type=int, help="train.steps (overrides the token budget)")
    parser.add_argument("--out", help="run folder (default: runs/<run_id>)")
    parser.add_argument("--force", action="store_true",
                        help="write the run into --out even if that folder holds files that are not this run's")


def build_config(args: argparse.Namespace) -> tuple[Any, str]:
    """The RunConfig the arguments describe and the name errors should cite."""
    from experiments.config import load_yaml, parse_set, run_config_from_dict
    from ultramem.config import deep_merge

    if args.config is None and args.preset is None:
        raise ConfigError("ultramem train: give a CONFIG.yaml or --preset NAME (with --data and --steps)")
    source = args.config or "command line"
    data = load_yaml(args.config) if args.config else {}
    quick: dict[str, Any] = {}
    if args.preset:
        data.pop("model", None)
        quick["model"] = {"preset": args.preset}
    if args.data:
        quick["data"] = {"source": args.data}
    if args.steps is not None:
        quick["train"] = {"steps": args.steps}
    data = deep_merge(deep_merge(data, quick), parse_set(args.overrides))
    return run_config_from_dict(data, source), source


def make_run_folder(path: Path, label: str) -> None:
    """Create the run folder and prove it writable (a file with a few bytes, synced), or raise a one-line
    ConfigError naming it and the reason (an --out under a regular file, in /proc, at /dev/null, on a read-only or
    full disk) instead of a traceback later. A refused folder is left as it was: folders created here are removed."""
    created = [p for p in (path, *path.parents) if not p.exists() and not p.is_symlink()]
    probe = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        with os.fdopen(fd, "wb") as f:
            f.write(b"ultramem write test\n")
            f.flush()
            os.fsync(f.fileno())
        os.unlink(probe)
    except OSError as err:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)
        for p in created:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        reason = err.strerror or str(err)
        fix = "choose a writable folder"
        if isinstance(err, FileExistsError) or (err.errno == errno.EEXIST and not path.is_dir()):
            reason = "it exists and is not a folder"
        elif isinstance(err, NotADirectoryError):
            reason = "a part of the path is a file, not a folder"
        elif err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            fix = "free space on that disk or choose a folder on another one, then run the same command again"
        where = f" ({err.filename})" if err.filename and str(err.filename) not in (str(path), probe) else ""
        raise ConfigError(f"{label} {path}: cannot create the run folder there: {reason}{where}; {fix}") from None


def run(args: argparse.Namespace) -> int:
    cfg, source = build_config(args)  # first: a bad file is refused before torch loads
    from experiments.config import run_id
    from experiments.resolve import resolve_run_config
    from experiments.run_one import EXIT_BUSY, EXIT_DIVERGED, launch_command
    from experiments.trainer import (
        Diverged,
        RunBusy,
        check_run_folder,
        describe_error,
        is_refused_write,
        train,
        write_run_config,
    )
    from runfolder import RunDir, run_state

    resolved = resolve_run_config(cfg, source)
    rid = run_id(resolved.model_dump(mode="json"))
    rd = RunDir(Path(args.out) if args.out else Path("runs") / rid)
    check_run_folder(rd, resolved, args.force)  # before anything is created or locked there
    make_run_folder(rd.path, "--out" if args.out else "run folder")
    print(f"run {rid} -> {rd.path}", file=sys.stderr)
    nproc = resolved.parallel.nproc
    if nproc > 1:
        write_run_config(rd, resolved, args.force)
        now = run_state(rd)
        if not now.finished:  # counted here: the torchrun workers do not count themselves (as under a scheduler)
            rd.update_status(attempts=(now.status.attempts if now.status else 0) + 1)
        rc = subprocess.call(launch_command(rd.path, nproc))
        final = rd.final() if rc == 0 else None
    else:
        try:
            final = train(resolved, rd.path, source, count_attempt=True, force=args.force)
        except Diverged as err:
            print(f"diverged: {err}", file=sys.stderr)
            return EXIT_DIVERGED
        except RunBusy as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BUSY
        except Exception as err:
            if not is_refused_write(err):
                raise
            # a full disk, an I/O error: one line (status.json holds it too), no traceback
            print(f"error: {describe_error(err, rd.path)}", file=sys.stderr)
            return 1
        rc = 0
    if final is not None:
        keys = ("run_id", "val_loss", "train_loss", "tokens", "active_params", "wall_s")
        print(json.dumps({k: final.get(k) for k in keys}))
    return rc
