"""Collecting run folders (written with the run store's own writers) into the runs and curves tables."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from analysis.checks import FitError
from analysis.collect import (
    collect_runs,
    final_to_row,
    load_collected,
    load_table,
    merge_collected,
    read_inference_benchmark,
    save_collected,
    unflatten,
)
from runfolder import RunDir

FINAL = {
    "run_id": "ultramem-abc", "name": "um-t1", "sweep": "tiny", "family": "ultramem", "preset": "ultramem-t1",
    "seed": 0, "train_loss": 2.51, "val_loss": 2.47,
    "params": {"total": 900_000, "active": 150_000, "embedding": 16_384, "non_embedding": 883_616,
               "active_non_embedding": 133_616, "sparse": 750_000},
    "total_params": 900_000, "active_params": 150_000, "non_embedding_params": 883_616,
    "flops_per_token": 1.1e6, "tokens": 600_000, "flops": 6.6e11, "steps": 100, "batch_size": 24, "seq_len": 256,
    "lr": 2e-3, "memory": {"num_values": 4096, "top_m": 16, "heads": 2, "value_expansion": 4, "num_layers": 1,
                           "value_params": 750_000},
    "moe": None, "knowledge": {"facts": 300, "recall": 0.4, "heldout_recall": 0.1, "bits_stored": 900.0},
    "wall_s": 60.0, "tokens_per_s": 10_000.0, "tokenizer": "byte", "vocab_size": 256, "data_source": "embedded",
}
CONFIG = {"name": "um-t1", "model": {"family": "ultramem", "n_layers": 2, "d_model": 64}}


def _write(root, run_id, final, config=CONFIG, state="done", metrics=()):
    rd = RunDir(root / run_id)
    rd.write_config(config)
    rd.update_status(state=state)
    for rec in metrics:
        rd.append_metrics(rec)
    if final is not None:
        rd.write_final(final)
    return rd


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    metrics = [{"kind": "train", "step": 10, "tokens": 1e5, "flops": 1e11, "loss": 3.1},
               {"kind": "eval", "step": 10, "tokens": 1e5, "flops": 1e11, "val_loss": 3.0},
               {"kind": "train", "step": 20, "tokens": 2e5, "flops": 2e11, "loss": 2.9}]
    rd = _write(root, "ultramem-abc", FINAL, metrics=metrics)
    with open(rd.metrics_path, "a") as f:
        f.write('{"kind": "train", "step": 30, "lo')  # torn last line of a killed writer
    dense = {**FINAL, "run_id": "dense-xyz", "family": "dense", "memory": None, "knowledge": None, "val_loss": 2.9,
             "total_params": 150_000, "params": {**FINAL["params"], "total": 150_000, "sparse": 0}}
    _write(root, "dense-xyz", dense, config={"model": {"family": "dense", "n_layers": 2, "d_model": 64}})
    _write(root, "moe-pending", None, config={"model": {"family": "moe"}}, state="running")
    return root


def test_one_row_per_finished_run_with_its_values(runs_dir):
    c = collect_runs(runs_dir, cache=False)
    assert list(c.runs["run_id"]) == ["dense-xyz", "ultramem-abc"]  # sorted by family, then size
    assert c.skipped == ["moe-pending (running)"]
    um = c.runs.set_index("run_id").loc["ultramem-abc"]
    assert um["val_loss"] == 2.47 and um["active_params"] == 150_000 and um["total_params"] == 900_000
    assert um["sparse_params"] == 750_000 and um["memory_slots"] == 4096 and um["memory_top_m"] == 16
    assert um["knowledge_recall"] == 0.4 and um["knowledge_facts"] == 300
    assert um["backbone"] == "L2-d64" and um["state"] == "done" and um["run_dir"] == "ultramem-abc"
    dense = c.runs.set_index("run_id").loc["dense-xyz"]
    assert math.isnan(dense["memory_slots"]) and math.isnan(dense["knowledge_recall"])


def test_curves_are_long_and_skip_a_torn_line(runs_dir):
    curves = collect_runs(runs_dir, cache=False).curves
    um = curves[curves["run_id"] == "ultramem-abc"]
    assert list(um["kind"]) == ["train", "eval", "train"]
    assert list(um["loss"]) == [3.1, 3.0, 2.9]  # eval rows carry val_loss
    assert list(um["tokens"]) == [1e5, 1e5, 2e5]


def test_cache_is_reused_and_invalidated_by_a_changed_file(runs_dir):
    first = collect_runs(runs_dir)
    assert (runs_dir / ".analysis_cache" / "runs.parquet").exists()
    pd.testing.assert_frame_equal(collect_runs(runs_dir).runs, first.runs)
    RunDir(runs_dir / "ultramem-abc").write_final({**FINAL, "val_loss": 2.0})
    again = collect_runs(runs_dir).runs.set_index("run_id")
    assert again.loc["ultramem-abc", "val_loss"] == 2.0


def test_saved_tables_read_back_to_the_same_numbers(runs_dir, tmp_path):
    c = collect_runs(runs_dir, cache=False)
    save_collected(c, tmp_path / "out")
    back = load_collected(tmp_path / "out" / "runs.csv")
    for col in ("val_loss", "flops", "active_params", "memory_slots", "knowledge_recall"):
        pd.testing.assert_series_equal(back.runs[col], c.runs[col], check_dtype=False)
    assert len(back.curves) == len(c.curves)
    assert len(load_collected(tmp_path / "out").runs) == 2  # a folder holding runs.csv


def test_a_study_in_parts_merges_the_committed_table_with_new_run_folders(runs_dir, tmp_path):
    # part 1 was committed as tables (its run folders are gone); part 2 trained one new run and, again, dense-xyz
    save_collected(collect_runs(runs_dir, cache=False), tmp_path / "part1")
    part2 = tmp_path / "part2"
    _write(part2, "moe-new", {**FINAL, "run_id": "moe-new", "family": "moe", "memory": None, "val_loss": 2.7},
           config={"model": {"family": "moe", "n_layers": 2, "d_model": 64}},
           metrics=[{"kind": "eval", "step": 5, "tokens": 5e4, "flops": 5e10, "val_loss": 2.8}])
    _write(part2, "dense-xyz", {**FINAL, "run_id": "dense-xyz", "family": "dense", "memory": None, "val_loss": 2.8},
           config={"model": {"family": "dense", "n_layers": 2, "d_model": 64}})
    merged, notes = merge_collected([("part1", load_collected(tmp_path / "part1" / "runs.csv")),
                                     ("part2", collect_runs(part2, cache=False))])
    by_id = merged.runs.set_index("run_id")
    assert sorted(by_id.index) == ["dense-xyz", "moe-new", "ultramem-abc"]  # no run twice
    assert by_id.loc["dense-xyz", "val_loss"] == 2.8  # the later source wins
    assert by_id.loc["ultramem-abc", "val_loss"] == 2.47  # the committed part is kept
    assert sorted(set(merged.curves["run_id"])) == ["moe-new", "ultramem-abc"]
    assert notes == ["part2: replaces 1 run(s) of part1; val_loss differs for dense-xyz"]
    again, notes = merge_collected([("all", merged), ("part2", collect_runs(part2, cache=False))])
    pd.testing.assert_frame_equal(again.runs, merged.runs)  # merging a part twice changes nothing
    assert notes == ["part2: replaces 2 run(s) of all (same val_loss)"]


def test_plots_cli_wants_an_out_folder_for_several_sources(runs_dir, tmp_path, capsys):
    from cli.main import main

    save_collected(collect_runs(runs_dir, cache=False), tmp_path / "part1")
    assert main(["plots", str(tmp_path / "part1" / "runs.csv"), str(runs_dir)]) == 2
    assert "several sources: give --out" in capsys.readouterr().err


def test_wandb_summary_round_trip_gives_the_same_row():
    from experiments.tracking import flatten

    flat = flatten(FINAL)  # what the W&B mirror stores in a run's summary
    assert "params/total" in flat
    a, b = final_to_row(unflatten(flat), CONFIG), final_to_row(FINAL, CONFIG)
    assert {k: v for k, v in a.items() if v == v} == {k: v for k, v in b.items() if v == v}  # nan != nan


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FitError, match="nothere.csv: file not found"):
        load_table(tmp_path / "nothere.csv")
    bad = tmp_path / "runs.txt"
    bad.write_text("a,b\n")
    with pytest.raises(FitError, match=r"runs\.txt: unsupported table format"):
        load_table(bad)
    other = tmp_path / "other.csv"
    other.write_text("x,y\n1,2\n")
    with pytest.raises(FitError, match=r"other\.csv: missing column\(s\) run_id, family, val_loss"):
        load_collected(other)
    with pytest.raises(FitError, match="runs directory not found"):
        collect_runs(tmp_path / "missing")


def test_inference_benchmark_rows(tmp_path):
    path = tmp_path / "inference.json"
    assert read_inference_benchmark(path) is None
    rows = [{"batch_size": b, "model": m, "latency_ms": 1.0 + b / 8} for b in (1, 8) for m in ("moe", "ultramem")]
    path.write_text(json.dumps({"benchmark": "inference", "rows": rows}))
    df = read_inference_benchmark(path)
    assert len(df) == 4 and set(df["family"]) == {"moe", "ultramem"}
