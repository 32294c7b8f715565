"""Figures, the report and the `ultramem fit` / `ultramem plots` commands, end to end on synthetic run folders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest

from analysis.collect import collect_runs, load_collected
from analysis.compare import fit_families
from analysis.fit import SOLVERS
from analysis.plots import plot_scaling, save
from analysis.report import analyse
from analysis.synthetic import write_synthetic_ladder, write_synthetic_memory_sweep
from cli import fit as fit_cmd
from cli import plots as plots_cmd


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    write_synthetic_ladder(root / "runs" / "ladder", sizes=3, seed=0)
    write_synthetic_memory_sweep(root / "runs" / "ladder", sizes=3, seed=0)
    bench = [{"batch_size": b, "family": f, "latency_ms": (1 + b / k), "moe_ultramem_latency_ratio": k / 2}
             for b in (1, 4, 16) for f, k in (("moe", 2.0), ("ultramem", 6.0))]
    (root / "inference.json").write_text(json.dumps({"rows": bench}))
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".analysis_cache" not in p.parts}


@pytest.mark.slow
def test_plots_command_writes_the_report_and_regenerates_identical_files(study, capsys):
    runs = study / "runs" / "ladder"
    argv = [str(runs), "--bootstrap", "50", "--bench", str(study / "inference.json")]
    assert plots_cmd.run(_parse(plots_cmd, argv)) == 0
    out = study / "runs" / "ladder_report"  # default: <runs_dir>/../<name>_report
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    first = _files(out)
    for name in ("report.md", "report.html", "fits.json", "runs.csv", "curves.csv", "inference.json"):
        assert name in first, name
    for stem in ("loss_vs_flops", "loss_vs_active_params", "loss_vs_total_params", "compute_multiplier",
                 "memory_size", "training_curves", "knowledge", "latency_vs_batch"):
        assert f"figures/{stem}.png" in first and f"figures/{stem}.svg" in first, stem
    assert first["figures/loss_vs_flops.png"].startswith(b"\x89PNG")
    report = first["report.md"].decode()
    assert "## The paper's claims, checked against these runs" in report
    assert "![Validation loss vs training compute C (FLOPs)" in report
    assert "<table>" in first["report.html"].decode()
    fits = json.loads(first["fits.json"])
    assert fits["scaling"]["flops"]["dense"]["fit"]["estimates"]["alpha"]["lo"] is not None

    # same inputs -> byte-identical outputs, from the run folders and from the saved runs table alike
    assert plots_cmd.run(_parse(plots_cmd, argv)) == 0
    assert _files(out) == first
    assert plots_cmd.run(_parse(plots_cmd, [str(out / "runs.csv"), "--bootstrap", "50"])) == 0
    assert _files(out) == first


@pytest.mark.slow
def test_plots_command_accepts_a_sweep_file(study, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: ladder\nparameters:\n  seed: {{values: [0]}}\noutput_dir: {study / 'runs' / 'ladder'}\n")
    out = tmp_path / "report"
    assert plots_cmd.run(_parse(plots_cmd, [str(sweep), "--out", str(out), "--bootstrap", "20"])) == 0
    assert (out / "report.md").exists() and (out / "figures" / "loss_vs_flops.svg").exists()
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"name: nothing\nparameters:\n  seed: {{values: [0]}}\noutput_dir: {tmp_path / 'none'}\n")
    assert plots_cmd.run(_parse(plots_cmd, [str(missing)])) == 2
    assert "run the sweep first" in capsys.readouterr().err


@pytest.mark.slow
def test_plots_solver_huber_resists_a_late_seed_that_pulls_least_squares_off(tmp_path):
    """A second UltraMem seed at one size trained late (1.5x the loss). The Huber-fitted law stays on the generating
    law at the other runs; least squares is pulled off it. The report and fits.json say which solver made them."""
    truth = write_synthetic_ladder(tmp_path / "runs" / "ladder", sizes=5, seed=0, late={"ultramem-3": 1.5})
    runs = tmp_path / "runs" / "ladder"
    true_law = lambda c: truth.dense(truth.multipliers["ultramem"] * c)  # noqa: E731
    finals = [json.loads((runs / f"ultramem-{i}" / "final.json").read_text()) for i in range(5)]
    worst = {}
    for solver in ("lsq", "huber"):
        out = tmp_path / solver
        argv = [str(runs), "--out", str(out), "--bootstrap", "20", "--solver", solver]
        assert plots_cmd.run(_parse(plots_cmd, argv)) == 0
        fits = json.loads((out / "fits.json").read_text())
        assert fits["solver"] == solver and f"`--solver {solver}`" in (out / "report.md").read_text()
        p = fits["scaling"]["flops"]["ultramem"]["fit"]["params"]
        worst[solver] = max(abs(p["E"] + p["A"] * f["flops"] ** -p["alpha"] - true_law(f["flops"])) / true_law(
            f["flops"]) for f in finals)
    assert worst["huber"] < 0.02 < 0.05 < worst["lsq"], worst


def test_claim_verdict_names_the_unidentified_law_on_the_committed_knowledge_runs():
    """docs/results/study_knowledge: with UltraMem-t4 seed 0 in, every least-squares bootstrap refit of the UltraMem
    law fails; the verdict says that (not "too few runs") and points at --solver huber, which gives an interval."""
    table = Path(__file__).resolve().parents[1] / "docs" / "results" / "study_knowledge" / "runs.csv"
    verdicts = {}
    for solver in ("lsq", "huber"):
        a = analyse(load_collected(table), n_boot=50, solver=solver)
        (claim,) = [c for c in a.claims if c["claim"].startswith("UltraMem rivals MoE")]
        verdicts[solver] = claim["verdict"]
    assert "every bootstrap refit of the ultramem law failed" in verdicts["lsq"] and "--solver huber" in verdicts["lsq"]
    assert not verdicts["huber"].startswith("not testable"), verdicts["huber"]


def test_plots_solver_choices_are_the_fitters(tmp_path):
    for cmd in (plots_cmd, fit_cmd):  # both restate analysis.fit.SOLVERS so that argument parsing imports no scipy
        parser = argparse.ArgumentParser()
        cmd.add_arguments(parser)
        (action,) = [a for a in parser._actions if a.dest == "solver"]
        assert set(action.choices) == set(SOLVERS) and action.default == "lsq"


def test_scaling_figure_carries_formulas_units_and_log_axes(study):
    runs = collect_runs(study / "runs" / "ladder", cache=False).runs
    fits = fit_families(runs, "flops", n_boot=20)
    fig = plot_scaling(runs, fits, "flops")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "FLOPs" in ax.get_xlabel() and "nats/token" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("dense: L = ") and "C^−" in t for t in labels)
    assert ax.collections  # CI bands (fill_between) and the runs (scatter)


def test_scaling_figure_y_range_follows_the_runs_not_the_bands(study):
    """A weakly identified law's bootstrap band can span decades; the view is set by the runs (all visible, with a
    margin), so the points are not flattened against one edge."""
    runs = collect_runs(study / "runs" / "ladder", cache=False).runs
    fits = fit_families(runs, "flops", n_boot=20)
    lo, hi = plot_scaling(runs, fits, "flops").axes[0].get_ylim()
    y = runs["val_loss"].dropna()
    assert lo == pytest.approx(y.min() / 1.1) and hi == pytest.approx(y.max() * 1.15)


def test_save_is_deterministic(study, tmp_path):
    runs = collect_runs(study / "runs" / "ladder", cache=False).runs
    fits = fit_families(runs, "active_params", n_boot=20)
    a = save(plot_scaling(runs, fits, "active_params"), tmp_path / "a", "fig")
    b = save(plot_scaling(runs, fits, "active_params"), tmp_path / "b", "fig")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_fit_command_json_has_parameter_keys_with_intervals(tmp_path, capsys):
    x = [1e12, 1e13, 1e14, 1e15, 1e16, 1e17]
    pd.DataFrame({"flops": x, "val_loss": [2 + 300 * v**-0.15 for v in x]}).to_csv(tmp_path / "t.csv", index=False)
    args = _parse(fit_cmd, [str(tmp_path / "t.csv"), "--law", "power", "--loss-col", "val_loss",
                            "--bootstrap", "50", "--format", "json", "--at", "1e18"])
    assert fit_cmd.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"E", "A", "alpha"} <= set(out) and out["law"] == "power"
    assert out["alpha"]["value"] == pytest.approx(0.15, rel=1e-4) and out["alpha"]["lo"] is not None
    assert "L(flops=1e+18)" in out["derived"]


def test_fit_command_chinchilla_on_epoch_data(scaling_data, capsys):
    args = _parse(fit_cmd, [str(scaling_data / "chinchilla_svg_extracted_data.csv"), "--law", "chinchilla",
                            "--n-col", "Model Size", "--flops-col", "Training FLOP", "--bootstrap", "5",
                            "--format", "json"])
    assert fit_cmd.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"E", "A", "B", "alpha", "beta"} <= set(out) and "a" in out["derived"]
    assert out["n_points"] == 245  # the command fits the table as given (Epoch drop 5 outliers first)


def test_fit_command_errors_name_the_column_and_the_file(tmp_path, capsys):
    path = tmp_path / "t.csv"
    pd.DataFrame({"flops": [1e12, 2e12], "val_loss": [3.0, 2.9]}).to_csv(path, index=False)
    assert fit_cmd.run(_parse(fit_cmd, [str(path), "--law", "power"])) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'loss'" in err and "--*-col" in err
    assert fit_cmd.run(_parse(fit_cmd, [str(path), "--law", "power", "--loss-col", "val_loss"])) == 2
    assert "not enough points" in capsys.readouterr().err


def test_fits_json_writes_unbounded_interval_ends_as_null():
    """JSON has no inf/nan (fits.json is written with allow_nan=False): a bootstrap that cannot bound a parameter
    gives an infinite end, which must be written as null instead of failing the whole report."""
    import numpy as np

    from analysis.report import _finite

    obj = {"law": {"alpha": 0.3, "lo": float("-inf"), "hi": float("inf")}, "pts": [1.0, float("nan"), np.float64(2)]}
    out = json.loads(json.dumps(_finite(obj), allow_nan=False))
    assert out == {"law": {"alpha": 0.3, "lo": None, "hi": None}, "pts": [1.0, None, 2.0]}


def test_multiplier_figure_without_a_finite_multiplier_says_why(tmp_path):
    """Every sparse run below the dense floor (as in an IsoFLOP grid's long runs): no log axes to draw on, the figure
    still saves and carries the reason."""
    import math

    from analysis.compare import SUMMARY_COLUMNS, Multiplier
    from analysis.plots import plot_multiplier

    points = pd.DataFrame({"run_id": ["u1", "u2"], "family": ["ultramem"] * 2, "flops": [1e12, 2e12],
                           "loss": [1.5, 1.4], "dense_flops": [math.inf] * 2, "multiplier": [math.inf, math.nan],
                           "lo": [math.nan] * 2, "hi": [math.nan] * 2,
                           "note": ["loss at or below the dense floor E"] * 2})
    summary = pd.DataFrame([["ultramem", 0, math.nan, math.nan, math.nan, "2 run(s) below the dense floor left out"]],
                           columns=SUMMARY_COLUMNS)
    fig = plot_multiplier(Multiplier(points, summary))
    save(fig, tmp_path, "m")
    assert (tmp_path / "m.png").stat().st_size > 0
    assert any("dense floor" in t.get_text() for t in fig.axes[0].texts)
