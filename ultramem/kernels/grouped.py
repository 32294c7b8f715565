"""Grouped matmul for MoE experts: `torch._grouped_mm` behind a capability probe.

Given rows `x` [S, K] sorted by group and group sizes `counts` [G], the grouped matmul computes
`out[rows of g] = x[rows of g] @ w[g]` for every group g in one call (offsets = cumsum(counts), int32).

What this build (torch 2.13 CPU) does, checked by `grouped_mm_unsupported_reason` at run time rather than assumed:
  - fp32, bf16 and fp16 forward and backward are exact against per-group matmuls, empty groups included;
  - fp64 is rejected ("Expected mat_a to be Float32, BFloat16 or Float16");
  - every row stride must be a multiple of 16 bytes ("strides should be multiple of 16 bytes"), so K and N must
    be multiples of 4 (fp32) or 8 (bf16/fp16);
  - the backward rejects a gradient with zero strides, which is what `out.sum().backward()` produces (an expanded
    scalar): "Invalid strides/sizes, got [0, 0] for strides". This, not empty groups, is why a quick
    `y.sum().backward()` check fails; `grouped_mm` makes the incoming gradient contiguous to avoid it.
"""

from __future__ import annotations

import functools

import torch

_STRIDE_ALIGN_BYTES = 16


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, K] rows sorted by group, w [G, K, N], offs [G] int32 = cumsum(counts) -> [S, N]."""
    out = torch._grouped_mm(x, w, offs=offs)
    if out.requires_grad:
        out.register_hook(lambda g: g.contiguous())
    return out


def grouped_mm_unsupported_reason(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> str | None:
    """None if `grouped_mm` works for (device, dtype) with inner/outer sizes `dims`; else why it does not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    itemsize = torch.empty((), dtype=dtype).element_size()
    bad = [n for n in dims if (n * itemsize) % _STRIDE_ALIGN_BYTES]
    if bad:
        return (f"row strides of {bad} x {itemsize}-byte {dtype} elements are not multiples of "
                f"{_STRIDE_ALIGN_BYTES} bytes")
    return _probe(torch.device(device).type, dtype)


@functools.cache
def _probe(device_type: str, dtype: torch.dtype) -> str | None:
    """Run a tiny forward + backward with an empty group and compare it with per-group matmuls."""
    counts = [2, 0, 3]
    with torch.enable_grad(), torch.autocast(device_type, enabled=False):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(sum(counts), 8, generator=gen).to(device_type, dtype).requires_grad_()
        w = torch.randn(len(counts), 8, 16, generator=gen).to(device_type, dtype).requires_grad_()
        g = torch.randn(sum(counts), 16, generator=gen).to(device_type, dtype)
        offs = torch.tensor(counts, device=device_type).cumsum(0).to(torch.int32)
        try:
            got = grouped_mm(x, w, offs)
            got_grads = torch.autograd.grad(got, (x, w), g)
        except (RuntimeError, NotImplementedError) as err:
            return f"torch._grouped_mm failed on {device_type}/{dtype}: {str(err).splitlines()[0]}"
        ref = torch.cat([xe @ w[e] for e, xe in enumerate(x.split(counts))])
        ref_grads = torch.autograd.grad(ref, (x, w), g)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("output", "grad x", "grad w"), (got, *got_grads), (ref, *ref_grads), strict=True):
        if not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol):
            return f"torch._grouped_mm {name} differs from per-group matmuls on {device_type}/{dtype}"
    return None
