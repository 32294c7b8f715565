"""The benchmark harness: timing statistics, peak memory, case selection, ratios, and `ultramem bench layers` end to end
on a tiny token count (the numbers are not checked, only that they are measured and reported)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from benchmarks.bench_layers import (
    NO_PEER_NOTE,
    add_ratios,
    memory_plus_config,
    memory_size,
    our_memory_config,
    selected,
    targets,
    ultramem_v2_config,
)
from benchmarks.common import Timing, peak_memory_mb, spread_warnings, time_round_robin
from cli import bench


def test_timing_median_and_iqr_match_numpy():
    samples = [5.0, 1.0, 100.0, 3.0, 4.0, 2.0]
    t = Timing(samples)
    assert t.median == pytest.approx(np.median(samples))
    q1, q3 = np.percentile(samples, [25, 75])
    assert t.iqr == pytest.approx(q3 - q1)


def test_spread_warnings_flag_only_wide_spreads():
    rows = [{"impl": "a", "layer": "x", "fwd_ms": 10.0, "fwd_ms_iqr": 2.0, "inference_ms": 10.0,
             "inference_ms_iqr": 3.0}]
    warnings = spread_warnings(rows, ("fwd", "inference"), limit=0.25)
    assert len(warnings) == 1 and warnings[0].startswith("a/x inference") and "30%" in warnings[0]


def test_round_robin_warms_up_and_interleaves():
    calls: list[str] = []
    cases = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    timings = time_round_robin(cases, torch.device("cpu"), warmup=2, repeats=3)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each round starts one case later
    assert all(len(t.samples_ms) == 3 for t in timings.values())


def test_cpu_peak_memory_sees_a_transient_allocation():
    size_mb = 64

    def allocate_and_touch():
        x = torch.ones(size_mb * 2**20 // 4)  # written, so every page is resident
        return float(x[-1])

    peak = peak_memory_mb(allocate_and_touch, torch.device("cpu"))
    if peak is None:
        pytest.skip("resident-set peak cannot be reset here (/proc/self/clear_refs)")
    assert size_mb * 0.95 <= peak <= size_mb * 1.5


def test_only_keeps_the_peers_bounds_and_floors_of_the_chosen_layer():
    labels = ["lucidrains/ultra-mem/ultramem", "lucidrains/product-key-memory/pkm", "ours/ultramem",
              "ours/ultramem_65k_rows", "ours/pkm", "ours/memory_plus", "ours/ultramem_v2", "ours/moe",
              "ours/gather_pool", "bound/embedding_bag/ultramem", "floor/matmuls/ultramem", "floor/topk/ultramem",
              "bound/embedding_bag/ultramem_65k_rows", "floor/matmuls/ultramem_65k_rows",
              "floor/topk/ultramem_65k_rows"]
    assert selected(labels, ["ours/ultramem"]) == [
        "lucidrains/ultra-mem/ultramem", "ours/ultramem", "ours/ultramem_65k_rows", "ours/ultramem_v2",
        "bound/embedding_bag/ultramem", "floor/matmuls/ultramem", "floor/topk/ultramem",
        "bound/embedding_bag/ultramem_65k_rows", "floor/matmuls/ultramem_65k_rows", "floor/topk/ultramem_65k_rows"]
    assert selected(labels, ["65k"]) == ["lucidrains/ultra-mem/ultramem", "ours/ultramem_65k_rows",
                                         "bound/embedding_bag/ultramem_65k_rows", "floor/matmuls/ultramem_65k_rows",
                                         "floor/topk/ultramem_65k_rows"]
    assert selected(labels, ["gather"]) == ["ours/gather_pool", "bound/embedding_bag/ultramem_65k_rows",
                                            "floor/matmuls/ultramem_65k_rows", "floor/topk/ultramem_65k_rows"]
    assert selected(labels, ["pkm"]) == ["lucidrains/product-key-memory/pkm", "ours/pkm"]
    # no peer: only the bound they are compared with (and its floors)
    assert selected(labels, ["memory_plus"]) == ["ours/memory_plus", "bound/embedding_bag/ultramem",
                                                 "floor/matmuls/ultramem", "floor/topk/ultramem"]
    assert selected(labels, []) == labels


def test_ratios_floor_and_targets():
    rows = [
        {"impl": "lucidrains/ultra-mem", "layer": "ultramem", "fwd_bwd_ms": 320.0, "inference_ms": 120.0},
        {"impl": "bound/embedding_bag", "layer": "ultramem", "fwd_bwd_ms": 20.0, "inference_ms": 8.0},
        {"impl": "floor/matmuls", "layer": "ultramem", "fwd_bwd_ms": 30.0, "inference_ms": 10.0},
        {"impl": "floor/topk", "layer": "ultramem", "fwd_bwd_ms": 6.0, "inference_ms": 6.0},
        {"impl": "ours", "layer": "ultramem", "fwd_bwd_ms": 40.0, "inference_ms": 30.0},
        {"impl": "ours", "layer": "moe", "fwd_bwd_ms": 10.0, "inference_ms": 5.0},
        {"impl": "ours", "layer": "memory_plus", "fwd_bwd_ms": 30.0, "inference_ms": 16.0},
        {"impl": "ours", "layer": "ultramem_v2", "fwd_bwd_ms": 50.0, "inference_ms": 24.0},
    ]
    add_ratios(rows)
    ours = rows[4]
    assert ours["speedup_fwd_bwd_vs_peer"] == pytest.approx(8.0)
    assert ours["speedup_inference_vs_peer"] == pytest.approx(4.0)
    assert ours["inference_vs_bound"] == pytest.approx(3.75)
    assert ours["inference_floor_ms"] == pytest.approx(24.0) and ours["inference_floor_vs_bound"] == pytest.approx(3.0)
    assert "speedup_fwd_bwd_vs_peer" not in rows[5] and "inference_vs_bound" not in rows[5]
    for r, infer in ((rows[6], 2.0), (rows[7], 3.0)):  # no peer; the matched row's bound, not its floors
        assert "speedup_fwd_bwd_vs_peer" not in r and "inference_floor_ms" not in r
        assert r["inference_vs_bound"] == pytest.approx(infer)
    by_name = {t["name"].split()[2]: t for t in targets(rows)}
    assert by_name["fwd+bwd"]["met"] is True
    assert by_name["inference"]["met"] is False and by_name["inference"]["floor"] == pytest.approx(3.0)


def test_matched_row_has_lucidrains_memory_size():
    """Slots, value parameters and floats read per token of `ours/ultramem` equal lucidrains' UltraMem at
    num_memories=65536, counted from its module (its tables are [core heads, num_memories / E, dim // core heads])."""
    ours = memory_size(our_memory_config("ultramem"))
    ultra_mem = pytest.importorskip("ultra_mem", reason="lucidrains ultra-mem not installed (pip install -e '.[peers]')")
    peer = ultra_mem.UltraMem(dim=256, num_memories=65536, topk=32)
    heads, rows, dim_values = peer.memories.shape
    assert ours == {"slots": 65536, "value_params": heads * rows * dim_values,
                    "rows_read_per_token": 32, "floats_read_per_token": heads * 32 * dim_values}
    assert ours["value_params"] == 4_194_304 and ours["floats_read_per_token"] == 8192
    assert memory_size(our_memory_config("ultramem_65k_rows"))["value_params"] == 65536 * 128


@pytest.mark.parametrize("config", [memory_plus_config, ultramem_v2_config])
def test_shared_table_rows_match_the_ultramem_row_memory_size(config):
    """Memory+ and UltraMemV2 rows: the matched row's value parameters (V2: values + pre-values), rows and floats
    read per token; only the addressable slots differ (no IVE)."""
    ours, ref = memory_size(config()), memory_size(our_memory_config("ultramem"))
    assert {k: v for k, v in ours.items() if k != "slots"} == {k: v for k, v in ref.items() if k != "slots"}
    assert ours["slots"] == 16384 and ref["slots"] == 65536


def run_bench(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(list(argv)))


def test_bench_layers_writes_json_and_plot(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = run_bench("layers", "--only", "gather_pool", "--seq", "32", "--warmup", "1", "--repeats", "2",
                       "--threads", "1", "--out", str(tmp_path), "--format", "json")
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "layers.json").read_text())
    assert json.loads(capsys.readouterr().out) == data
    assert (tmp_path / "layers.png").stat().st_size > 0
    assert data["threads"] == 1 and data["torch"] == torch.__version__ and data["machine"]["cpu"]
    by = {(r["impl"], r["layer"]): r for r in data["rows"]}
    assert set(by) == {("ours", "gather_pool"), ("bound/embedding_bag", "ultramem_65k_rows"),
                       ("floor/matmuls", "ultramem_65k_rows"), ("floor/topk", "ultramem_65k_rows")}
    for r in by.values():
        for key in ("fwd_ms", "fwd_bwd_ms", "inference_ms"):
            assert r[key] > 0 and len(r["samples_ms"][key[:-3]]) == 2
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0
        assert r["config"]["tokens"] == 32
    assert by[("ours", "gather_pool")]["inference_vs_bound"] > 0
    assert data["settings"]["clock"] == "wall" and data["profiles"] == {}


def test_bench_layers_times_the_shared_table_families(tmp_path):
    """ours/memory_plus and ours/ultramem_v2 at 8 tokens: timed in all three modes, their config says what matches
    the ultramem row, no peer ratio (and a note saying why), their inference against the matched row's bound."""
    threads = torch.get_num_threads()
    try:
        rc = run_bench("layers", "--only", "memory_plus", "--only", "ultramem_v2", "--seq", "8", "--warmup", "1",
                       "--repeats", "2", "--threads", "1", "--out", str(tmp_path), "--no-plot", "--format", "json")
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "layers.json").read_text())
    by = {(r["impl"], r["layer"]): r for r in data["rows"]}
    assert set(by) == {("ours", "memory_plus"), ("ours", "ultramem_v2"), ("bound/embedding_bag", "ultramem"),
                       ("floor/matmuls", "ultramem"), ("floor/topk", "ultramem")}
    for layer in ("memory_plus", "ultramem_v2"):
        r = by[("ours", layer)]
        for key in ("fwd_ms", "fwd_bwd_ms", "inference_ms"):
            assert r[key] > 0 and len(r["samples_ms"][key[:-3]]) == 2
        assert r["config"]["matched"] == ["value_params", "rows_read_per_token", "floats_read_per_token"]
        assert r["config"]["not_matched"] == {"slots": [16384, 65536]} and r["config"]["peer"] is None
        assert r["config"]["value_params"] == 4_194_304 and r["config"]["floats_read_per_token"] == 8192
        assert r["inference_vs_bound"] > 0 and "speedup_fwd_bwd_vs_peer" not in r
    assert data["notes"] == [NO_PEER_NOTE] and data["targets"] == []
