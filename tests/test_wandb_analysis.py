"""W&B as a view of a study: runs chart losses against FLOPs (define_metric), and `ultramem plots --wandb` logs the
analysis as one `analysis` run per sweep, versioned on re-logging. Checked in offline mode by reading the files W&B
writes (tests/wandb_records.py), never by mocking wandb."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
from wandb_records import of_type, wait_for_exit

from analysis.wandb_report import fit_tables, run_id, target
from experiments.config import run_config_from_dict
from experiments.trainer import train
from runfolder import RunDir

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "docs" / "results" / "study_memory"  # the smallest committed study: 5 runs


def _offline_runs(folder: Path) -> list[Path]:
    return sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))


def test_a_run_charts_its_losses_against_flops_and_the_rest_against_tokens(tmp_path, shakespeare_path,
                                                                          monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = run_config_from_dict({
        "sweep": "axes-test", "model": {"preset": "dense-t1"},
        "data": {"source": str(shakespeare_path), "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 2, "batch_size": 4, "seq_len": 32, "log_every": 1, "eval_every": 2, "eval_batches": 1,
                  "threads": 1, "knowledge_probe": False},
        "wandb": {"mode": "offline", "project": "um-test"},
    }, "test")
    train(cfg, tmp_path / "run")
    [path] = _offline_runs(tmp_path / "run")
    metrics = {m.name: m.step_metric for m in of_type(wait_for_exit(path), "metric") if m.name}
    assert metrics["loss"] == metrics["val_loss"] == "flops"
    assert metrics["lr"] == metrics["grad_norm"] == "tokens"
    assert "flops" in metrics and "tokens" in metrics  # the axes themselves are declared
    history = [{i.key: i.value_json for i in h.item} for h in of_type(wait_for_exit(path), "history")]
    assert all("flops" in row and "tokens" in row for row in history if "loss" in row)  # every loss row has both


def test_fit_tables_flatten_the_laws_and_every_list_of_records():
    fits = {
        "scaling": {"flops": {"dense": {"n_runs": 4, "reason": "", "fit": {
            "law": "PowerLaw", "formula": "L = 1 + 2x^-0.1", "n_points": 4, "level": 0.95, "note": "",
            "estimates": {"A": {"value": 2.0, "lo": 1.5, "hi": 2.5},
                          "alpha": {"value": 0.1, "lo": 0.05, "hi": 0.2, "reliable": False}}}}}},
        "claims": [{"claim": "c1", "verdict": "yes"}, {"claim": "c2", "verdict": "no", "extra": [1, 2]}],
        "isoflop": {"multipliers": [{"M": 1.5, "ci": {"lo": 1.0, "hi": 2.0}}], "note": "x"},
        "level": 0.95,
    }
    tables = fit_tables(fits)
    assert sorted(tables) == ["fits", "fits/claims", "fits/isoflop/multipliers"]
    cols, rows = tables["fits"]
    assert dict(zip(cols, rows[0], strict=True)) == {
        "x": "flops", "family": "dense", "n_runs": 4, "law": "PowerLaw", "formula": "L = 1 + 2x^-0.1",
        "n_points": 4, "level": 0.95, "reason": "", "A": 2.0, "A_lo": 1.5, "A_hi": 2.5, "A_reliable": True,
        "alpha": 0.1, "alpha_lo": 0.05, "alpha_hi": 0.2, "alpha_reliable": False}
    cols, rows = tables["fits/claims"]
    assert cols == ["claim", "verdict", "extra"]
    assert rows == [["c1", "yes", None], ["c2", "no", "[1, 2]"]]
    assert tables["fits/isoflop/multipliers"] == (["M", "ci/lo", "ci/hi"], [[1.5, 1.0, 2.0]])


def test_the_target_is_the_runs_project_and_group(tmp_path):
    rd = RunDir(tmp_path / "runs" / "dense-0123456789")
    rd.write_config({"sweep": "my-sweep", "wandb": {"project": "proj", "entity": "team", "mode": "disabled"}},
                    "dense-0123456789")
    assert target(tmp_path / "runs") == {"project": "proj", "entity": "team", "group": "my-sweep",
                                         "mode": "disabled"}
    runs = pd.DataFrame({"sweep": ["a.b", "a.b", None]})
    assert target(tmp_path / "x" / "runs.csv", runs)["group"] == "a.b"
    assert run_id("a.b") == "a-b-analysis"


def test_plots_wandb_logs_figures_tables_and_report_and_a_second_call_versions_them(tmp_path):
    folder = tmp_path / "study_memory"
    folder.mkdir()
    for name in ("runs.csv", "curves.csv", "inference.json"):
        if (STUDY / name).exists():
            shutil.copy(STUDY / name, folder / name)
    cmd = [sys.executable, "-m", "cli", "plots", str(folder / "runs.csv"), "--bootstrap", "20", "--wandb"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "MPLBACKEND": "Agg"}
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    [path] = _offline_runs(folder)
    assert f"W&B:    {path.parent}" in first.stdout
    recs = wait_for_exit(path)

    runs = pd.read_csv(folder / "runs.csv")
    group = "+".join(sorted(set(runs["sweep"].dropna())))
    [run] = of_type(recs, "run")
    assert (run.run_id, run.project, run.run_group, run.job_type) == (run_id(group), "ultramem-scaling", group,
                                                                     "analysis")
    media = path.parent / "files" / "media"
    figures = sorted(p.stem for p in (folder / "figures").glob("*.png"))
    assert figures and sorted(p.name.rsplit("_", 2)[0] for p in (media / "images" / "figures").glob("*.png")) \
        == figures
    [runs_table] = (media / "table").glob("runs_*.table.json")
    logged = json.loads(runs_table.read_text())
    assert logged["columns"] == list(runs.columns) and len(logged["data"]) == len(runs)
    [fits_table] = (media / "table").glob("fits_*.table.json")
    fits = json.loads((folder / "fits.json").read_text())
    laws = [(x, fam) for x, fams in fits["scaling"].items() for fam in fams]
    rows = json.loads(fits_table.read_text())
    x, fam = rows["columns"].index("x"), rows["columns"].index("family")
    assert [(r[x], r[fam]) for r in rows["data"]] == laws

    def report_artifacts(recs):
        return [a for a in of_type(recs, "artifact") if a.type == "analysis"]

    [art] = report_artifacts(recs)
    assert art.name == run_id(group)
    entries = {e.path: e.digest for e in art.manifest.contents}
    for name in ("report.md", "report.html", "fits.json", "runs.csv"):  # W&B's digest: base64 of the MD5
        assert entries[name] == base64.b64encode(hashlib.md5((folder / name).read_bytes()).digest()).decode()
    assert {f"figures/{f}.png" for f in figures} <= set(entries)

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    paths = _offline_runs(folder)
    assert len(paths) == 2  # one offline directory per call, to be synced in order ...
    recs2 = wait_for_exit(paths[1] if paths[0] == path else paths[0])
    [run2] = of_type(recs2, "run")
    assert run2.run_id == run.run_id  # ... into the same W&B run (resumed), not a second one
    [art2] = report_artifacts(recs2)
    assert art2.name == art.name  # a new version of the same artifact
    assert {e.path: e.digest for e in art2.manifest.contents}["report.md"] == entries["report.md"]
