"""The run folder, the bottom layer under `experiments`, `analysis` and the CLI: it is the record of a run
(W&B is a mirror). It owns the folder's files and their typed, versioned records (`records`), atomic writes
(`atomic`), the accessors (`folder.RunDir`) and the one function that says what a run is doing (`state.run_state`).
It imports no torch, no Ray, nothing of the project. Layout and every field: docs/run_folder.md.
"""

from runfolder.atomic import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
    read_json,
    read_jsonl,
)
from runfolder.folder import RunDir, iter_run_dirs
from runfolder.records import SCHEMA, TERMINAL, EvalRow, Final, Marker, RecordError, Status, TrainRow
from runfolder.state import FINISHED, STATES, RunState, is_claimed, run_state, writer_alive

__all__ = [
    "SCHEMA", "STATES", "FINISHED", "TERMINAL", "RunDir", "RunState", "Status", "TrainRow", "EvalRow", "Final",
    "Marker", "RecordError", "atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
    "atomic_write_yaml", "read_json", "read_jsonl", "iter_run_dirs", "is_claimed", "run_state", "writer_alive",
]
