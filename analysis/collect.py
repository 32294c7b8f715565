"""Run folders (docs/run_folder.md), W&B projects or saved tables -> one tidy table of runs and one of curves.

`runs`: one row per run that wrote final.json (RUN_COLUMNS). `curves`: one row per logged point (CURVE_COLUMNS):
training loss ("train") and held-out loss ("eval") against step, tokens and FLOPs. The runs columns in
DERIVED_COLUMNS (values_per_token) are computed from others on every way in (run folders, the cache, W&B, saved
tables, so a table saved before such a column existed gains it on load) and are left out of a saved runs.csv. Collecting a runs directory
caches both tables as parquet next to the runs (`.analysis_cache/`), keyed by the size and mtime of every file
read, so re-collecting an unchanged sweep costs one stat per file.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.checks import FitError
from runfolder import RecordError, RunDir, atomic_write_text, iter_run_dirs, run_state

RUN_COLUMNS = [
    "run_id", "name", "sweep", "family", "preset", "seed", "state", "backbone", "n_layers", "d_model",
    "val_loss", "train_loss", "total_params", "active_params", "non_embedding_params", "embedding_params",
    "active_non_embedding_params", "sparse_params", "flops_per_token", "tokens", "flops", "steps", "batch_size",
    "seq_len", "lr", "memory_slots", "memory_top_m", "memory_heads", "memory_value_expansion", "memory_layers",
    "values_per_token", "moe_experts", "moe_top_k", "knowledge_facts", "knowledge_recall", "knowledge_heldout_recall",
    "knowledge_bits", "wall_s", "tokens_per_s", "tokenizer", "vocab_size", "data_source", "run_dir",
]
# Derived from other columns, never saved: values_per_token = memory value rows a token reads over all memory
# layers, heads x top-m x memory layers (the activation density of UltraMemV2 §2.6; NaN without a memory).
DERIVED_COLUMNS = ["values_per_token"]
CURVE_COLUMNS = ["run_id", "family", "kind", "step", "tokens", "flops", "loss"]
CACHE_DIR = ".analysis_cache"
TABLE_SUFFIXES = (".csv", ".parquet")


@dataclass
class Collected:
    runs: pd.DataFrame
    curves: pd.DataFrame
    skipped: list[str] = field(default_factory=list)  # "run_id (state)" of folders without final.json


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def final_to_row(final: dict[str, Any], config: dict[str, Any] | None = None, state: str = "done",
                 run_dir: str = "") -> dict[str, Any]:
    """One runs-table row from a final.json dict (and the run's resolved config.yaml, for the backbone shape)."""
    params = final.get("params") or {}
    memory = final.get("memory") or {}
    moe = final.get("moe") or {}
    knowledge = final.get("knowledge") or {}
    model = (config or {}).get("model") or {}
    model = model if isinstance(model, dict) else {}
    n_layers, d_model = model.get("n_layers"), model.get("d_model")
    row = {
        "run_id": final.get("run_id"), "name": final.get("name"), "sweep": final.get("sweep"),
        "family": final.get("family") or model.get("family"), "preset": final.get("preset"),
        "seed": final.get("seed"), "state": state,
        "backbone": f"L{n_layers}-d{d_model}" if n_layers and d_model else None,
        "n_layers": _num(n_layers), "d_model": _num(d_model),
        "val_loss": _num(final.get("val_loss")), "train_loss": _num(final.get("train_loss")),
        "total_params": _num(final.get("total_params", params.get("total"))),
        "active_params": _num(final.get("active_params", params.get("active"))),
        "non_embedding_params": _num(final.get("non_embedding_params", params.get("non_embedding"))),
        "embedding_params": _num(params.get("embedding")),
        "active_non_embedding_params": _num(params.get("active_non_embedding")),
        "sparse_params": _num(params.get("sparse")),
        "memory_slots": _num(memory.get("num_values")), "memory_top_m": _num(memory.get("top_m")),
        "memory_heads": _num(memory.get("heads")), "memory_value_expansion": _num(memory.get("value_expansion")),
        "memory_layers": _num(memory.get("num_layers")),
        "values_per_token": values_per_token(memory.get("heads"), memory.get("top_m"), memory.get("num_layers")),
        "moe_experts": _num(moe.get("num_experts")), "moe_top_k": _num(moe.get("top_k")),
        "knowledge_facts": _num(knowledge.get("facts")), "knowledge_recall": _num(knowledge.get("recall")),
        "knowledge_heldout_recall": _num(knowledge.get("heldout_recall")),
        "knowledge_bits": _num(knowledge.get("bits_stored")),
        "tokenizer": final.get("tokenizer"), "data_source": final.get("data_source"), "run_dir": run_dir,
    }
    for key in ("flops_per_token", "tokens", "flops", "steps", "batch_size", "seq_len", "lr", "wall_s",
                "tokens_per_s", "vocab_size"):
        row[key] = _num(final.get(key))
    return row


def values_per_token(heads: Any, top_m: Any, layers: Any) -> float:
    """Value rows one token reads over all memory layers: heads x top-m x memory layers (NaN if any is missing)."""
    return _num(heads) * _num(top_m) * _num(layers)


def derive_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with DERIVED_COLUMNS filled in where missing (NaN) from the columns they are computed from."""
    col = lambda c: pd.to_numeric(runs[c], errors="coerce") if c in runs else pd.Series(math.nan, index=runs.index)
    derived = col("memory_heads") * col("memory_top_m") * col("memory_layers")
    runs = runs.copy()
    runs["values_per_token"] = col("values_per_token").fillna(derived).astype(float)
    return runs


def metrics_to_curve(run_id: str, family: str | None, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Long-format curve rows; "train" rows carry the training loss, "eval" rows the held-out loss."""
    out = []
    for r in records:
        kind = r.get("kind")
        loss = r.get("loss") if kind == "train" else r.get("val_loss") if kind == "eval" else None
        if loss is None:
            continue
        out.append({"run_id": run_id, "family": family, "kind": kind, "step": _num(r.get("step")),
                    "tokens": _num(r.get("tokens")), "flops": _num(r.get("flops")), "loss": _num(loss)})
    return out


def _fingerprint(root: Path, dirs: list[RunDir]) -> str:
    parts = []
    for rd in dirs:
        for p in (rd.config_path, rd.status_path, rd.final_path, rd.metrics_path):
            st = p.stat() if p.exists() else None
            parts.append([str(p.relative_to(root)), st.st_size if st else -1, st.st_mtime_ns if st else -1])
    return json.dumps(parts)


def _frames(rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = derive_columns(pd.DataFrame(rows, columns=RUN_COLUMNS))
    runs = runs.sort_values(["family", "active_params", "memory_slots", "run_id"], kind="stable",
                            na_position="first").reset_index(drop=True)
    return runs, pd.DataFrame(curves, columns=CURVE_COLUMNS)


def collect_runs(runs_dir: str | Path, *, cache: bool = True) -> Collected:
    """Every run folder below `runs_dir` that wrote final.json; the others are listed in `skipped`."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise FitError(f"{root}: runs directory not found")
    dirs = list(iter_run_dirs(root))
    cache_dir = root / CACHE_DIR
    key = _fingerprint(root, dirs)
    if cache and (cache_dir / "key.json").exists() and (cache_dir / "key.json").read_text() == key:
        skipped = json.loads((cache_dir / "skipped.json").read_text())
        return Collected(derive_columns(pd.read_parquet(cache_dir / "runs.parquet")),
                         pd.read_parquet(cache_dir / "curves.parquet"), skipped)
    rows, curves, skipped = [], [], []
    for rd in dirs:
        now = run_state(rd)
        if now.final is None:
            skipped.append(f"{rd.run_id} ({now.state}: {now.detail})" if now.detail else f"{rd.run_id} ({now.state})")
            continue
        try:
            config = rd.read_config()
        except RecordError as err:  # listed like an unreadable status.json, and the others are collected
            skipped.append(f"{rd.run_id} (unreadable: {err})")
            continue
        row = final_to_row(now.final.to_dict(), config, now.state, str(rd.path.relative_to(root)))
        row["run_id"] = row["run_id"] or rd.run_id
        rows.append(row)
        curves += metrics_to_curve(row["run_id"], row["family"], rd.metrics())
    out = Collected(*_frames(rows, curves), skipped)
    if cache:
        _write_cache(cache_dir, out, key)
    return out


def _write_cache(cache_dir: Path, collected: Collected, key: str) -> None:
    try:
        cache_dir.mkdir(exist_ok=True)
        collected.runs.to_parquet(cache_dir / "runs.parquet", index=False)
        collected.curves.to_parquet(cache_dir / "curves.parquet", index=False)
        atomic_write_text(cache_dir / "skipped.json", json.dumps(collected.skipped))
        atomic_write_text(cache_dir / "key.json", key)  # last: a half-written cache is never taken as valid
    except OSError:
        pass  # a read-only results folder is analysed all the same, just not cached


def load_table(path: str | Path, *, lines: bool = False) -> pd.DataFrame:
    """A CSV or parquet table; errors name the file and say what to fix.

    lines=True: for a CSV, `df.attrs["lines"]` holds the line of the file of each data row (the header is line 1,
    so data row N is line N + 1 unless blank lines intervene), for error messages (analysis.checks).
    """
    path = Path(path)
    if not path.is_file():
        raise FitError(f"{path}: " + ("is a folder, not a table" if path.is_dir() else "file not found")
                       + "; give the path of a .csv or .parquet file")
    if path.suffix not in TABLE_SUFFIXES:
        raise FitError(f"{path}: unsupported table format {path.suffix!r}; use {' or '.join(TABLE_SUFFIXES)}")
    try:
        df = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except (ValueError, OSError) as err:
        why = " ".join(str(err).split())  # pandas' parser messages end in a newline: keep the error on one line
        raise FitError(f"{path}: cannot read the table ({why}); it must be a {path.suffix[1:]} file with a header "
                       "row and the same number of fields on every line") from None
    if lines and path.suffix == ".csv":
        found = _csv_data_lines(path)
        if found is not None and len(found) == len(df):
            df.attrs["lines"] = found
    return df


def _csv_data_lines(path: Path) -> list[int] | None:
    """The first line of each data record of a CSV (blank lines skipped, as pandas does); None if unreadable."""
    try:
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
            reader, starts, end = csv.reader(f), [], 0
            for record in reader:
                start, end = end + 1, reader.line_num
                if record and not (len(record) == 1 and not record[0].strip()):
                    starts.append(start)
    except (OSError, csv.Error):
        return None
    return starts[1:]  # the first record is the header


def save_collected(collected: Collected, out_dir: str | Path) -> list[Path]:
    """runs.csv and curves.csv: the plain-text record a study commits instead of run folders and checkpoints.

    Floats are written as their shortest round-trip repr, so reading the files back gives the very same numbers.
    DERIVED_COLUMNS are left out (load_collected derives them again), so the saved format does not change when a
    derived column is added.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "runs.csv", out / "curves.csv"]
    runs = collected.runs.drop(columns=[c for c in DERIVED_COLUMNS if c in collected.runs])
    atomic_write_text(paths[0], runs.to_csv(index=False))
    atomic_write_text(paths[1], collected.curves.to_csv(index=False))
    return paths


def load_collected(path: str | Path) -> Collected:
    """A runs directory, a saved runs table (runs.csv / runs.parquet, curves.* beside it) or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        saved = [path / f"runs{s}" for s in TABLE_SUFFIXES if (path / f"runs{s}").exists()]
        if not saved or any(True for _ in iter_run_dirs(path)):
            return collect_runs(path)
        path = saved[0]
    runs = load_table(path)
    missing = [c for c in ("run_id", "family", "val_loss") if c not in runs.columns]
    if missing:
        raise FitError(f"{path}: missing column(s) {', '.join(missing)}; expected a runs table written by "
                       "`ultramem plots` (runs.csv) or a runs directory")
    runs = runs.reindex(columns=RUN_COLUMNS + [c for c in runs.columns if c not in RUN_COLUMNS])
    curves_path = next((path.with_name(f"curves{s}") for s in TABLE_SUFFIXES
                        if path.with_name(f"curves{s}").exists()), None)
    curves = load_table(curves_path) if curves_path else pd.DataFrame(columns=CURVE_COLUMNS)
    return Collected(*_frames(runs.to_dict("records"), curves.to_dict("records")))


def merge_collected(parts: list[tuple[str, Collected]]) -> tuple[Collected, list[str]]:
    """One table from several sources (a study trained in parts: the committed table of the parts done so far plus
    the run folders of the part just trained). A run id found in more than one source is taken from the last one
    (its runs row and its curve), so re-collecting a part that was already merged changes nothing; the returned
    notes say how many rows each later source replaced, and which runs had a different val_loss there."""
    if len(parts) == 1:
        return parts[0][1], []
    runs, curves, skipped, notes = [], [], [], []
    seen: dict[str, tuple[str, float]] = {}
    for label, c in parts:
        losses = dict(zip(c.runs["run_id"].astype(str), c.runs["val_loss"], strict=True))
        clash = sorted(losses.keys() & seen.keys())
        if clash:
            moved = [r for r in clash if not _same_loss(seen[r][1], losses[r])]
            notes.append(f"{label}: replaces {len(clash)} run(s) of {', '.join(sorted({seen[r][0] for r in clash}))}"
                         + (f"; val_loss differs for {', '.join(moved[:5])}{' ...' if len(moved) > 5 else ''}"
                            if moved else " (same val_loss)"))
            runs = [df[~df["run_id"].astype(str).isin(clash)] for df in runs]
            curves = [df[~df["run_id"].astype(str).isin(clash)] for df in curves]
        seen.update({r: (label, v) for r, v in losses.items()})
        runs.append(c.runs)
        curves.append(c.curves)
        skipped += c.skipped
    merged = pd.concat([r for r in runs if not r.empty] or [runs[0]], ignore_index=True)
    merged_curves = pd.concat([c for c in curves if not c.empty] or [curves[0]], ignore_index=True)
    return Collected(*_frames(merged.to_dict("records"), merged_curves.to_dict("records")), skipped), notes


def _same_loss(a: Any, b: Any) -> bool:
    fa, fb = _num(a), _num(b)
    return (math.isnan(fa) and math.isnan(fb)) or fa == fb


def collect_wandb(path: str) -> Collected:
    """Runs of a W&B project ("entity/project") through the public API; needs network access and a login.

    The trainer mirrors final.json into each run's summary, flattened with "/" (experiments/tracking.py), so the
    rows come from the same conversion as run folders. Training curves are not fetched (use the run folders).
    """
    import wandb

    rows = []
    for run in wandb.Api().runs(path):
        final = unflatten(dict(run.summary))
        if "val_loss" not in final:
            continue
        final.setdefault("run_id", run.name)
        rows.append(final_to_row(final, {"model": unflatten(dict(run.config)).get("model")}, run.state, run.url))
    return Collected(*_frames(rows, []))


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{'params/total': 1} -> {'params': {'total': 1}} (the inverse of the W&B mirror's flatten)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *heads, last = str(key).split("/")
        for h in heads:
            node = node.setdefault(h, {})
            if not isinstance(node, dict):
                break
        else:
            node[last] = value
    return out


def read_inference_benchmark(path: str | Path) -> pd.DataFrame | None:
    """Rows of the inference benchmark's JSON (batch_size, family or model, latency_ms, ...), None if absent."""
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rows = data.get("rows", data.get("results", [])) if isinstance(data, dict) else data
    df = pd.DataFrame(rows)
    if df.empty or not {"batch_size", "latency_ms"} <= set(df.columns):
        return None
    if "family" not in df.columns:
        df["family"] = df.get("model", "model")
    return df
