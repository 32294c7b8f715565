"""Precision islands: where a computation must run in at least fp32 whatever the model's dtype.

The model runs in its parameters' dtype (fp32 on CPU, bf16 under autocast on GPU), but a few reductions are
numerically fragile in 16 bits: RoPE's rotation, the cross-entropy over the vocabulary, the MoE router's softmax
and z-loss, the Tucker cores' SVD and penalty, the summed auxiliary losses. `at_least_fp32` upcasts 16-bit floats
to fp32 and leaves fp32 and fp64 as they are, so a float64 model (the sharded-training equivalence test,
tests/test_parallel_train.py) stays float64 end to end instead of rounding through fp32 there.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit floats, else `dtype` itself (fp32, fp64)."""
    return torch.promote_types(dtype, torch.float32)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in compute_dtype(x.dtype): bf16 / fp16 -> fp32; fp32 and fp64 unchanged (no copy)."""
    return x.to(compute_dtype(x.dtype))
