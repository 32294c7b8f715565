"""`python -m experiments.ray_reaper TAG`: stop the processes of a private local Ray once its driver is gone.

A fresh local Ray (`ultramem sweep run` without --address) lives in the driver's process tree, but its
`ray::DashboardAgent` and `ray::RuntimeEnvAgent` outlive a SIGKILLed driver by more than a minute (they try to
report the raylet's death to a GCS that died with it). The scheduler starts this watcher next to such a Ray, in a
session of its own, with a pipe on its stdin that only the driver holds: when the driver exits, however it exits,
the pipe reads EOF and the watcher ends every process whose environment carries `ULTRAMEM_RAY_OWNER=TAG` (set by
the driver before `ray.init`, so inherited by every Ray process and training process it started).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

OWNER_ENV = "ULTRAMEM_RAY_OWNER"
GRACE_S = 3.0


def tagged_pids(tag: str) -> list[int]:
    """Processes (other than this one and the driver that started it) whose environment holds OWNER_ENV=tag."""
    needle = f"{OWNER_ENV}={tag}".encode()
    out, skip = [], {os.getpid(), os.getppid()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return out


def reap(tag: str, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM every tagged process, SIGKILL those still there after `grace_s`; returns the pids signalled."""
    pids = tagged_pids(tag)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and tagged_pids(tag):
        time.sleep(0.1)
    for pid in tagged_pids(tag):
        _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0]:
        print("usage: python -m experiments.ray_reaper TAG", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the driver's terminal is the driver's business
    sys.stdin.buffer.read()  # returns at EOF: the driver closed its end or died
    reap(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
