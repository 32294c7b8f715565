"""notebooks/scaling_analysis.ipynb runs top to bottom with the public API (executed here so it never rots)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "scaling_analysis.ipynb"


@pytest.mark.slow
def test_notebook_executes_and_reproduces_the_published_numbers(shared, monkeypatch):
    monkeypatch.setenv("ULTRAMEM_SHARED", str(shared))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Error" not in text
    assert "482.0" in text and "2085.4" in text  # Epoch's headline A and B in the comparison table
    assert "published: C^0.4970" in text
    assert "report.md" in text
