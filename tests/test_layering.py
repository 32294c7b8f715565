"""The packages' layers (docs/architecture.md): each may import only those below it.

    cli          the `ultramem` command: assembles everything; nothing imports it
    benchmarks   may use experiments, analysis, runfolder, ultramem
    experiments  trainer, sweeps, scheduler: runfolder, ultramem      (never analysis)
    analysis     collect, fits, plots, report: runfolder, ultramem    (never experiments, Ray or the trainer)
    runfolder    the run folder's records: nothing of the project, no torch
    ultramem     the model library: nothing of the project, no Ray, W&B or pandas

Every import statement is checked, at module top or inside a function, so a lazy import cannot hide an upward
dependency; a fresh interpreter then imports each package whole and looks at what got loaded. Inside `ultramem/` the
modules' imports (the same statements: lazy and `if TYPE_CHECKING:` ones included) form no cycle.
"""

from __future__ import annotations

import ast
import graphlib
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


# ---- no import cycle inside ultramem/ -----------------------------------------------------------------------------


def module_graph(package: str) -> dict[str, set[str]]:
    """{module: the modules of `package` its import statements name} over every .py file of `package`.

    Every statement counts (module top, `if TYPE_CHECKING:`, inside functions). `from a.b import c` names the module
    a.b.c when that is a file, else a.b (a package's __init__). The parent packages Python runs first are not edges:
    `ultramem/__init__.py` imports `ultramem.config`, so counting them would put every module in one circle.
    """
    files = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def import_cycle(package: str) -> list[str]:
    """One import cycle among `package`'s modules (first module repeated at the end), or [] when there is none."""
    try:
        graphlib.TopologicalSorter(module_graph(package)).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return []


def test_ultramem_has_no_import_cycle():
    assert import_cycle("ultramem") == []


def test_the_cycle_checker_sees_lazy_type_checking_and_relative_imports(tmp_path, monkeypatch):
    fake = tmp_path / "ultramem"
    (fake / "sub").mkdir(parents=True)
    (fake / "__init__.py").write_text("from ultramem import a\n")  # the parent package: not an edge
    (fake / "sub" / "__init__.py").write_text("")
    (fake / "a.py").write_text("from ultramem.sub import b\n")
    (fake / "sub" / "b.py").write_text("def f():\n    from . import c\n")
    (fake / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from ultramem.a import X\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    cycle = import_cycle("ultramem")
    assert set(cycle) == {"ultramem.a", "ultramem.sub.b", "ultramem.sub.c"} and cycle[0] == cycle[-1]
    (fake / "sub" / "c.py").write_text("import ultramem.sub\n")  # c -> the sub package's __init__, no cycle
    assert import_cycle("ultramem") == []
