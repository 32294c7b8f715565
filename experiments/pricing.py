"""What a planned run costs and whether it fits its GPUs: the GPU-hour price model and the per-run memory checks.

GPU-hours are training FLOPs at a given MFU of a GPU's peak dense bf16 FLOP/s. Memory per GPU is
`ultramem.accounting.train_memory` of the run's parallel layout and micro-batch; a run fits when that is at most
USABLE_GPU_MEMORY of the GPU's memory. Pure Python (no torch): `experiments.sweep.plan_sweep` calls it for every run.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from experiments.config import ParallelConfig
from ultramem.config import ModelConfig
from ultramem.layout import check_layout, train_memory

if TYPE_CHECKING:
    from ultramem.layout import ParallelLayout

# Peak dense bf16 FLOP/s per GPU (torchtitan `get_peak_flops`) and the MFUs the plan prices runs at.
PEAK_FLOPS = {"a100": 312e12, "h100": 989e12}
PLAN_MFUS = (0.3, 0.5)
GPU_MEMORY_GB = 80.0  # default per-GPU memory (A100-80GB, H100-80GB); resources.gpu_memory_gb overrides
USABLE_GPU_MEMORY = 0.9  # the rest is left to the CUDA context, NCCL buffers and allocator fragmentation
MAX_PLANNED_GPUS = 4096  # how far the planner looks for a GPU count that fits
SHARD_MORE = "parallel.fsdp, memory_parallel, expert_parallel, activation_checkpointing"


# ---- GPU-hours ---------------------------------------------------------------------------------------------------


def gpu_hours(flops: float, gpu: str, mfu: float) -> float:
    """Hours of one `gpu` ("a100", "h100") running `flops` at model FLOPs utilisation `mfu`."""
    return flops / (PEAK_FLOPS[gpu] * mfu) / 3600.0


def price_columns() -> list[tuple[str, str, float]]:
    """(column, gpu, mfu) of every price the plan reports: 'gpu_hours_a100_mfu30', ..."""
    return [(f"gpu_hours_{gpu}_mfu{round(mfu * 100)}", gpu, mfu) for gpu in PEAK_FLOPS for mfu in PLAN_MFUS]


# ---- layout and memory per GPU -----------------------------------------------------------------------------------


def usable_gb(gpu_memory_gb: float) -> float:
    """The memory a run may plan to use on a GPU of `gpu_memory_gb`."""
    return USABLE_GPU_MEMORY * gpu_memory_gb


def layout(config: dict[str, Any], nproc: int) -> ParallelLayout:
    """The parallel layout of a resolved run config (plain data) on `nproc` GPUs."""
    return ParallelConfig.model_validate(config["parallel"]).layout(nproc)


def check_run_layout(cfg: ModelConfig, config: dict[str, Any], nproc: int) -> ParallelLayout:
    """The run's layout on `nproc` GPUs; ConfigError (naming the parallel.* field) unless it can run `cfg`."""
    lay = layout(config, nproc)
    check_layout(cfg, lay)
    return lay


def memory_gb(cfg: ModelConfig, config: dict[str, Any], nproc: int) -> float:
    """Estimated peak GB per GPU of the resolved run config `config` (model `cfg`) on `nproc` GPUs (its
    micro-batch, capped by the sequences each GPU gets; bf16 compute unless train.dtype is fp32)."""
    t = config["train"]
    micro = min(t["micro_batch_size"], t["batch_size"] // nproc)
    return train_memory(cfg, layout(config, nproc), micro, t["seq_len"],
                        compute_bytes=4 if t["dtype"] == "fp32" else 2).gb


def does_not_fit(label: str, cfg: ModelConfig, config: dict[str, Any], nproc: int, gpu_memory_gb: float,
                 need_gb: float, strategy: str) -> str:
    """The error line of a run (`label`) that needs `need_gb` per GPU on `nproc` GPUs: what it needs, and the
    smallest GPU count where it would fit."""
    head = (f"{label}: {need_gb:.1f} GB per GPU with {strategy} on {nproc} GPUs > {usable_gb(gpu_memory_gb):.0f} "
            f"GB usable of {gpu_memory_gb:g}")
    lay = layout(config, nproc)
    step = math.lcm(lay.expert_parallel, lay.memory_parallel_size)
    batch = config["train"]["batch_size"]
    for n in range(nproc + 1, MAX_PLANNED_GPUS + 1):
        if n % step or batch % n:
            continue
        gb = memory_gb(cfg, config, n)
        if gb <= usable_gb(gpu_memory_gb):
            return (f"{head}; it needs {n} GPUs ({gb:.1f} GB each): set resources gpus and nproc to {n}, or shard "
                    f"more ({SHARD_MORE})")
    return (f"{head}; no GPU count up to {MAX_PLANNED_GPUS} that divides train.batch_size fits this layout: shard "
            f"more ({SHARD_MORE}) or lower train.micro_batch_size")
