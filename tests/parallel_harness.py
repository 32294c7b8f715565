"""Helpers for the torch.distributed tests (tests/test_parallel_*.py): spawn gloo ranks, build reference models.

`spawn(fn, world_size, tmp_path, *args)` runs `fn(rank, world_size, *args)` in `world_size` fresh processes joined in
one gloo group (or NCCL with backend="nccl", rank r on GPU r; file rendezvous under tmp_path, one intra-op thread
each); an exception on any rank fails the test.
Each rank computes its single-process reference itself, so nothing has to travel back to the test process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(fn: Any, world_size: int, tmp_path: Path, *args: Any, backend: str = "gloo") -> None:
    init = tmp_path / f"rendezvous-{fn.__name__}-{world_size}"
    init.unlink(missing_ok=True)
    mp.spawn(_entry, args=(fn, world_size, str(init), backend, args), nprocs=world_size, join=True)


def _entry(rank: int, fn: Any, world_size: int, init: str, backend: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (collective: every rank must call it), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
