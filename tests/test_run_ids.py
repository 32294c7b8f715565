"""Run ids of the committed sweeps never change: they hash `ModelConfig.to_dict()`, so a config block added later
(memory_plus, memory_v2) must stay out of the resolved config while it is None (ultramem.config
ALWAYS_WRITTEN_BLOCKS). The ids below were computed before those blocks existed; docs/results names these runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.sweep import plan_sweep
from ultramem.config import ALWAYS_WRITTEN_BLOCKS, BLOCKS, ModelConfig

REPO = Path(__file__).resolve().parents[1]
FROZEN = {
    "sweeps/tiny_cpu.yaml": [
        "dense-7d6147c0d8", "dense-1f4d4a2cdd", "dense-ba0aac798a", "moe-369df077b7", "moe-de905d6394",
        "moe-8d504fe545", "ultramem-c0e800e7a1", "ultramem-4939c77aa6", "ultramem-6eb819bf4c",
    ],
    "sweeps/study_shakespeare.yaml": [
        "dense-a3546df9d2", "dense-ae6ce309ad", "dense-6a7b61bf86", "dense-9c6961d2b7", "dense-afa635103a",
        "dense-1cbdfd67f1", "dense-4b47ebf82f", "moe-b6ea0e2cb4", "moe-c480093084", "moe-2af5b0aac4",
        "moe-c1cde8e27b", "moe-6a300a46fd", "moe-74062476e3", "moe-7909a8f785", "ultramem-951120afa2",
        "ultramem-a4449c2d3f", "ultramem-359ed3805b", "ultramem-852c0aa627", "ultramem-45af241389",
        "ultramem-be77c9846e", "ultramem-c372ca4db5",
    ],
}


@pytest.mark.parametrize("sweep", list(FROZEN))
def test_committed_sweeps_keep_their_run_ids(sweep):
    """Every run the sweep had keeps its id (grid points may be added: study_shakespeare gained two families)."""
    ids = [run.run_id for run in plan_sweep(REPO / sweep).runs]
    assert [i for i in ids if i in FROZEN[sweep]] == FROZEN[sweep]


def test_new_blocks_are_left_out_of_the_dict_while_none():
    d = ModelConfig().to_dict()
    assert set(ALWAYS_WRITTEN_BLOCKS) <= set(d) and d["moe"] is None and d["memory"] is None
    assert not set(BLOCKS) - set(ALWAYS_WRITTEN_BLOCKS) & set(d)
    assert ModelConfig.from_dict(d) == ModelConfig()
