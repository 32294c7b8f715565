"""Row usage of memory layers (ultramem.memory.usage) against closed forms and a brute-force product-key search,
and its record in the eval rows of a real run."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.config import run_config_from_dict
from experiments.trainer import train
from runfolder import EvalRow, RunDir
from ultramem.config import MemoryConfig
from ultramem.memory.pkm import PKMLayer
from ultramem.memory.usage import RowUsage, row_entropy
from ultramem.presets import get_preset


def test_row_entropy_closed_forms():
    assert row_entropy(torch.full((64,), 3)) == pytest.approx(1.0)
    assert row_entropy(torch.tensor([5, 0, 0, 0])) == 0.0
    assert row_entropy(torch.tensor([2, 2, 0, 0])) == pytest.approx(math.log(2) / math.log(4))


def test_pkm_rows_match_a_brute_force_search_over_the_whole_grid():
    torch.manual_seed(0)
    cfg = MemoryConfig(layers="0:1", num_keys=8, key_dim=8, value_dim=8, heads=2, query_share=1, top_m=4,
                       score="softmax", qk_norm=False, query_conv=0, tucker_rank=1, num_cores=1, value_expansion=1,
                       init="xlm")
    layer = PKMLayer(16, cfg, n_layers=2)
    x = torch.randn(2, 5, 16)
    with RowUsage(layer) as usage:
        layer(x)
    # brute force: every one of the n^2 slots scored as s_row + s_col, exact top-m per head
    n, m, H, half = cfg.num_keys, cfg.top_m, cfg.heads, cfg.key_dim
    q = layer.query(x).reshape(-1, H, 2, half)  # [BT, H, 2, Dk]
    keys = layer.keys.detach()  # [H, 2, n, Dk]
    read = set()
    with torch.no_grad():
        q = q.detach()
    for t in range(q.shape[0]):
        for h in range(H):
            grid = [(float(q[t, h, 0] @ keys[h, 0, i] + q[t, h, 1] @ keys[h, 1, j]), i * n + j)
                    for i in range(n) for j in range(n)]
            read |= {row for _, row in sorted(grid, reverse=True)[:m]}
    assert usage.stats()["m0/rows_used"] == pytest.approx(len(read) / n**2)


def test_eval_rows_record_row_usage_for_memory_models_only(tmp_path, shakespeare_path):
    for preset in ("ultramem-t1-x6", "dense-t1"):
        cfg = run_config_from_dict({
            "model": {"preset": preset}, "data": {"source": str(shakespeare_path), "cache_dir": str(tmp_path / "c")},
            "train": {"steps": 4, "batch_size": 2, "seq_len": 32, "eval_every": 2, "eval_batches": 2, "threads": 1,
                      "knowledge_probe": False}}, "test")
        rd = RunDir(tmp_path / preset)
        train(cfg, rd.path)
        evals = [EvalRow.from_dict(r) for r in rd.metrics() if r["kind"] == "eval"]
        assert [e.step for e in evals] == [2, 4]
        if preset == "dense-t1":
            assert all(e.memory is None for e in evals)
            continue
        mem = get_preset(preset).memory
        reads = 2 * 2 * 32 * mem.heads * mem.top_m  # eval batches x batch x tokens x heads x top-m
        for e in evals:
            assert set(e.memory) == {"m0/rows_used", "m0/row_entropy"}
            assert 0 < e.memory["m0/rows_used"] * mem.num_values <= reads
            assert 0 < e.memory["m0/row_entropy"] <= 1
