"""The sweep planner's per-GPU memory and strategy, its refusal of runs that do not fit, and the layout checks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from experiments.pricing import USABLE_GPU_MEMORY, memory_gb
from experiments.sweep import plan_sweep, plan_table
from ultramem.accounting import count_params
from ultramem.config import ConfigError
from ultramem.layout import ParallelLayout, check_layout, train_memory
from ultramem.presets import get_preset

REPO = Path(__file__).resolve().parents[1]


def _sweep(tmp_path, preset: str, parallel: str, gpus: int = 8, micro: int = 4, seq_len: int = 2048) -> object:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(f"""
        name: s
        base:
          data: {{source: embedded, tokenizer: byte, vocab_size: 50304}}
          train: {{batch_size: 2048, steps: 10, seq_len: {seq_len}, micro_batch_size: {micro}}}
          parallel: {parallel}
        parameters: {{model.preset: {{value: {preset}}}}}
        resources: {{default: {{cpus: 8, gpus: {gpus}, nproc: {gpus}}}}}
    """))
    return path


def test_paper_sweep_shows_strategy_and_fits_8_gpus(monkeypatch):
    monkeypatch.chdir(REPO)
    plan = plan_sweep(REPO / "sweeps" / "paper_v1.yaml")
    by_preset = {r.preset: r for r in plan.runs}
    assert by_preset["ultramem-1.6b-x12"].strategy == "mp-dim8+fsdp"
    assert by_preset["dense-151m"].strategy == "ddp"
    assert all(0 < r.memory_per_gpu_gb <= USABLE_GPU_MEMORY * 80 for r in plan.runs)
    table = plan_table(plan)
    assert "strategy" in table and "GB/GPU" in table and "mp-dim8+fsdp" in table


def test_a_run_that_does_not_fit_is_refused_with_the_gpu_count_it_needs(tmp_path):
    # UltraMem-1.6B-x12 with FSDP alone: FSDP all-gathers each 3.3G-entry value table in turn (6.6 GB in bf16)
    # and reduce-scatters its 13 GB fp32 gradient, on top of 43 GB of sharded state
    with pytest.raises(ConfigError) as err:
        plan_sweep(_sweep(tmp_path, "ultramem-1.6b-x12", "{fsdp: true}"))
    msg = str(err.value)
    assert "ultramem-1.6b-x12" in msg and "with fsdp on 8 GPUs" in msg
    needed = int(msg.split("it needs ")[1].split(" GPUs")[0])
    # the smallest count that divides the batch and fits, by the same estimate
    cfg = get_preset("ultramem-1.6b-x12").override({"vocab_size": 50304})
    config = {"model": {"preset": "ultramem-1.6b-x12", **cfg.to_dict()},
        "train": {"micro_batch_size": 4, "batch_size": 2048, "seq_len": 2048, "dtype": "auto"},
        "parallel": {"fsdp": True, "activation_checkpointing": False, "expert_parallel": 1,
                     "memory_parallel": {"mode": "none", "size": 1}}}
    fits = [n for n in range(8, needed + 1) if 2048 % n == 0 and memory_gb(cfg, config, n) <= 72]
    assert fits == [needed]
    # with memory parallelism the same run fits the 8 GPUs
    plan = plan_sweep(_sweep(tmp_path, "ultramem-1.6b-x12", "{fsdp: true, memory_parallel: {mode: dim, size: 8}}"))
    assert plan.runs[0].memory_per_gpu_gb < 72


def test_state_per_gpu_is_16_bytes_per_held_parameter():
    cfg = get_preset("ultramem-1.6b-x12")
    pc = count_params(cfg)
    # every parameter sharded 8 ways (value tables by memory parallelism, the rest by FSDP)
    m = train_memory(cfg, ParallelLayout(8, fsdp=True, memory_parallel="dim", memory_parallel_size=8), 4, 2048)
    assert m.state == pytest.approx(16 * pc.total / 8)
    # memory parallelism over 4 of 8 ranks: tables held by 2 ranks each, the dense rest replicated (DDP)
    m = train_memory(cfg, ParallelLayout(8, memory_parallel="row", memory_parallel_size=4), 4, 2048)
    assert m.state == pytest.approx(16 * (pc.sparse / 4 + pc.total - pc.sparse))
    moe = get_preset("moe-151m-2in32")
    pm = count_params(moe)
    m = train_memory(moe, ParallelLayout(8, expert_parallel=8), 16, 2048)
    assert m.state == pytest.approx(16 * (pm.sparse / 8 + pm.total - pm.sparse))


@pytest.mark.parametrize("preset, parallel, needle", [
    ("dense-t1", "{memory_parallel: {mode: dim, size: 2}}", "memory_parallel.mode: 'dim' is implemented for UltraMem"),
    ("moe-t1-2in12", "{expert_parallel: 8}", "expert_parallel: 8 must divide parallel.nproc (2)"),
    ("ultramem-t1-x6", "{memory_parallel: {mode: dim, size: 4}}", "memory_parallel.size: 4 must be >= 2 and divide"),
    ("ultramem-t1-x6", "{memory_parallel: {mode: none, size: 2}}", "with mode 'none'"),
])
def test_planner_rejects_layouts_the_model_cannot_use(tmp_path, preset, parallel, needle):
    with pytest.raises(ConfigError, match="run 0") as err:
        plan_sweep(_sweep(tmp_path, preset, parallel, gpus=2, micro=1, seq_len=64))
    assert needle in str(err.value)


def test_single_process_cannot_shard():
    with pytest.raises(ConfigError, match="with parallel.nproc 1"):
        check_layout(get_preset("dense-t1"), ParallelLayout(1, fsdp=True))


def test_trainer_refuses_a_layout_before_training(tmp_path):
    from experiments.config import run_config_from_dict
    from experiments.trainer import train

    cfg = run_config_from_dict({"model": {"preset": "dense-t1"}, "train": {"steps": 1},
                                "parallel": {"expert_parallel": 2, "nproc": 1}}, "run.yaml")
    with pytest.raises(ConfigError, match=r"^run.yaml: parallel: .* with parallel.nproc 1 set"):
        train(cfg, tmp_path / "run", source="run.yaml")
    assert not (tmp_path / "run" / "checkpoints").exists()
