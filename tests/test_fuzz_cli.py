"""Property-based fuzzing of the `ultramem` command's read paths (issue 22): hypothesis generates sweep files, run
configs and run-folder records (status.json, final.json, config.yaml, run.json, metrics.jsonl) from their schemas,
then corrupts them (a field replaced by a value of another type, NaN/inf, a key removed or added, the file
truncated, bytes flipped, random bytes), and checks that `sweep plan`, `sweep status`, `plots` and the validation
path of `train` answer with a documented exit code and never with a traceback (an exception escaping `main`).

The CLI's `main()` runs in-process with its output captured (a subprocess per example would cost seconds each).
The example budget is fixed and derandomised (the same cases on every run, no example database written), so the
module runs in about a minute on 2 cores; `pytest --hypothesis-show-statistics` prints how many cases each ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from cli.main import main

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ultramem-hypothesis")  # its caches stay out of the checkout

REPO = Path(__file__).resolve().parents[1]
EXIT_CODES = {0, 1, 2}  # cli/train.py, cli/sweep.py, cli/plots.py: done / failed / bad input
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _cli(*argv: Any) -> tuple[int, str]:
    """Exit code and everything printed; an exception escaping main() is a traceback the user would see."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as done:  # argparse
            rc = done.code if isinstance(done.code, int) else 2
    text = out.getvalue() + err.getvalue()
    assert "Traceback" not in text, text
    assert rc in EXIT_CODES, (rc, text)
    return rc, text


# ---- generators: schema-shaped documents, then corruption ------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**12)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested dict/list document (the root included)."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@st.composite
def corrupted(draw: Any, doc: Any) -> Any:
    """The document with 0-3 structural edits: a field replaced by any value, removed, or an unknown key added."""
    doc = json.loads(json.dumps(doc))  # a private copy
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        edit = draw(st.sampled_from(["replace", "delete", "add"]))
        if edit == "add":
            target = doc
            for key in path:
                target = target[key]
            if isinstance(target, dict):
                target[draw(st.text(min_size=1, max_size=8))] = draw(values)
            continue
        doc = _set(doc, path, draw(values), delete=edit == "delete" and bool(path))
    return doc


@st.composite
def file_bytes(draw: Any, doc: Any, fmt: str) -> bytes:
    """A corrupted document serialised (YAML or JSON), and sometimes then damaged as bytes."""
    doc = draw(corrupted(doc))
    text = (yaml.safe_dump(doc, allow_unicode=True) if fmt == "yaml"
            else json.dumps(doc, allow_nan=True))
    data = text.encode()
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "random"]))
    if damage == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    elif damage == "random":
        data = draw(st.binary(max_size=64))
    return data


def _sweep_doc(out: str) -> dict[str, Any]:
    return {"name": "fuzz", "method": "grid", "output_dir": out,
            "base": {"data": {"source": "embedded"},
                     "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "lr": 1e-3, "schedule": "cosine"}},
            "parameters": {"model.preset": {"values": ["dense-t1", "moe-t1-2in12"]},
                           "train.lr": {"values": [1e-3, 2e-3]}},
            "seeds": [0], "resources": {"default": {"cpus": 1, "memory_gb": 1}}, "wandb": {"mode": "disabled"}}


def _shipped_sweep(name: str, out: str) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "sweeps" / name).read_text())
    doc["output_dir"] = out
    return doc


RUN_CONFIG = {"name": "fuzz", "seed": 0, "model": {"preset": "dense-t1"},
              "data": {"source": "embedded", "tokenizer": "byte", "val_fraction": 0.05},
              "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "lr": 1e-3, "warmup": 1, "log_every": 1,
                        "knowledge_probe": False},
              "parallel": {"nproc": 1}, "wandb": {"mode": "disabled"}}
STATUS = {"schema": 1, "state": "done", "step": 2, "total_steps": 2, "tokens": 64, "resumed_from": 0, "error": None,
          "attempts": 1, "node": "n", "name": "fuzz", "created_at": 1.0, "started_at": 1.0, "updated_at": 2.0,
          "finished_at": 2.0, "host": "elsewhere", "pid": 1}
FINAL = {"schema": 1, "run_id": "RID", "name": "fuzz", "sweep": "fuzz", "family": "dense", "preset": "dense-t1",
         "seed": 0, "train_loss": 3.0, "val_loss": 3.1,
         "params": {"total": 9000, "active": 9000, "embedding": 1000, "non_embedding": 8000,
                    "active_non_embedding": 8000, "sparse": 0},
         "total_params": 9000, "active_params": 9000, "non_embedding_params": 8000, "flops_per_token": 5.4e4,
         "tokens": 64, "flops": 3.5e6, "steps": 2, "batch_size": 2, "seq_len": 16, "lr": 1e-3, "memory": None,
         "moe": None, "knowledge": None, "wall_s": 1.0, "tokens_per_s": 64.0, "tokenizer": "byte",
         "vocab_size": 257, "data_source": "embedded"}
MARKER = {"schema": 1, "run_id": "RID", "created_at": 1.0}
METRICS = [{"kind": "train", "step": 1, "tokens": 32, "flops": 1.7e6, "loss": 5.5, "aux_loss": 0.0, "aux": {},
            "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "time": 1.0},
           {"kind": "eval", "step": 2, "tokens": 64, "flops": 3.5e6, "val_loss": 3.1, "time": 2.0}]


@st.composite
def run_folder(draw: Any) -> dict[str, bytes | None]:
    """The files of one run folder, each schema-shaped then maybe corrupted, or missing."""
    def maybe(data: st.SearchStrategy) -> bytes | None:
        return draw(st.none() | data) if draw(st.booleans()) else draw(data)

    metrics = b"".join(draw(file_bytes(m, "json")) + b"\n" for m in METRICS) + draw(st.binary(max_size=8))
    return {"config.yaml": maybe(file_bytes(RUN_CONFIG, "yaml")), "status.json": maybe(file_bytes(STATUS, "json")),
            "final.json": maybe(file_bytes(FINAL, "json")), "run.json": maybe(file_bytes(MARKER, "json")),
            "metrics.jsonl": metrics}


def _write_run(root: Path, name: str, files: dict[str, bytes | None]) -> None:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        if data is not None:
            (folder / fname).write_bytes(data.replace(b"RID", name.encode()))


# ---- the properties -------------------------------------------------------------------------------------------------


@settings(max_examples=150, **FUZZ)
@given(base=st.sampled_from(["grid", "tiny_cpu.yaml", "isoflop_tiny.yaml", "wsd_branches_tiny.yaml"]),
       data=st.data())
def test_sweep_plan_never_prints_a_traceback(base, data):
    with tempfile.TemporaryDirectory(prefix="fuzz-plan-") as tmp:
        out = str(Path(tmp) / "runs")
        doc = _sweep_doc(out) if base == "grid" else _shipped_sweep(base, out)
        path = Path(tmp) / "sweep.yaml"
        path.write_bytes(data.draw(file_bytes(doc, "yaml")))
        _cli("sweep", "plan", path, "--format", data.draw(st.sampled_from(["table", "json"])))
        assert not Path(out).exists()  # planning writes nothing


@settings(max_examples=60, **FUZZ)
@given(sweep=st.binary(max_size=0) | file_bytes(_sweep_doc("runs"), "yaml"), folders=st.lists(run_folder(),
                                                                                              min_size=1, max_size=3))
def test_sweep_status_never_prints_a_traceback(sweep, folders):
    with tempfile.TemporaryDirectory(prefix="fuzz-status-") as tmp:
        root = Path(tmp)
        path = root / "sweep.yaml"
        good = yaml.safe_dump(_sweep_doc(str(root / "runs"))).encode()
        path.write_bytes(sweep or good)
        for i, files in enumerate(folders):
            _write_run(root / "runs", f"run{i}", files)
        # the sweep's own runs too: the planned ids of the good file get the fuzzed records
        from experiments.sweep import plan_sweep

        (root / "good.yaml").write_bytes(good)
        for run, files in zip(plan_sweep(root / "good.yaml").runs, folders, strict=False):
            _write_run(root / "runs", run.run_id, files)
        for fmt in ("table", "json"):
            _cli("sweep", "status", path, "--format", fmt)


@settings(max_examples=10, **FUZZ)
@given(folders=st.lists(run_folder(), min_size=1, max_size=3))
def test_plots_never_prints_a_traceback(folders):
    with tempfile.TemporaryDirectory(prefix="fuzz-plots-") as tmp:
        root = Path(tmp)
        for i, files in enumerate(folders):
            _write_run(root / "runs", f"run{i}", files)
        _cli("plots", root / "runs", "--out", root / "report", "--bootstrap", "4")


@settings(max_examples=100, **FUZZ)
@given(config=file_bytes(RUN_CONFIG, "yaml"),
       overrides=st.lists(st.sampled_from(["train.lr", "train.steps", "seed", "model.preset", "data.val_fraction",
                                           "train.tokens", "train.batch_size", "model.memory.top_m", "nonsense",
                                           "train.schedule", "parallel.nproc"]).flatmap(
           lambda key: st.text(max_size=8).map(lambda v: f"{key}={v}")), max_size=2))
def test_train_validation_never_prints_a_traceback(config, overrides):
    """Every config is refused or accepted by validation; an accepted one then meets an --out folder holding a
    foreign file, so nothing trains (the refusal comes after validation and resolution)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-train-") as tmp:
        root = Path(tmp)
        (root / "run.yaml").write_bytes(config)
        (root / "out").mkdir()
        (root / "out" / "notes.txt").write_text("not a run\n")
        args = ["train", root / "run.yaml", "--out", root / "out"]
        for item in overrides:
            args += ["--set", item]
        rc, text = _cli(*args)
        assert rc == 2, text  # refused: a bad config, or the foreign folder
        assert sorted(p.name for p in (root / "out").iterdir()) == ["notes.txt"]

