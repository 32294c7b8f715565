"""What a run is doing now, decided in one place for the trainer, the scheduler, `sweep status` and the analysis.

The recorded state (status.json) says what the last writer did; whether anyone still works on the run needs the
locks and the writer's process:
  done         status done and final.json present
  diverged     a non-finite loss ended it (final: a re-run does not retry it)
  failed       every attempt failed and no scheduler holds it (the next `sweep run` retries it)
  running      status running and its scheduler holds the claim, or its writer is a live process on this host
  interrupted  status running (or done without final.json) but nothing trains it: the next run resumes it
  claimed      a scheduler holds it but no attempt is running (queued, or between two attempts)
  pending      nothing has happened yet
  unreadable   status.json or final.json cannot be read (`detail` says which and why); a re-run replaces it
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass

from runfolder.folder import RunDir
from runfolder.records import Final, RecordError, Status

STATES = ("pending", "claimed", "running", "interrupted", "done", "failed", "diverged", "unreadable")
FINISHED = ("done", "diverged")  # a re-run skips these


@dataclass
class RunState:
    state: str  # one of STATES
    status: Status | None  # None when unreadable
    final: Final | None
    detail: str | None = None  # why a folder is unreadable

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


def run_state(rd: RunDir) -> RunState:
    """The state of the run in `rd` (never raises on a damaged file: that run is `unreadable`)."""
    try:
        status = rd.read_status()
        final = rd.read_final() if status.state == "done" else None
    except RecordError as err:
        return RunState("unreadable", None, None, str(err))
    recorded = status.state
    if recorded == "done":
        return RunState("done" if final is not None else "interrupted", status, final)
    if recorded == "diverged":
        return RunState("diverged", status, None)
    claimed = is_claimed(rd)
    if recorded == "running":
        alive = claimed or writer_alive(status)
        return RunState("running" if alive else "interrupted", status, None)
    if claimed:
        return RunState("claimed", status, None)
    return RunState(recorded, status, None)  # pending | failed


def is_claimed(rd: RunDir) -> bool:
    """Whether some scheduler holds the run's claim right now.

    A read-only probe: a shared, non-blocking flock on the claim file, released at once. It conflicts with the
    scheduler's exclusive claim and with nothing else, writes nothing into the file and needs no write access, so
    `sweep status` and `analysis.collect` can look at run folders on read-only storage."""
    try:
        fd = os.open(rd.claim_path, os.O_RDONLY)
    except OSError:  # no claim file: never claimed (an unreadable one cannot be probed: treat it alike)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def writer_alive(status: Status) -> bool:
    """Whether the status's writer is a live process on this host. Not alive: a zombie (dead, not reaped) or a
    process in the middle of exiting (its memory, and with it its command line, already released)."""
    if status.host != socket.gethostname() or not status.pid:
        return False
    pid = int(status.pid)
    try:
        with open(f"/proc/{pid}/stat") as f:
            proc_state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return proc_state != "Z" and bool(f.read())
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
