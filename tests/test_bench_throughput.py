"""`ultramem bench throughput` end to end on tiny steps: structure, tokens/s from the recorded samples, FLOPs per token
from the accounting module, no MFU on CPU; and that a benchmark step really trains (the loss falls on a fixed batch)."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest
import torch

from benchmarks.bench_throughput import Trainer, preset_name
from cli import bench
from ultramem.accounting import flops_per_token
from ultramem.presets import get_preset


def test_preset_names_follow_the_tiny_ladder():
    assert preset_name("ultramem", "tiny") == "ultramem-tiny"
    assert preset_name("moe", "t2").startswith("moe-t2-2in") and preset_name("dense", "t3") == "dense-t3"


def test_steps_train_the_model():
    trainer = Trainer("ultramem-tiny", batch_size=2, seq_len=16, device=torch.device("cpu"), lr=3e-3)
    first = trainer.steps(1)
    assert trainer.steps(20) < first  # 20 AdamW steps on one fixed batch must lower its loss


def test_bench_throughput_end_to_end(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    threads = torch.get_num_threads()
    try:
        rc = bench.run(parser.parse_args(["throughput", "--families", "dense,ultramem", "--batch-size", "2",
                                          "--seq-len", "16", "--steps", "2", "--repeats", "2", "--warmup", "0",
                                          "--threads", "1", "--out", str(tmp_path), "--format", "json"]))
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert json.loads(capsys.readouterr().out) == data and (tmp_path / "throughput.png").stat().st_size > 0
    assert [r["family"] for r in data["rows"]] == ["dense", "ultramem"]
    for r in data["rows"]:
        assert len(r["samples_ms"]) == 2
        tokens = 2 * 16 * 2
        assert r["tokens_per_s"] == pytest.approx(tokens / (statistics.median(r["samples_ms"]) / 1e3))
        assert r["step_ms"] == pytest.approx(statistics.median(r["samples_ms"]) / 2)
        cfg = get_preset(r["preset"])
        assert r["flops_per_token"] == pytest.approx(flops_per_token(cfg, 16, training=True))
        assert r["mfu"] is None  # CPU: no honest peak
