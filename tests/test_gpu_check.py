"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without CUDA: one line saying what it skipped, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import SECTIONS, pytest_summary

ROOT = Path(__file__).resolve().parents[1]


def run_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, even on a machine that has one
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_without_cuda_it_prints_one_line_naming_what_it_skipped_and_exits_0(tmp_path):
    proc = run_check("--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: skipped: no CUDA device")
    assert all(s in lines[0] for s in SECTIONS)
    assert not any(tmp_path.iterdir())  # nothing written


def test_unknown_section_is_an_input_error(tmp_path):
    proc = run_check("--sections", "pytest,warp", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--sections" in proc.stderr and "warp" in proc.stderr


@pytest.mark.parametrize(("line", "want"), [
    ("3 passed, 1 skipped in 2.10s", {"passed": 3, "skipped": 1}),
    ("1 failed, 2 passed, 40 deselected in 9.00s", {"failed": 1, "passed": 2, "deselected": 40}),
    ("no tests ran in 0.01s", {}),
])
def test_pytest_summary_counts(line, want):
    assert pytest_summary(line) == want
