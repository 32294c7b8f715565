"""Throughput metrics in one place: tokens/s, FLOPs/s, MFU and peak memory (torchtitan's metrics-module habit).

FLOPs per token come from `ultramem.accounting.flops_per_token` (activated parameters only, attention included,
forward + backward), so MFU counts the useful work of a sparse model, not the dense-equivalent work. MFU is the
achieved FLOPs/s over the summed peak of every process's accelerator; it is None on CPU, where no honest peak
exists, and on GPUs missing from PEAK_FLOPS.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator

import torch

# Dense (non-sparse) peak FLOPs/s per GPU from the vendor datasheets: bf16 on tensor cores, fp32 on CUDA cores.
# Matched against torch.cuda.get_device_name() by substring, most specific first.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4e12, "fp32": 66.9e12},
    "H100 NVL": {"bf16": 835.0e12, "fp32": 60.0e12},
    "H100 PCIe": {"bf16": 756.0e12, "fp32": 51.2e12},
    "H100": {"bf16": 989.4e12, "fp32": 66.9e12},  # SXM5 ("NVIDIA H100 80GB HBM3")
    "A100": {"bf16": 312.0e12, "fp32": 19.5e12},
}


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOPs/s of one accelerator for `dtype` ('bf16' | 'fp32'); None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), dtype)


def peak_flops_of(gpu_name: str, dtype: str) -> float | None:
    """PEAK_FLOPS entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3'; None if unknown."""
    for key, peaks in PEAK_FLOPS.items():
        if key in gpu_name:
            return peaks[dtype]
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # macOS reports bytes, Linux KiB


class ThroughputMeter:
    """Training rates over a window of optimizer steps: `start()` opens a window, `rates(tokens)` closes it, and
    time spent inside `with meter.paused():` (evaluation, checkpoints) is left out.

    `tokens` is the global count processed in the window (all processes), so FLOPs/s and MFU are global too.
    """

    def __init__(self, flops_per_token: float, device: torch.device, dtype: str, world_size: int = 1):
        self.flops_per_token = flops_per_token
        self.device = device
        peak = peak_flops(device, dtype)
        self.peak_total = None if peak is None else peak * world_size
        self.start()

    def start(self) -> None:
        self.t0, self.excluded = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def rates(self, tokens: int) -> dict[str, float | None]:
        """Call after a host-device sync (reading the loss), so the elapsed time covers the queued GPU work."""
        elapsed = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        tokens_per_s = tokens / elapsed
        flops_per_s = tokens_per_s * self.flops_per_token
        mfu = None if self.peak_total is None else flops_per_s / self.peak_total
        return {"tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s, "mfu": mfu,
                "peak_mem_mb": peak_memory_mb(self.device)}
