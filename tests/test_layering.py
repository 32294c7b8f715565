"""The packages' layers (docs/architecture.md): each may import only those below it.

    cli          the `ultramem` command: assembles everything; nothing imports it
    benchmarks   may use experiments, analysis, runfolder, ultramem
    experiments  trainer, sweeps, scheduler: runfolder, ultramem      (never analysis)
    analysis     collect, fits, plots, report: runfolder, ultramem    (never experiments, Ray or the trainer)
    runfolder    the run folder's records: nothing of the project, no torch
    ultramem     the model library: nothing of the project, no Ray, W&B or pandas

Every import statement is checked, at module top or inside a function, so a lazy import cannot hide an upward
dependency; a fresh interpreter then imports each package whole and looks at what got loaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("ultramem", "runfolder", "experiments", "analysis", "benchmarks", "cli")
FORBIDDEN = {
    "ultramem": {"runfolder", "experiments", "analysis", "benchmarks", "cli", "ray", "wandb", "pandas"},
    "runfolder": {"ultramem", "experiments", "analysis", "benchmarks", "cli", "torch", "ray", "wandb", "pandas"},
    "experiments": {"analysis", "benchmarks", "cli"},
    "analysis": {"experiments", "benchmarks", "cli", "ray"},
    "benchmarks": {"cli"},
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in `path`, relative imports resolved to their package."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.relative_to(ROOT).parts[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, package if node.level else (node.module or "").split(".")[0]))
    return out


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports_of(path):
            if module in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(package):
    assert violations(package) == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    fake = tmp_path / "analysis"
    fake.mkdir()
    (fake / "bad.py").write_text("import numpy\n\ndef f():\n    from experiments.trainer import train\n"
                                 "    import ray.util\n    from . import collect\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("analysis") == ["analysis/bad.py:4 imports experiments", "analysis/bad.py:5 imports ray"]


def test_tests_and_tools_are_not_imported_by_the_packages():
    every = [p for pkg in PROJECT for p in (ROOT / pkg).rglob("*.py")]
    assert not [f"{p}:{line}" for p in every for line, m in imports_of(p) if m in ("tests", "conftest")]


LOADED = """
import importlib, json, pkgutil, sys
pkg = importlib.import_module(sys.argv[1])
for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    if m.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(m.name)
    except ModuleNotFoundError as err:  # an optional dependency (triton) that this machine lacks
        if err.name not in ("triton",):
            raise
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize("package", ["ultramem", "runfolder", "analysis"])
def test_importing_a_package_whole_loads_nothing_above_it(package):
    out = subprocess.run([sys.executable, "-c", LOADED, package], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    loaded = set(json.loads(out.splitlines()[-1]))
    forbidden = FORBIDDEN[package] - ({"torch"} if package == "runfolder" else set())
    assert loaded & forbidden == set()
    if package == "runfolder":
        assert "torch" not in loaded
