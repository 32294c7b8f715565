"""Issue 23's benchmark additions: `bench memsize`, `bench throughput --profile` ratios, the decode floor."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import bench_inference
from cli import bench
from ultramem import build_model
from ultramem.presets import get_preset


def run_bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    threads = torch.get_num_threads()
    try:
        return bench.run(parser.parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def test_memsize_end_to_end_reports_the_ratio_of_largest_to_smallest(tmp_path, capsys):
    rc = run_bench(["memsize", "--size", "t1", "--families", "ultramem", "--rows", "10,8", "--batch-size", "1",
                    "--seq-len", "8", "--steps", "1", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path),
                    "--format", "json", "--value-updates", "dense"])
    assert rc == 0
    data = json.loads((tmp_path / "memsize.json").read_text())
    assert json.loads(capsys.readouterr().out) == data
    rows = data["rows"]
    assert [(r["num_keys"], r["drift_check"]) for r in rows] == [(8, False), (10, False), (8, True)]
    small, large = rows[0], rows[1]
    assert large["table_params"] == small["table_params"] * 100 / 64  # k^2 rows of the same width
    assert small["step_ms"] == pytest.approx(small["fwd_bwd_ms"] + small["optimizer_ms"])
    r = data["ratios"]["ultramem"]
    assert r["step_ratio_largest_over_smallest"] == pytest.approx(large["step_ms"] / small["step_ms"])
    assert (r["rows_smallest"], r["rows_largest"]) == (64, 100)
    # the keys grow with sqrt(rows): n' = num_keys sqrt(E) per side and head, each key a rank-r set of [key_dim]
    # vectors a token takes a dot with (2 FLOPs each), then the stage-1 rank projection (2 r per key); x 3 training
    cfg = get_preset("ultramem-t1-x6").memory
    extra_keys = cfg.heads * 2 * (10 - 8) * round(cfg.value_expansion ** 0.5)  # more keys, both sides, all heads
    forward = extra_keys * (2 * cfg.key_dim * cfg.tucker_rank + 2 * cfg.tucker_rank)
    assert large["flops_per_token"] - small["flops_per_token"] == pytest.approx(3 * forward)
    assert r["flops_ratio_largest_over_smallest"] == pytest.approx(large["flops_per_token"] / small["flops_per_token"])


def test_memsize_times_dense_and_rows_read_updates_side_by_side(tmp_path):
    rc = run_bench(["memsize", "--size", "t1", "--families", "memory_plus", "--rows", "30,24", "--batch-size", "1",
                    "--seq-len", "8", "--steps", "1", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path),
                    "--format", "json"])
    assert rc == 0
    data = json.loads((tmp_path / "memsize.json").read_text())
    assert [(r["num_keys"], r["value_updates"], r["drift_check"]) for r in data["rows"]] == [
        (24, "dense", False), (24, "rows_read", False), (30, "dense", False), (30, "rows_read", False),
        (24, "dense", True), (24, "rows_read", True)]
    assert set(data["ratios"]) == {"memory_plus", "memory_plus/rows_read"}
    with pytest.raises(SystemExit, match="--value-updates"):
        run_bench(["memsize", "--value-updates", "lazy"])


def test_memsize_refuses_bad_rows():
    with pytest.raises(SystemExit, match="--rows"):
        run_bench(["memsize", "--rows", "a,b"])
    with pytest.raises(SystemExit, match="--rows 4 for ultramem: model.memory.top_m"):  # top-16 of 8 keys per side
        run_bench(["memsize", "--size", "t1", "--families", "ultramem", "--rows", "4"])


def test_memsize_times_the_retrieval_free_case_beside_dense(tmp_path):
    rc = run_bench(["memsize", "--size", "t1", "--families", "memory_plus", "--rows", "24,26", "--batch-size", "1",
                    "--seq-len", "8", "--steps", "1", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path),
                    "--format", "json", "--value-updates", "dense", "--retrieval-free"])
    assert rc == 0
    data = json.loads((tmp_path / "memsize.json").read_text())
    assert [(r["num_keys"], r["value_updates"]) for r in data["rows"]] == [
        (24, "dense"), (24, "retrieval_free"), (26, "dense"), (26, "retrieval_free"), (24, "dense"), (24, "retrieval_free")]
    assert set(data["ratios"]) == {"memory_plus", "memory_plus/retrieval_free"}


def test_throughput_profile_and_ratios_vs_moe(tmp_path, capsys):
    rc = run_bench(["throughput", "--families", "moe,ultramem", "--batch-size", "2", "--seq-len", "16", "--steps",
                    "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path), "--format",
                    "json", "--no-plot", "--profile"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    by = {r["family"]: r for r in data["rows"]}
    assert data["tokens_per_s_ratio"] == {"ultramem_over_moe": by["ultramem"]["tokens_per_s"] / by["moe"]["tokens_per_s"]}
    for f in ("moe", "ultramem"):
        ops = data["profiles"][f]
        assert ops and all(o["self_ms"] >= 0 and 0 <= o["share"] <= 1 for o in ops)
        assert [o["self_ms"] for o in ops] == sorted((o["self_ms"] for o in ops), reverse=True)


def test_throughput_measures_rows_read_updates_beside_dense(tmp_path, capsys):
    rc = run_bench(["throughput", "--families", "moe,pkm,pkm:rows_read", "--batch-size", "2", "--seq-len", "16",
                    "--steps", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path),
                    "--format", "json", "--no-plot"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["family"] for r in data["rows"]] == ["moe", "pkm", "pkm:rows_read"]
    assert set(data["tokens_per_s_ratio"]) == {"pkm_over_moe", "pkm:rows_read_over_moe"}
    with pytest.raises(SystemExit, match="rows_read"):
        run_bench(["throughput", "--families", "pkm:lazy"])
    with pytest.raises(SystemExit, match="value_updates.*needs a memory value table"):  # MoE has none
        run_bench(["throughput", "--families", "moe:rows_read", "--batch-size", "2", "--seq-len", "16"])


def test_decode_floor_is_the_model_with_memory_outputs_zero():
    """floor_step runs UltraMem's model as if every memory layer returned zeros; the reference: the same model
    with its value tables zeroed (the memory output is value_proj(pooled rows) = 0). The layers come back after."""
    torch.manual_seed(0)
    model = build_model(get_preset("ultramem-tiny")).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 5))
    memories = model.memories
    with torch.no_grad():
        got = bench_inference.floor_step(model, lambda: model(idx).logits)
        assert model.memories is memories
        for layer in memories:
            layer.values.zero_()
        want = model(idx).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("preset", ["ultramem-t1-x6", "memory_plus-t1-x6", "ultramem_v2-t1-x6", "pkm-tiny"])
def test_retrieval_free_step_replays_the_real_selection(preset):
    """`<family>:retrieval_free` (the bound on a faster retrieval): the same loss as the real step on the same batch
    (the replayed rows and scores are the real ones); after a step the value tables have trained and the keys and
    query projections have not moved (no gradient reaches them, so AdamW skips them, weight decay included)."""
    from benchmarks.bench_throughput import Trainer

    cpu = torch.device("cpu")
    real = Trainer(preset, 2, 16, cpu)
    free = Trainer(preset, 2, 16, cpu, variant="retrieval_free")
    before = {n: p.detach().clone() for n, p in free.model.named_parameters()}
    assert free.steps(1) == pytest.approx(real.steps(1), rel=1e-6)
    moved = {n for n, p in free.model.named_parameters() if not torch.equal(p, before[n])}
    retrieval = {n for n in before if ".keys" in n or "query" in n}
    values = {n for n in before if n.endswith(".values")}
    assert retrieval and values
    assert not retrieval & moved, sorted(retrieval & moved)
    assert values <= moved


def test_throughput_retrieval_free_bound_beside_the_family(tmp_path, capsys):
    rc = run_bench(["throughput", "--families", "moe,ultramem,ultramem:retrieval_free", "--batch-size", "2",
                    "--seq-len", "16", "--steps", "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out",
                    str(tmp_path), "--format", "json", "--no-plot"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["family"] for r in data["rows"]] == ["moe", "ultramem", "ultramem:retrieval_free"]
    assert set(data["tokens_per_s_ratio"]) == {"ultramem_over_moe", "ultramem:retrieval_free_over_moe"}
    with pytest.raises(SystemExit, match="no memory layer"):
        run_bench(["throughput", "--families", "dense:retrieval_free", "--batch-size", "2", "--seq-len", "16"])
