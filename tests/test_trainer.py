"""The trainer on real tinyshakespeare tokens and real tiny models: the run record, what is logged, accumulation,
the value-LR schedule and Tucker refresh, divergence, folder safety."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import yaml

from experiments.config import run_config_from_dict
from experiments.resolve import model_config, resolve_run_config
from experiments.trainer import RunBusy, build_optimizer, lr_at, set_lr, setup_env, train, train_step
from runfolder import RunDir
from ultramem import build_model
from ultramem.accounting import flops_per_token
from ultramem.config import ConfigError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


def run_cfg(shakespeare_path, cache, preset="dense-t1", **train_fields):
    t = {"steps": 8, "batch_size": 4, "seq_len": 32, "log_every": 2, "eval_every": 4, "eval_batches": 2,
         "ckpt_every": 4, "threads": 1, "knowledge_probe": False, **train_fields}
    return run_config_from_dict({"model": {"preset": preset},
                                 "data": {"source": str(shakespeare_path), "cache_dir": str(cache)},
                                 "train": t}, "test")


def losses(rd: RunDir, kind: str = "train", key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rd.metrics() if r["kind"] == kind]


def test_a_run_leaves_the_documented_record(tmp_path, shakespeare_path, cache):
    cfg = run_cfg(shakespeare_path, cache)
    final = train(cfg, tmp_path / "run")
    rd = RunDir(tmp_path / "run")
    resolved = resolve_run_config(cfg)

    with open(rd.config_path) as f:
        assert yaml.safe_load(f) == resolved.model_dump(mode="json")
    status = rd.status()
    assert (status["state"], status["step"], status["total_steps"], status["tokens"]) == ("done", 8, 8, 8 * 4 * 32)
    assert status["error"] is None and status["finished_at"] >= status["started_at"]

    train_lines = [r for r in rd.metrics() if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == [2, 4, 6, 8]
    first = train_lines[0]
    for key in ("tokens", "flops", "loss", "lr", "aux", "grad_norm", "tokens_per_s", "flops_per_s", "mfu",
                "peak_mem_mb", "time"):
        assert key in first, key
    assert first["tokens"] == 2 * 4 * 32 and first["mfu"] is None and first["peak_mem_mb"] > 0
    assert first["lr"] == pytest.approx(lr_at(1, resolved.train))
    evals = losses(rd, "eval", "val_loss")
    assert [s for s, _ in evals] == [4, 8] and evals[-1][1] == pytest.approx(final["val_loss"])

    n_params = sum(p.numel() for p in build_model(model_config(resolved)).parameters())
    fpt = flops_per_token(model_config(resolved), 32, training=True)
    assert final["active_params"] == final["total_params"] == n_params  # dense: all parameters are active
    assert final["tokens"] == 8 * 4 * 32 and final["steps"] == 8
    assert final["flops"] == pytest.approx(final["tokens"] * fpt)
    assert final["train_loss"] == pytest.approx(train_lines[-1]["loss"])
    assert final["family"] == "dense" and final["memory"] is None and final["moe"] is None
    assert final["vocab_size"] == 257 and final["tokenizer"] == "byte"
    assert json.loads(rd.final_path.read_text()) == json.loads(json.dumps(final))
    assert [p.name for p in rd.checkpoints()] == ["step_00000004.pt", "step_00000008.pt"]

    before = rd.metrics_path.read_text()
    assert train(cfg, tmp_path / "run") == rd.final()  # a finished run is not trained again
    assert rd.metrics_path.read_text() == before

    # killed after its final checkpoint but before final.json: the re-run reports the same losses
    rd.final_path.unlink()
    rd.update_status(state="running")
    again = train(cfg, tmp_path / "run")
    for key in ("train_loss", "val_loss", "tokens", "flops", "steps"):
        assert again[key] == final[key], key
    assert rd.metrics_path.read_text() == before


def test_logged_loss_is_the_cross_entropy_and_aux_losses_are_separate(tmp_path, shakespeare_path, cache):
    cfg = run_cfg(shakespeare_path, cache, preset="moe-t1-2in12", steps=1, log_every=1, eval_every=1)
    train(cfg, tmp_path / "run")
    line = RunDir(tmp_path / "run").metrics()[0]

    # independent reference: the seeded initial model's cross-entropy on the loader's first batch
    from experiments.data import TokenLoader, prepare_data

    resolved = resolve_run_config(cfg)
    torch.manual_seed(resolved.seed)
    model = build_model(model_config(resolved))
    x, y = TokenLoader(prepare_data(resolved.data), "train", seq_len=32, batch_size=4, seed=resolved.seed).next_batch()
    with torch.no_grad():
        logits = model(x).logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    assert line["loss"] == pytest.approx(ce, rel=1e-5)
    assert set(line["aux"]) == {"moe_balance", "moe_z"}
    assert line["aux_loss"] > 0


def test_gradient_accumulation_matches_the_full_batch(tmp_path, shakespeare_path, cache):
    kw = {"steps": 4, "log_every": 1, "eval_every": 4}
    full = train(run_cfg(shakespeare_path, cache, micro_batch_size=4, **kw), tmp_path / "full")
    accum = train(run_cfg(shakespeare_path, cache, micro_batch_size=1, **kw), tmp_path / "accum")
    ref, got = losses(RunDir(tmp_path / "full")), losses(RunDir(tmp_path / "accum"))
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in ref], rel=1e-5)
    assert ref[1][1] != ref[0][1]  # the comparison covers steps after real updates
    assert accum["val_loss"] == pytest.approx(full["val_loss"], rel=1e-5)


def test_value_lr_multiplier_and_tucker_refresh_every_step(shakespeare_path, cache):
    from experiments.data import TokenLoader, prepare_data
    from ultramem.memory.tdqkr import TDQKR

    resolved = resolve_run_config(run_cfg(shakespeare_path, cache, preset="ultramem-t1-x6", steps=10, warmup=0))
    t, mem = resolved.train, model_config(resolved).memory
    env = setup_env(t)
    torch.manual_seed(0)
    model = build_model(model_config(resolved))
    opt, mult_fns = build_optimizer(model, t)
    names = [g["name"] for g in opt.param_groups]
    assert "values" in names

    step = 3
    base = set_lr(opt, mult_fns, step, t)
    progress = step / t.steps
    # official CosWithWarmup: times = 1 + (T - 1) * max(0, 1 - progress / rate)
    expected_mult = 1 + (mem.value_lr_mult - 1) * max(0.0, 1 - progress / mem.value_lr_decay)
    for group in opt.param_groups:
        want = base * (expected_mult if group["name"] == "values" else 1.0)
        assert group["lr"] == pytest.approx(want)

    tdqkrs = [m for m in model.modules() if isinstance(m, TDQKR)]
    before = [m.u.clone() for m in tdqkrs]
    x, y = TokenLoader(prepare_data(resolved.data), "train", seq_len=32, batch_size=4, seed=0).next_batch()
    train_step(model, model, opt, x, y, t, env)
    for m, u_before in zip(tdqkrs, before, strict=True):
        U, _, Vh = torch.linalg.svd(m.cores.detach().sum(0))  # [H, r, r]: the cores after the step
        assert torch.allclose(m.u.abs(), U[..., 0].abs(), atol=1e-5)
        assert torch.allclose(m.t.abs(), Vh[..., 0, :].abs(), atol=1e-5)
        assert not torch.equal(m.u, u_before)


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, shakespeare_path, cache):
    # an absurd LR ramp (2.5 more per step over a 40-step warmup): a few finite steps, then the gradients overflow
    cfg = run_cfg(shakespeare_path, cache, steps=40, lr=100.0, warmup=40, ckpt_every=2, log_every=1, eval_every=100)
    rd = RunDir(tmp_path / "run")
    rd.write_config(resolve_run_config(cfg).model_dump(mode="json"))
    proc = subprocess.run([sys.executable, "-m", "experiments.run_one", str(rd.path)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr
    status = rd.status()
    assert status["state"] == "diverged"
    assert "became" in status["error"] and "train.lr" in status["error"]
    bad_step = status["step"]
    assert 2 < bad_step < 40
    assert "diverged" in proc.stderr
    assert rd.final() is None
    ckpts = rd.checkpoints()
    assert ckpts, "the run should have checkpointed before diverging"
    newest = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    assert newest["step"] < bad_step
    assert all(torch.isfinite(v).all() for v in newest["model"].values() if v.is_floating_point())
    assert all(s < bad_step and math.isfinite(v) for s, v in losses(rd))  # nothing non-finite is logged


def test_a_folder_holding_another_run_is_refused(tmp_path, shakespeare_path, cache):
    rd = RunDir(tmp_path / "run")
    rd.write_config(resolve_run_config(run_cfg(shakespeare_path, cache)).model_dump(mode="json"))
    with pytest.raises(ConfigError, match=r"train\.lr"):
        train(run_cfg(shakespeare_path, cache, lr=1e-3), rd.path)


def test_a_run_held_by_another_process_is_refused(tmp_path, shakespeare_path, cache):
    rd = RunDir(tmp_path / "run")
    with rd.lock() as ours:
        assert ours
        with pytest.raises(RunBusy, match="another process"):
            train(run_cfg(shakespeare_path, cache), rd.path)


def test_throughput_rates_and_the_peak_flops_table():
    from experiments.throughput import ThroughputMeter, peak_flops_of

    meter = ThroughputMeter(flops_per_token=6e6, device=torch.device("cpu"), dtype="fp32")
    time.sleep(0.05)
    rates = meter.rates(tokens=1000)
    assert rates["mfu"] is None  # no honest peak on CPU
    assert rates["flops_per_s"] == pytest.approx(rates["tokens_per_s"] * 6e6)
    assert 0 < rates["tokens_per_s"] <= 1000 / 0.05
    # vendor datasheets, dense bf16 / fp32
    assert peak_flops_of("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops_of("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops_of("NVIDIA H200", "fp32") == pytest.approx(66.9e12)
    assert peak_flops_of("NVIDIA GeForce RTX 4090", "bf16") is None
