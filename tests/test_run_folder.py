"""The run folder's records and `run_state` (runfolder/), against hand-written files and real faults."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from analysis.collect import collect_runs
from runfolder import SCHEMA, Final, RecordError, RunDir, Status, TrainRow, is_claimed, run_state
from runfolder.atomic import atomic_write_text

FINAL = dict(run_id="dense-abc", name="d", sweep="s", family="dense", preset="dense-t1", seed=0, train_loss=2.5,
             val_loss=2.4, params={"total": 10, "active": 10, "embedding": 2, "non_embedding": 8,
                                   "active_non_embedding": 8, "sparse": 0},
             total_params=10, active_params=10, non_embedding_params=8, flops_per_token=60.0, tokens=1000,
             flops=6e4, steps=10, batch_size=2, seq_len=50, lr=1e-3)


def test_records_round_trip_and_carry_their_schema(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.write_final(Final(**FINAL))
    on_disk = json.loads(rd.final_path.read_text())
    assert on_disk["schema"] == SCHEMA == 1 and on_disk["val_loss"] == 2.4
    assert rd.read_final() == Final(**FINAL)
    st = rd.update_status(state="running", step=3, attempts=1)
    assert json.loads(rd.status_path.read_text())["schema"] == 1 and st.started_at is not None
    row = TrainRow(step=1, tokens=5, flops=1.0, loss=2.0, aux_loss=0.0, aux={}, lr=1e-3, grad_norm=1.0)
    assert "comm_bytes" not in row.to_dict() and row.to_dict()["kind"] == "train"


def test_a_record_without_schema_reads_as_schema_1_and_unknown_keys_or_newer_schemas_are_refused(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    rd.final_path.write_text(json.dumps(FINAL))  # written before records had a schema
    assert rd.read_final().schema == 1
    rd.final_path.write_text(json.dumps({**FINAL, "surprise": 1}))
    with pytest.raises(RecordError, match=r"final.json: unknown key\(s\) surprise"):
        rd.read_final()
    rd.status_path.write_text(json.dumps({"state": "done", "schema": 99}))
    with pytest.raises(RecordError, match="schema 99 is newer"):
        rd.read_status()
    rd.status_path.write_text(json.dumps({"state": "done", "step": "ten"}))
    with pytest.raises(RecordError, match="`step` is 'ten'"):
        rd.read_status()
    with pytest.raises(TypeError):
        Final(**FINAL, surprise=1)  # writing an unknown field is a programming error


def test_run_state_from_the_files_and_the_locks(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert run_state(rd).state == "pending"
    rd.update_status(state="running")  # written by this (live) process
    assert run_state(rd).state == "running"
    status = json.loads(rd.status_path.read_text())
    atomic_write_text(rd.status_path, json.dumps({**status, "pid": 2**22 + 12345}))  # no such process
    assert run_state(rd).state == "interrupted"
    with rd.claim() as ours:  # a scheduler holds it: running again (in another process, see is_claimed)
        assert ours
        out = subprocess.run([sys.executable, "-c", "import sys; from runfolder import RunDir, run_state; "
                              "print(run_state(RunDir(sys.argv[1])).state)", str(rd.path)],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == "running"
    rd.update_status(state="done")
    assert run_state(rd).state == "interrupted"  # done without final.json: resumed, not skipped
    rd.write_final(FINAL)
    now = run_state(rd)
    assert now.state == "done" and now.finished and now.final.val_loss == 2.4
    rd.update_status(state="failed", error="boom")
    assert run_state(rd).state == "failed"


def test_damaged_files_make_the_run_unreadable_and_a_status_update_replaces_them(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.update_status(state="done")
    rd.write_final(FINAL)
    rd.final_path.write_text('{"val_loss": 2.4, "trunc')
    now = run_state(rd)
    assert now.state == "unreadable" and str(rd.final_path) in now.detail and "not valid JSON" in now.detail
    rd.status_path.write_text("garbage{{")
    assert run_state(rd).state == "unreadable"
    st = rd.update_status(state="pending", attempts=0)
    assert st.state == "pending" and run_state(rd).state == "pending"


def test_collect_leaves_an_unreadable_run_out_and_names_it(tmp_path):
    root = tmp_path / "runs"
    for rid, loss in (("dense-a", 2.4), ("dense-b", 2.2)):
        rd = RunDir(root / rid)
        rd.write_config({"model": {"family": "dense"}})
        rd.write_final({**FINAL, "run_id": rid, "val_loss": loss})
        rd.update_status(state="done")
    (root / "dense-b" / "status.json").write_text("garbage{{")
    c = collect_runs(root, cache=False)
    assert list(c.runs["run_id"]) == ["dense-a"]
    assert len(c.skipped) == 1 and c.skipped[0].startswith("dense-b (unreadable: ")
    assert "status.json: not valid JSON" in c.skipped[0]


@pytest.mark.ray
def test_sweep_status_and_run_survive_a_garbage_status_json(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(textwrap.dedent(f"""
        name: s
        output_dir: {tmp_path / 'runs'}
        base:
          data: {{source: embedded}}
          model: {{preset: dense-tiny}}
          train: {{steps: 4, log_every: 2, eval_every: 1000, eval_batches: 1, knowledge_probe: false,
                   batch_size: 2, seq_len: 32}}
        parameters: {{seed: {{values: [0, 1]}}}}
        """))
    cli = [sys.executable, "-m", "cli", "sweep"]
    subprocess.run(cli + ["run", str(sweep), "--backend", "local"], check=True, capture_output=True, timeout=300)
    runs = sorted((tmp_path / "runs").iterdir())
    (runs[0] / "status.json").write_text("garbage{{")
    out = subprocess.run(cli + ["status", str(sweep), "--format", "json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {r["run_id"]: r for r in json.loads(out.stdout)["runs"]}
    assert rows[runs[0].name]["state"] == "unreadable" and "status.json" in rows[runs[0].name]["error"]
    assert rows[runs[1].name]["state"] == "done"
    again = subprocess.run(cli + ["run", str(sweep), "--backend", "local"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert run_state(RunDir(runs[0])).state == "done" and run_state(RunDir(runs[1])).state == "done"
    assert isinstance(Status.from_dict(json.loads((runs[0] / "status.json").read_text())), Status)


def test_train_refuses_an_out_folder_that_holds_something_else_unless_forced(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "final.json").write_text('{"mine": "not a run"}\n')
    cmd = [sys.executable, "-m", "cli", "train", "--preset", "dense-tiny", "--data", "embedded", "--steps", "2",
           "--set", "train.batch_size=2", "--set", "train.seq_len=32", "--set", "train.eval_batches=1",
           "--set", "train.knowledge_probe=false", "--out", str(out)]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr
    assert f"{out} is not empty and is not a run folder (it holds final.json)" in refused.stderr
    assert (out / "final.json").read_text() == '{"mine": "not a run"}\n' and not (out / "config.yaml").exists()
    forced = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr
    marker = json.loads((out / "run.json").read_text())
    assert run_state(RunDir(out)).state == "done" and marker["run_id"].startswith("dense-")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # now ours: a re-run is a no-op
    assert again.returncode == 0, again.stderr


def test_plots_on_a_folder_without_runs_leaves_no_empty_report_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    out = tmp_path / "report"
    res = subprocess.run([sys.executable, "-m", "cli", "plots", str(tmp_path / "runs"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no finished runs" in res.stderr
    assert not out.exists()


def test_plots_help_names_the_report_folder_it_really_writes():
    from analysis.report import default_out_dir
    from experiments.sweep import sweep_runs_dir

    real = default_out_dir(sweep_runs_dir(Path(__file__).resolve().parents[1] / "sweeps" / "tiny_cpu.yaml"))
    assert real.name == "tiny-cpu_report"
    helptext = subprocess.run([sys.executable, "-m", "cli", "plots", "-h"], capture_output=True, text=True,
                              check=True).stdout
    assert f"runs/{real.name}/" in helptext and "tiny_cpu_report" not in helptext


def test_atomic_writes_get_the_mode_a_plain_open_would_give(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    with open(tmp_path / "b.json", "w") as f:
        f.write("{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777


def test_probing_the_claim_writes_nothing_into_the_claim_file(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    rd.claim_path.write_text("node-7 4242\n")  # another scheduler claimed it once and let go: its record stays
    before = rd.claim_path.read_bytes()
    assert not is_claimed(rd)
    assert rd.claim_path.read_bytes() == before  # a probe must not rewrite another process's claim record
