"""`ultramem fit` through the command line, on real CSV files: every input error is one line on stderr naming the
file, the column, the data row (1-based below the header, with its line of the file) and the value as written,
with exit code 2; and bootstrap intervals that cannot be trusted say so instead of looking exact."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.bootstrap import MIN_USABLE_SHARE, Estimate, estimate
from analysis.chinchilla import HOFFMANN_2022, ChinchillaLaw
from analysis.fit import PowerLaw, fit_power_law_ci

REPO = Path(__file__).resolve().parents[1]
GOOD = [("1e15", "3.5"), ("2e15", "3.3"), ("4e15", "3.2"), ("8e15", "3.1"), ("1.6e16", "3.0")]


def _fit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "fit", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _csv(path: Path, header: str, rows: list[tuple[str, ...]], blank_after: int | None = None) -> Path:
    lines = [header] + [",".join(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after + 1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def _error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "np.float64" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("cell, shown, kind", [
    ("abc", "'abc'", "non-numeric"),
    ("", "nan", "empty or NaN"),
    ("NaN", "nan", "empty or NaN"),
    ("-3.1", "-3.1", "non-positive"),
    ("0", "0", "non-positive"),
])
def test_bad_loss_cell_is_one_line_naming_file_column_row_and_value(tmp_path, cell, shown, kind):
    rows = list(GOOD)
    rows[1] = ("2e15", cell)  # data row 2 = line 3 of the file (the header is line 1)
    path = _csv(tmp_path / "runs.csv", "flops,loss", rows)
    msg = _error(_fit(path, "--law", "power"))
    assert f"{path}: column 'loss' has 1 {kind} value: data row 2 (line 3 of the file) is {shown};" in msg
    assert "delete the row" in msg and "> 0" in msg


def test_non_positive_x_and_line_numbers_count_blank_lines(tmp_path):
    rows = list(GOOD)
    rows[2] = ("-4e15", "3.2")  # data row 3; a blank line after data row 1 puts it on line 5
    path = _csv(tmp_path / "sweep.csv", "flops,loss", rows, blank_after=1)
    msg = _error(_fit(path, "--law", "power"))
    assert f"{path}: column 'flops' has 1 non-positive value: data row 3 (line 5 of the file) is -4e+15;" in msg
    assert "the fit takes logs, so values must be > 0" in msg


def test_several_bad_cells_are_listed_with_their_kind(tmp_path):
    rows = [("1e15", "3.5"), ("2e15", "abc"), ("4e15", ""), ("8e15", "inf"), ("1.6e16", "-1"), ("3.2e16", "x")]
    msg = _error(_fit(_csv(tmp_path / "t.csv", "flops,loss", rows), "--law", "power"))
    assert "column 'loss' has 5 unusable values: data row 2 (line 3 of the file) is 'abc' (non-numeric), " \
           "data row 3 (line 4 of the file) is nan (empty or NaN), data row 4 (line 5 of the file) is 'inf' " \
           "(infinite), and 2 more;" in msg


def test_chinchilla_columns_give_the_same_messages(tmp_path):
    rows = [(f"{n:g}", f"{6 * n * 20:g}", "3.0") for n in (1e7, 2e7, 4e7, 8e7, 1.6e8, 3.2e8)]
    rows[3] = ("8e7", "lots", "3.0")
    path = _csv(tmp_path / "c.csv", "N,C,loss", rows)
    msg = _error(_fit(path, "--law", "chinchilla", "--flops-col", "C"))
    assert f"{path}: column 'C' has 1 non-numeric value: data row 4 (line 5 of the file) is 'lots';" in msg


def test_too_few_points_says_how_many_are_needed_and_what_to_do(tmp_path):
    path = _csv(tmp_path / "few.csv", "flops,loss", GOOD[:3])
    msg = _error(_fit(path, "--law", "power"))
    assert f"{path}: not enough points" in msg and "3 distinct x value(s) in 3 row(s), need at least 4" in msg
    assert "--no-floor" in msg
    path = _csv(tmp_path / "few_c.csv", "N,D,loss", [("1e7", "1e9", "3"), ("2e7", "1e9", "2.9")])
    msg = _error(_fit(path, "--law", "chinchilla"))
    assert "not enough points" in msg and "need at least 6" in msg and "add runs" in msg


def test_other_input_errors_are_one_line_with_exit_code_2(tmp_path):
    good = _csv(tmp_path / "good.csv", "run,flops,loss", [("r1", *GOOD[0]), ("", *GOOD[1]), ("r3", *GOOD[2]),
                                                           ("r4", *GOOD[3])])
    msg = _error(_fit(good, "--law", "power", "--group-col", "run"))
    assert "column 'run' has 1 empty cell: data row 2 (line 3 of the file)" in msg
    assert "missing column(s) 'nope'" in _error(_fit(good, "--law", "power", "--x-col", "nope"))
    assert "file not found" in _error(_fit(tmp_path / "none.csv", "--law", "power"))
    assert "--at must be a number > 0" in _error(_fit(good, "--law", "power", "--at", "-1"))
    (tmp_path / "empty.csv").write_text("")
    assert "cannot read the table" in _error(_fit(tmp_path / "empty.csv", "--law", "power"))


def test_chinchilla_coefficients_beyond_float_range_do_not_crash():
    # a fit whose E underflows to 0 used to crash the bootstrap (log 0); one whose B overflows crashed the fit
    assert np.all(np.isfinite(ChinchillaLaw(E=0.0, A=100.0, B=0.0, alpha=0.3, beta=5.0).theta()))
    law = ChinchillaLaw.from_theta(np.array([5.0, 800.0, 0.5, 0.3, 40.0]))
    assert math.isinf(law.B) and not law.finite


# ---- bootstrap intervals that cannot be trusted ---------------------------------------------------------------


@pytest.fixture(scope="module")
def six_points(tmp_path_factory) -> Path:
    """Six points of a known Chinchilla law (1% noise), N over a factor 2, D = C/(6N): a resample of 6 rows holds
    the 5 distinct (N, D) pairs a refit needs only ~25% of the time (the issue's 152 of 200 unusable)."""
    rng = np.random.default_rng(0)
    n, c = np.geomspace(5e7, 1e8, 6), np.geomspace(1e18, 1e19, 6)
    loss = HOFFMANN_2022(n, c / (6 * n)) * np.exp(rng.normal(0, 0.01, 6))
    path = tmp_path_factory.mktemp("six") / "six.csv"
    pd.DataFrame({"N": n, "C": c, "loss": loss}).to_csv(path, index=False)
    return path


def test_chinchilla_on_six_points_flags_every_interval_in_json(six_points):
    proc = _fit(six_points, "--law", "chinchilla", "--flops-col", "C", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["resamples"] == 200 and out["usable_resamples"] == 48 and out["n_failed"] == 152
    assert out["reliable"] is False
    for k in ("E", "A", "B", "alpha", "beta"):
        assert out[k]["reliable"] is False and out[k]["usable_resamples"] == 48 and out[k]["resamples"] == 200, k
        assert out[k]["unreliable"] == "48/200 resamples usable", k
    assert out["derived"]["a"]["reliable"] is False


def test_chinchilla_on_six_points_prints_no_interval_numbers_in_text(six_points):
    proc = _fit(six_points, "--law", "chinchilla", "--flops-col", "C")
    assert proc.returncode == 0, proc.stderr
    assert "200 resamples, 48 usable (152 could not be refitted)" in proc.stdout
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[4:] if line.strip()}
    for k in ("E", "A", "B", "alpha", "beta", "a"):
        assert rows[k].endswith("[unreliable: 48/200 resamples usable]"), rows[k]
    assert "fewer than 50% of the resamples" in proc.stdout


def test_zero_width_interval_is_flagged_not_exact(tmp_path):
    x = np.geomspace(1e12, 1e17, 6)  # noise-free: every resample refits the same law, a zero-width interval
    path = tmp_path / "exact.csv"
    pd.DataFrame({"flops": x, "loss": PowerLaw(2.0, 300.0, 0.15)(x)}).to_csv(path, index=False)
    proc = _fit(path, "--law", "power", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    alpha = json.loads(proc.stdout)["alpha"]
    assert alpha["hi"] - alpha["lo"] < 1e-12 and alpha["reliable"] is False
    assert re.fullmatch(r"zero width: \d+/200 usable resamples gave one value", alpha["unreliable"])
    text = _fit(path, "--law", "power").stdout
    assert "[unreliable: zero width" in text and "[0.15, 0.15]" not in text


def test_a_good_interval_is_reliable(tmp_path):
    x = np.repeat(np.geomspace(1e12, 1e17, 8), 2)
    y = PowerLaw(2.0, 300.0, 0.15)(x) * np.exp(np.random.default_rng(1).normal(0, 0.003, x.size))
    path = tmp_path / "good.csv"
    pd.DataFrame({"flops": x, "loss": y}).to_csv(path, index=False)
    proc = _fit(path, "--law", "power", "--format", "json")
    out = json.loads(proc.stdout)
    assert out["reliable"] is True and all(out[k]["reliable"] for k in ("E", "A", "alpha"))
    assert "unreliable" not in _fit(path, "--law", "power").stdout


def test_threshold_is_half_of_the_resamples_drawn():
    assert MIN_USABLE_SHARE == 0.5
    draws = np.r_[np.linspace(1, 2, 100), np.full(100, np.nan)]
    assert estimate(1.5, draws).reliable  # 100/200
    low = estimate(1.5, draws[1:], resamples=200)  # 99/200
    assert not low.reliable and low.unreliable == "99/200 resamples usable"
    assert low.fmt() == "1.5 [unreliable: 99/200 resamples usable]" and not low.excludes(0.0)
    assert low.to_dict()["reliable"] is False and low.to_dict()["usable_resamples"] == 99
    assert "reliable" not in estimate(1.5, draws).to_dict()  # reports keep their keys for reliable intervals
    flat = estimate(6.3, np.full(150, 6.3), resamples=200)
    assert flat.unreliable.startswith("zero width") and "6.3, 6.3" not in flat.fmt()
    assert Estimate(1.0).reliable and estimate(1.0, None).to_dict() == {"value": 1.0, "lo": None, "hi": None,
                                                                          "se": None}


def test_power_law_bootstrap_carries_the_resample_counts():
    x = np.geomspace(1e6, 1e9, 4)  # exactly 4 distinct x: ~1/3 of resamples hold fewer than 3 and are unusable
    y = PowerLaw(2.0, 50.0, 0.2)(x) * np.exp(np.random.default_rng(0).normal(0, 0.01, 4))
    fit = fit_power_law_ci(x, y, n_boot=200, seed=0)
    alpha = fit.estimates["alpha"]
    assert alpha.resamples == 200 and alpha.usable == len(fit.boot) == 200 - fit.n_failed
    assert fit.reliable == (len(fit.boot) >= 100) and alpha.reliable
