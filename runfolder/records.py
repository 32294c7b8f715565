"""The records of a run folder, one definition each: the marker `run.json`, `status.json`, the rows of
`metrics.jsonl` and `final.json` (docs/run_folder.md). The resolved config (`config.yaml`) is the run's
`experiments.config.RunConfig` dumped as YAML; the run folder stores it as a mapping and names its run id in the
marker, it does not interpret it.

Each record is a dataclass: writing one with an unknown field is a TypeError, reading a file with an unknown key,
a wrong type or a newer `schema` is a RecordError that names the file and the key. `SCHEMA` versions the folder's
format; files written before it existed (no `schema` key, no `run.json`) read as schema 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

SCHEMA = 1

# Run states as the trainer and the scheduler record them in status.json.
RECORDED_STATES = ("pending", "running", "done", "failed", "diverged")
TERMINAL = ("done", "diverged")  # a re-run does not retry these (a failed run is retried)


class RecordError(ValueError):
    """A run-folder file that cannot be read as its record: the message names the file, the key and the fix."""


R = TypeVar("R", bound="_Record")


class _Record:
    """Strict dict <-> dataclass conversion shared by the records."""

    FILE: ClassVar[str] = ""
    _TYPES: ClassVar[dict[str, tuple[type, ...]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: Any, source: str | Path | None = None) -> R:
        where = str(source or cls.FILE)
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected a JSON object, found {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise RecordError(f"{where}: unknown key(s) {', '.join(unknown)}; a {cls.FILE} of schema "
                              f"{SCHEMA} has {', '.join(sorted(names))}")
        schema = data.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise RecordError(f"{where}: schema {schema!r} is newer than this version reads ({SCHEMA}); "
                              "upgrade the ultramem suite to read it")
        for key, types in cls._TYPES.items():
            value = data.get(key)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
                raise RecordError(f"{where}: `{key}` is {value!r}, expected {' or '.join(t.__name__ for t in types)}")
        return cls(**data)


@dataclass
class Marker(_Record):
    """`run.json`: says that the folder is a run folder and which run it holds (written with config.yaml)."""

    FILE: ClassVar[str] = "run.json"
    _TYPES: ClassVar[dict[str, tuple[type, ...]]] = {"run_id": (str,), "created_at": (int, float)}

    run_id: str
    created_at: float | None = None
    schema: int = SCHEMA


@dataclass
class Status(_Record):
    """`status.json`: where the run stands. Written by the trainer (state, progress) and the scheduler
    (attempts, node, failures after the last attempt)."""

    FILE: ClassVar[str] = "status.json"
    _TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "state": (str,), "step": (int,), "total_steps": (int,), "tokens": (int, float), "resumed_from": (int,),
        "error": (str,), "attempts": (int,), "node": (str,), "name": (str,), "host": (str,), "pid": (int,),
        "threads": (int,),
        "created_at": (int, float), "started_at": (int, float), "updated_at": (int, float),
        "finished_at": (int, float),
    }

    state: str = "pending"  # one of RECORDED_STATES
    step: int | None = None  # optimizer steps done (as of the last status write)
    total_steps: int | None = None
    tokens: float | None = None
    resumed_from: int | None = None  # checkpoint step the latest attempt started from (0: a fresh start)
    error: str | None = None  # why the run failed / diverged (first line is the summary)
    attempts: int = 0  # training processes launched for this run (by the scheduler or `ultramem train`)
    node: str | None = None  # where the latest attempt ran (Ray node IP or host name)
    name: str | None = None  # the run's name in its sweep
    created_at: float | None = None
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    host: str | None = None  # host and pid of the last writer (tells a live run from an interrupted one)
    pid: int | None = None
    threads: int | None = None  # torch threads of the latest attempt (results are bitwise only at the same count)
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        if self.state not in RECORDED_STATES:
            raise RecordError(f"{self.FILE}: state {self.state!r}; allowed: {', '.join(RECORDED_STATES)}")


@dataclass
class TrainRow(_Record):
    """A `kind: train` line of metrics.jsonl: the optimizer steps since the previous line, averaged over steps and
    processes (docs/run_folder.md)."""

    FILE: ClassVar[str] = "metrics.jsonl"

    step: int
    tokens: int
    flops: float
    loss: float  # cross-entropy alone
    aux_loss: float  # the weighted auxiliary loss added to it for the gradient
    aux: dict[str, float]  # unweighted auxiliary components (moe_balance, moe_z, tucker_penalty)
    lr: float  # base LR of the schedule at the window's last step
    grad_norm: float  # before clipping
    tokens_per_s: float | None = None
    flops_per_s: float | None = None
    mfu: float | None = None
    peak_mem_mb: float | None = None
    comm_bytes: dict[str, float] | None = None  # memory / expert parallelism: bytes one rank sent per step
    time: float = 0.0
    kind: str = "train"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["comm_bytes"] is None:
            del out["comm_bytes"]
        return out


@dataclass
class EvalRow(_Record):
    """A `kind: eval` line of metrics.jsonl: the held-out loss at `step`."""

    FILE: ClassVar[str] = "metrics.jsonl"

    step: int
    tokens: int
    flops: float
    val_loss: float
    time: float = 0.0
    kind: str = "eval"
    memory: dict[str, float] | None = None  # memory layers' row usage on the eval batches (ultramem.memory.usage)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["memory"] is None:
            del out["memory"]
        return out


@dataclass
class Final(_Record):
    """`final.json`: what the finished run measured (docs/run_folder.md has the meaning of each key)."""

    FILE: ClassVar[str] = "final.json"
    _TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "run_id": (str,), "family": (str,), "val_loss": (int, float), "train_loss": (int, float),
        "params": (dict,), "tokens": (int, float), "flops": (int, float), "steps": (int,),
    }

    run_id: str
    name: str | None
    sweep: str | None
    family: str
    preset: str | None
    seed: int | None
    train_loss: float | None
    val_loss: float | None
    params: dict[str, int]  # {total, active, embedding, non_embedding, active_non_embedding, sparse}
    total_params: int
    active_params: int
    non_embedding_params: int
    flops_per_token: float
    tokens: int
    flops: float
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    memory: dict[str, Any] | None = None  # {num_values, top_m, heads, value_expansion, num_layers, value_params}
    moe: dict[str, Any] | None = None  # {num_experts, top_k}
    knowledge: dict[str, Any] | None = None  # {facts, recall, heldout_recall, bits_stored, ...}
    wall_s: float | None = None
    tokens_per_s: float | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    data_source: str | None = None
    data_sha256: str | None = None  # SHA-256 of a local corpus file (experiments.data.loading.Source.sha256)
    schema: int = SCHEMA



__all__ = ["SCHEMA", "TERMINAL", "RECORDED_STATES", "RecordError", "Marker", "Status", "TrainRow", "EvalRow",
           "Final"]
