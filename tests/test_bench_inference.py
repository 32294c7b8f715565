"""`ultramem bench inference` on tiny models: matched parameter counts, bytes touched against an independent count of
the step's routing, the KV cap, the crossover logic, and the command end to end (numbers are not judged)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from analysis.collect import read_inference_benchmark
from benchmarks.bench_inference import (
    MEMORY_FAMILIES,
    SIZES,
    analytic_values,
    is_sparse,
    kv_len_for,
    model_configs,
    reads_step,
    record_selections,
    summary,
    touched,
)
from cli import bench
from ultramem import build_model
from ultramem.accounting import decode_bytes
from ultramem.memory.memory_plus import MemoryPlusLayer
from ultramem.memory.ultramem_v2 import UltraMemV2Layer
from ultramem.model import KVCache
from ultramem.moe import MoEFFN

TINY = SIZES["tiny"]
REPO = Path(__file__).resolve().parents[1]


def numel_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, activated) non-embedding parameters of a built model, counted from its modules' shapes."""
    cfg = model.cfg
    total = sum(p.numel() for n, p in model.named_parameters() if n != "wte.weight")
    active = total
    if cfg.family == "moe":
        E, k = cfg.moe.num_experts, cfg.moe.top_k
        active -= sum(b.ffn.w_in.numel() + b.ffn.w_out.numel() for b in model.blocks) * (E - k) // E
    for mem in model.memories:
        active -= mem.values.numel() - mem.cfg.heads * mem.cfg.top_m * mem.cfg.value_dim
    inner = [b.ffn.memory for b in model.blocks if getattr(b.ffn, "memory", None) is not None]
    if inner:  # one shared table (Memory+, UltraMemV2): a token reads H*m rows of it in every memory layer
        table = model.shared
        width = sum(p.shape[1] for p in table.parameters(recurse=False))
        active -= sum(p.numel() for p in table.parameters(recurse=False))
        active += sum(mem.cfg.heads * mem.cfg.top_m * width for mem in inner)
    return total, active


@pytest.mark.parametrize("sparsity", [12.0, 40.0])
def test_families_have_equal_activated_and_sparse_models_equal_total_params(sparsity):
    configs = model_configs(TINY, sparsity, seq_len=32)
    counts = {f: numel_counts(build_model(c, device="meta")) for f, c in configs.items()}
    (t_dense, a_dense), (t_moe, a_moe), (t_um, a_um) = counts["dense"], counts["moe"], counts["ultramem"]
    assert a_dense == pytest.approx(a_um, rel=0.05) and a_moe == pytest.approx(a_um, rel=0.05)
    assert t_moe == pytest.approx(t_um, rel=0.05)
    for f in ("memory_plus", "ultramem_v2"):
        assert counts[f][1] == pytest.approx(a_um, rel=0.05) and counts[f][0] == pytest.approx(t_um, rel=0.05)
    assert t_um == pytest.approx(sparsity * a_um, rel=0.1)
    assert t_dense == a_dense


def test_kv_len_is_capped_by_the_budget():
    # B x kv x 2 (k, v) x layers x d x 4 bytes <= budget
    assert kv_len_for(1, 2048, 128, 4, 1.0) == 2048
    assert kv_len_for(1024, 2048, 128, 4, 0.125) == 2**27 // (1024 * 2 * 4 * 128 * 4) == 32
    assert kv_len_for(10**6, 2048, 128, 4, 0.125) == 1


def decode_inputs(model, B: int, kv: int):
    cfg = model.cfg
    shape = (B, cfg.n_heads, kv, cfg.head_dim)
    cache = KVCache([torch.randn(shape) for _ in model.blocks], [torch.randn(shape) for _ in model.blocks],
                    [{} for _ in model.memories])
    idx = torch.randint(0, cfg.vocab_size, (B, 1), generator=torch.Generator().manual_seed(B))
    return idx, cache


@pytest.mark.parametrize("B", [1, 5])
def test_moe_bytes_touched_equals_the_routed_experts(B, monkeypatch):
    """Experts recorded from the router's own top-k output (a wrapper around MoEFFN.route) decide the bytes."""
    cfg = model_configs(TINY, 12.0, seq_len=16)["moe"]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    routed: list[torch.Tensor] = []
    route = MoEFFN.route

    def spy(self, xf):
        out = route(self, xf)
        routed.append(out[3])
        return out

    monkeypatch.setattr(MoEFFN, "route", spy)
    idx, cache = decode_inputs(model, B, kv=8)
    got = touched(model, idx, cache, kv_len=8)
    distinct = [int(torch.unique(e).numel()) for e in routed]
    assert got["experts_touched"] == distinct and (B > 1 or distinct == [cfg.moe.top_k] * cfg.n_layers)
    expert = 2 * cfg.d_model * cfg.moe.expert_hidden
    dense = sum(p.numel() for n, p in model.named_parameters() if ".w_in" not in n and ".w_out" not in n)
    kv = 2 * cfg.n_layers * B * 8 * cfg.d_model
    assert got["bytes_touched"] == 4 * (dense + sum(distinct) * expert + kv)  # wte = the tied head, read once


@pytest.mark.parametrize("B", [1, 6])
def test_ultramem_bytes_touched_equals_the_selected_rows(B, monkeypatch):
    """Rows recorded from UltraMemLayer.lookup (the physical rows it pools) decide the bytes."""
    from ultramem.memory.ultramem import UltraMemLayer

    cfg = model_configs(TINY, 12.0, seq_len=16)["ultramem"]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    selected: list[torch.Tensor] = []
    lookup = UltraMemLayer.lookup

    def spy(self, x, state=None):
        out = lookup(self, x, state)
        selected.append(out[0])
        return out

    monkeypatch.setattr(UltraMemLayer, "lookup", spy)
    idx, cache = decode_inputs(model, B, kv=4)
    got = touched(model, idx, cache, kv_len=4)
    distinct = [int(torch.unique(r).numel()) for r in selected]
    assert got["value_rows_touched"] == distinct and all(d <= B * cfg.memory.heads * cfg.memory.top_m
                                                         for d in distinct)
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".values"))
    kv = 2 * cfg.n_layers * B * 4 * cfg.d_model
    assert got["bytes_touched"] == 4 * (dense + sum(distinct) * cfg.memory.value_dim + kv)
    assert not any(is_sparse(n) for n, _ in model.named_parameters() if not n.endswith(".values"))


@pytest.mark.parametrize("family, layer", [("memory_plus", MemoryPlusLayer), ("ultramem_v2", UltraMemV2Layer)])
@pytest.mark.parametrize("B", [1, 6])
def test_shared_table_bytes_touched_equals_the_selected_rows(family, layer, B, monkeypatch):
    """Rows recorded from each memory layer's lookup (the physical rows it reads) decide the bytes; the table every
    layer shares is read once per step (the union of their rows), at all its row widths (V2: values + pre-values).
    Against ultramem.accounting: the same dense bytes exactly, the table bytes within 5% (uniform routing)."""
    cfg = model_configs(TINY, 12.0, seq_len=16)[family]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    selected: list[torch.Tensor] = []
    lookup = layer.lookup

    def spy(self, x):
        out = lookup(self, x)
        selected.append(out[0])
        return out

    monkeypatch.setattr(layer, "lookup", spy)
    idx, cache = decode_inputs(model, B, kv=4)
    got = touched(model, idx, cache, kv_len=4)
    layers = [b.ffn.memory for b in model.blocks if getattr(b.ffn, "memory", None) is not None]
    assert len(selected) == len(layers) >= 1
    union = int(torch.unique(torch.cat([r.flatten() for r in selected])).numel())
    assert got["value_rows_touched"] == [int(torch.unique(r).numel()) for r in selected]
    assert got["table_rows_touched"] == [union]
    table = {id(p) for p in model.shared.parameters()}
    width = sum(p.shape[1] for p in model.shared.parameters())
    dense = sum(p.numel() for p in model.parameters() if id(p) not in table)  # wte = the tied head, read once
    kv = 2 * cfg.n_layers * B * 4 * cfg.d_model
    assert got["value_bytes"] == 4 * union * width
    assert got["bytes_touched"] == 4 * (dense + union * width + kv)
    analytic = decode_bytes(cfg, B, 4, bytes_per_param=4)
    value_params, rows = analytic_values(cfg, B)
    assert got["bytes_touched"] - got["value_bytes"] == pytest.approx(analytic.total - 4 * value_params)
    assert got["value_bytes"] == pytest.approx(4 * value_params, rel=0.05) and union == pytest.approx(rows, rel=0.05)


@pytest.mark.parametrize("B", [1, 6])
def test_reads_bound_step_reproduces_the_real_step_without_retrieval(B, monkeypatch):
    """The reads bound runs UltraMem's step with memory layers that only pool and project the rows the real step
    chose: its logits must equal the real step's, and it must not run the retrieval (TDQKR) at all."""
    from ultramem.memory.tdqkr import TDQKR

    cfg = model_configs(TINY, 12.0, seq_len=16)["ultramem"]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    idx, cache = decode_inputs(model, B, kv=4)

    def step():
        cache.pos = 3
        with torch.no_grad():
            return model(idx, cache=cache).logits

    real = step()
    chosen = record_selections(model, step)
    assert len(chosen) == len(model.memories) and chosen[0][0].shape == (B, cfg.memory.heads * cfg.memory.top_m)
    calls = []
    forward = TDQKR.forward
    monkeypatch.setattr(TDQKR, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    bound = reads_step(model, chosen, step)
    assert calls == []
    torch.testing.assert_close(bound, real, rtol=0, atol=0)
    step()
    assert len(calls) == len(model.memories)  # the real layers are back


def test_summary_crossover_and_target():
    def rows(ratios):
        return [{"batch_size": b, "family": "moe", "moe_ultramem_latency_ratio": r} for b, r in ratios.items()]

    s = summary(rows({1: 0.8, 4: 1.2, 16: 0.9, 64: 2.5, 256: 2.1, 1024: 3.0}))
    assert s["crossover_batch"] == 64 and s["ratio_2x_from_batch"] == 64 and s["target"]["met"] is True
    s = summary(rows({1: 1.1, 64: 2.5, 1024: 1.5}))
    assert s["crossover_batch"] == 1 and s["ratio_2x_from_batch"] is None and s["target"]["met"] is False
    assert summary(rows({1: 3.0, 16: 3.0}))["target"]["met"] is None  # no batch >= 64 measured


def test_bench_inference_end_to_end(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    threads = torch.get_num_threads()
    try:
        rc = bench.run(parser.parse_args(["inference", "--size", "tiny", "--batch-sizes", "1,3", "--kv-len", "8",
                                          "--sparsity", "12", "--repeats", "2", "--warmup", "0", "--threads", "1",
                                          "--out", str(tmp_path), "--format", "json"]))
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "inference.json").read_text())
    assert json.loads(capsys.readouterr().out) == data and (tmp_path / "inference.png").stat().st_size > 0
    families = ("dense", "moe", "ultramem", "memory_plus", "ultramem_v2")
    assert MEMORY_FAMILIES == ("ultramem", "memory_plus", "ultramem_v2")
    assert {(r["batch_size"], r["family"]) for r in data["rows"]} == {(b, f) for b in (1, 3) for f in families}
    old = {"batch_size", "family", "model", "kv_len_used", "latency_ms", "latency_ms_iqr", "samples_ms", "param_bytes",
           "kv_bytes", "bytes_touched", "experts_touched", "value_rows_touched", "analytic_bytes",
           "analytic_param_bytes", "analytic_experts_touched", "analytic_value_rows_touched",
           "moe_ultramem_latency_ratio", "moe_ultramem_bytes_ratio", "moe_ultramem_analytic_bytes_ratio"}
    for r in data["rows"]:
        assert old <= set(r)  # the fields of earlier files, unchanged
        assert r["latency_ms"] > 0 and len(r["samples_ms"]) == 2 and r["kv_len_used"] == 8
        assert r["bytes_touched"] == r["param_bytes"] + r["kv_bytes"] > 0 and r["analytic_bytes"] > 0
        at = {x["family"]: x for x in data["rows"] if x["batch_size"] == r["batch_size"]}
        for f in MEMORY_FAMILIES:  # moe_ultramem_latency_ratio as before, and one ratio per memory family
            assert r[f"moe_{f}_latency_ratio"] == pytest.approx(at["moe"]["latency_ms"] / at[f]["latency_ms"])
            assert r[f"moe_{f}_bytes_ratio"] == pytest.approx(at["moe"]["bytes_touched"] / at[f]["bytes_touched"])
        if r["family"] in MEMORY_FAMILIES:  # bytes from the routing next to the accounting's
            assert r["bytes_touched"] == pytest.approx(r["analytic_bytes"], rel=0.05)
            assert r["value_bytes"] == pytest.approx(r["analytic_value_bytes"], rel=0.05)
            dense = r["analytic_bytes"] - r["analytic_value_bytes"]
            assert r["bytes_touched"] - r["value_bytes"] == pytest.approx(dense)  # only the routing differs
            assert sum(r["table_rows_touched"]) == pytest.approx(r["analytic_table_rows_touched"], rel=0.05)
        if r["family"] in ("memory_plus", "ultramem_v2"):  # one table, read once per step by all its layers
            assert len(r["table_rows_touched"]) == 1
            assert max(r["value_rows_touched"]) <= r["table_rows_touched"][0] <= sum(r["value_rows_touched"])
    dense_b1 = next(r for r in data["rows"] if r["batch_size"] == 1 and r["family"] == "dense")
    assert dense_b1["bytes_touched"] == dense_b1["analytic_bytes"]  # no routing: the two counts must agree exactly
    assert set(data["moe_ultramem_latency_ratio"]) == {"1", "3"} and data["target"]["met"] is None
    for b in (1, 3):  # both bounds timed in the same round robin, on UltraMem's rows
        um = next(r for r in data["rows"] if r["batch_size"] == b and r["family"] == "ultramem")
        moe = next(r for r in data["rows"] if r["batch_size"] == b and r["family"] == "moe")
        assert um["floor_latency_ms"] > 0 and um["reads_latency_ms"] > 0
        assert data["moe_ultramem_reads_bound_ratio"][str(b)] == pytest.approx(moe["latency_ms"]
                                                                              / um["reads_latency_ms"])
    assert data["crossover_batch"] == data["memory_families"]["ultramem"]["crossover_batch"]
    for f in MEMORY_FAMILIES:
        assert set(data["memory_families"][f]["moe_latency_ratio"]) == {"1", "3"}
    assert data["settings"]["kv_len"] == 8 and data["models"]["moe"]["params"]["total"] > 0
    for f in families:  # the matched parameter counts are reported (and within 3%: no warning)
        m = data["models"][f]["match"]
        assert m["active_vs_ultramem"] == pytest.approx(1, abs=0.03)
        assert f == "dense" or m["total_vs_ultramem"] == pytest.approx(1, abs=0.03)
    assert not any("from UltraMem's" in w for w in data["warnings"])
    # the report's reader takes the new file as it takes the committed (three-family) ones
    assert set(read_inference_benchmark(tmp_path / "inference.json")["family"]) == set(families)
    for committed in sorted(REPO.glob("docs/results/*/inference.json")):
        assert {"dense", "moe", "ultramem"} <= set(read_inference_benchmark(committed)["family"])
