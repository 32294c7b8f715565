"""Helpers shared by the checkpoint tests: run folders put into states a crash leaves behind."""

from __future__ import annotations

from experiments import checkpoint
from runfolder import RunDir


def interrupted_after(rd: RunDir, step: int) -> None:
    """The folder as a run killed right after writing checkpoint `step` leaves it."""
    for path in rd.checkpoints():
        if int(path.stem.split("_")[1]) > step:
            path.unlink()
            checkpoint.checksum_path(path).unlink(missing_ok=True)
    rd.final_path.unlink()
    rd.update_status(state="running", pid=2**22 + 1)  # a writer that is gone
