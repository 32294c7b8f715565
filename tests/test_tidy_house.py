"""Small defects fixed together (issue 25, item 6): `ultramem seeds`'s compare.csv with nothing to compare, short
data labels in sweep run names (names are labels, not part of run ids), the package license as an SPDX string."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pandas as pd
import pytest

from analysis.seeds import compare_points
from experiments.config import run_id
from experiments.sweep import plan_sweep
from experiments.sweep.grid import source_label

REPO = Path(__file__).resolve().parents[1]


def test_compare_csv_with_nothing_to_compare_is_the_header_of_a_full_one(tmp_path):
    empty = compare_points(pd.DataFrame({"corpus": [], "point": [], "val_loss": [], "t_half": []}), [])
    empty.to_csv(tmp_path / "compare.csv", index=False)
    full = (REPO / "docs/results/seeds/compare.csv").read_text().splitlines()
    assert len(full) > 1
    assert (tmp_path / "compare.csv").read_text().splitlines() == full[:1]
    assert (REPO / "docs/results/wsd_vs_cosine/compare.csv").read_text().splitlines() == full[:1]


@pytest.mark.parametrize(("source", "label"), [
    ("../shared/data/tinyshakespeare.txt", "tinyshakespeare"), ("corpus.txt", "corpus"), ("data/books", "books"),
    ("data/*.txt", "data"), ("hf:roneneldan/TinyStories", "TinyStories"), ("embedded", "embedded"),
    ("embedded:knowledge", "embedded:knowledge"),
])
def test_source_labels(source, label):
    assert source_label(source) == label


def test_run_names_carry_the_data_label_and_names_stay_out_of_run_ids():
    runs = plan_sweep(REPO / "sweeps/seeds_tiny.yaml").runs
    names = [r.name for r in runs]
    assert "dense-t1-source=tinyshakespeare-s3" in names and "dense-t1-source=embedded-s3" in names
    assert not [n for n in names if "/" in n]
    resolved = runs[0].config  # a name is a label: renaming a run keeps its id
    assert resolved["name"] == names[0] and run_id({**resolved, "name": "another"}) == runs[0].run_id


def test_license_is_an_spdx_expression():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert "setuptools>=77" in project["build-system"]["requires"]  # the first to read PEP 639's string form
