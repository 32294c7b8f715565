"""`make gpu-check`: everything of the CUDA path in one command, on one NVIDIA GPU, in <= 8 minutes.

  python -m benchmarks.gpu_check [--out DIR] [--budget-s 480] [--sections pytest,triton,train,decode]

Sections (each under its own time limit, each failure recorded in the JSON instead of ending the run):
  pytest   `pytest -m gpu` (tests/test_retrieval.py's Triton-on-CUDA test, tests/test_parallel_train.py's GPU test)
  triton   the Triton retrieval kernels against the PyTorch path (`ultramem.kernels.retrieval`), fp32 and bf16:
           max |error| of the output and both gradients relative to the fp32 torch result, and fwd+bwd ms of each
  train    training tokens/s, MFU (bf16 autocast, fused AdamW) and peak memory against `ultramem.layout.train_memory`
           for dense-151m, moe-151m-2in32, ultramem-151m-x12 (seq 2048, micro-batch 8) and ultramem_v2-227m,
           memory_plus-227m (seq 4096, micro-batch 4): the step of `ultramem bench throughput`
  decode   `ultramem bench inference --device cuda`: decode latency vs batch of every family (the paper's Fig. 1)
Writes DIR/gpu_check.json (default benchmarks/results/) and prints a short table. Without CUDA it prints one line
saying what it skipped and exits 0 (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("pytest", "triton", "train", "decode")
TRAIN_CASES = (  # preset, micro-batch, seq_len
    ("dense-151m", 8, 2048), ("moe-151m-2in32", 8, 2048), ("ultramem-151m-x12", 8, 2048),
    ("ultramem_v2-227m", 4, 4096), ("memory_plus-227m", 4, 4096),
)
LIMITS_S = {"pytest": 150, "triton": 60, "train": 180, "decode": 150}  # per section, within --budget-s


def skip_line() -> str:
    return ("gpu-check: skipped: no CUDA device (torch.cuda.is_available() is False); not run: "
            + ", ".join(SECTIONS) + " (pytest -m gpu, Triton vs torch fp32/bf16, training tokens/s + MFU + peak "
            "memory, decode latency vs batch)")


def pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line: '3 passed, 1 skipped in 2.1s' -> {'passed': 3, 'skipped': 1}."""
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)", text)}


def run_pytest(limit: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {limit:.0f} s"}
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "counts": pytest_summary(tail[0]),
            "summary": tail[0], "output_tail": proc.stdout[-3000:] + proc.stderr[-1000:]}


def cuda_ms(fn: Callable[[], Any], repeats: int = 10) -> float:
    """Median ms of fn() on CUDA after one warm-up call (events, synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_triton(limit: float) -> dict[str, Any]:
    """gather_pool at the layer benchmark's matched shapes: 4096 tokens x 32 slots of a [16384, 256] table, C 2, E 4."""
    from ultramem.kernels.retrieval import gather_pool, triton_available

    if not triton_available():
        return {"ok": False, "error": "triton is not importable (pip install -e '.[gpu]')"}
    dev, gen = torch.device("cuda"), torch.Generator().manual_seed(0)
    T, K, N, Dv, C, E = 4096, 32, 16384, 256, 2, 4
    rows = torch.randint(0, N, (T, K), generator=gen).to(dev)
    groups = torch.randint(0, E, (T, K), generator=gen).to(dev)
    values32 = torch.randn(N, Dv, generator=gen).to(dev)
    scores32 = torch.randn(T, K, C, generator=gen).to(dev)
    grad_out = torch.randn(T, E * Dv, generator=gen).to(dev)

    def fwd_bwd(backend: str, dtype: torch.dtype) -> list[torch.Tensor]:
        v = values32.to(dtype).requires_grad_(True)
        s = scores32.to(dtype).requires_grad_(True)
        out = gather_pool(v, rows, s, groups, E, backend=backend)
        out.backward(grad_out.to(out.dtype))
        return [out.float(), v.grad.float(), s.grad.float()]

    ref = fwd_bwd("torch", torch.float32)
    result: dict[str, Any] = {"ok": True, "shapes": {"T": T, "K": K, "N": N, "Dv": Dv, "C": C, "E": E}, "cases": []}
    for dtype in (torch.float32, torch.bfloat16):
        got = fwd_bwd("triton", dtype)
        err = [float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(got, ref, strict=True)]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        case = {"dtype": str(dtype).removeprefix("torch."), "rel_err_out_grad_values_grad_scores": err,
                "tolerance": tol, "ok": max(err) <= tol,
                "triton_ms": cuda_ms(lambda d=dtype: fwd_bwd("triton", d)),
                "torch_ms": cuda_ms(lambda d=dtype: fwd_bwd("torch", d))}
        result["ok"] &= case["ok"]
        result["cases"].append(case)
    return result


def train_case(preset: str, batch: int, seq_len: int, steps: int = 5) -> dict[str, Any]:
    from benchmarks.bench_throughput import Trainer
    from experiments.throughput import ThroughputMeter
    from ultramem.layout import ParallelLayout, train_memory

    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tr = Trainer(preset, batch, seq_len, dev)
    tr.steps(2)  # warm-up (allocator, kernels' autotuning)
    torch.cuda.synchronize()
    start = time.perf_counter()
    loss = tr.steps(steps)  # ends with float(loss): a host sync
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    tokens_per_s = batch * seq_len * steps / seconds
    meter = ThroughputMeter(tr.flops_per_token, dev, "bf16")
    predicted = train_memory(tr.cfg, ParallelLayout(), batch, seq_len).total
    del tr
    gc.collect()
    return {"preset": preset, "micro_batch": batch, "seq_len": seq_len, "loss": loss, "step_ms": seconds / steps * 1e3,
            "tokens_per_s": tokens_per_s, "mfu": None if meter.peak_total is None
            else tokens_per_s * meter.flops_per_token / meter.peak_total,
            "peak_gb": peak / 1e9, "predicted_gb": predicted / 1e9, "peak_over_predicted": peak / predicted}


def run_train(limit: float) -> dict[str, Any]:
    start, cases, ok = time.monotonic(), [], True
    for preset, batch, seq_len in TRAIN_CASES:
        if time.monotonic() - start > limit:
            cases.append({"preset": preset, "error": "skipped: section time limit reached"})
            ok = False
            continue
        try:
            cases.append(train_case(preset, batch, seq_len))
        except Exception as err:  # OOM or a kernel failure: recorded, the next preset still runs
            cases.append({"preset": preset, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            ok = False
            gc.collect()
            torch.cuda.empty_cache()
    return {"ok": ok, "precision": "bf16 autocast, fused AdamW", "cases": cases}


def run_decode(limit: float, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "cli.main", "bench", "inference", "--device", "cuda", "--repeats", "3",
           "--warmup", "1", "--out", str(out / "gpu_check_inference"), "--no-plot", "--format", "json"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {limit:.0f} s"}
    if proc.returncode != 0:
        return {"ok": False, "returncode": proc.returncode, "error": proc.stderr[-2000:]}
    payload = json.loads(proc.stdout)
    keep = ("batch_size", "family", "kv_len_used", "latency_ms")
    rows = [{k: r.get(k) for k in keep} for r in payload.get("rows", [])]
    ratios = payload.get("moe_ultramem_latency_ratio", {})
    return {"ok": True, "rows": rows, "moe_ultramem_latency_ratio": ratios, "memory_families":
            payload.get("memory_families"), "summary": "MoE/UltraMem " + ", ".join(
                f"{float(v):.2f}x @{b}" for b, v in ratios.items())}


def table(result: dict[str, Any]) -> str:
    lines = [f"gpu-check on {result['device']} (torch {result['torch']}), {result['seconds']:.0f} s"]
    for name, sec in result["sections"].items():
        lines.append(f"  {name:<7} {'ok' if sec.get('ok') else 'FAIL'}  {sec.get('summary') or sec.get('error') or ''}")
        for c in sec.get("cases", []):
            if "dtype" in c:
                lines.append(f"          {c['dtype']:<9} rel err {max(c['rel_err_out_grad_values_grad_scores']):.1e}"
                             f"  triton {c['triton_ms']:.2f} ms  torch {c['torch_ms']:.2f} ms")
            elif "error" in c:
                lines.append(f"          {c['preset']:<20} {c['error']}")
            else:
                mfu = "-" if c["mfu"] is None else f"{100 * c['mfu']:.1f}%"
                lines.append(f"          {c['preset']:<20} {c['tokens_per_s']:>9.0f} tok/s  MFU {mfu:>6}  peak "
                             f"{c['peak_gb']:.1f} GB (layout {c['predicted_gb']:.1f} GB)")
        for r in sec.get("rows", []):
            lines.append(f"          batch {r['batch_size']:>5} {r['family']:<12} {r['latency_ms']:.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--budget-s", type=float, default=480.0, help="total time budget (default 480 s = 8 min)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if bad := [s for s in sections if s not in SECTIONS]:
        print(f"error: --sections: unknown {bad}; allowed: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(skip_line())
        return 0
    from benchmarks.common import write_json

    start = time.monotonic()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sections": {}}
    runners = {"pytest": run_pytest, "triton": run_triton, "train": run_train,
               "decode": lambda limit: run_decode(limit, args.out)}
    for name in sections:
        left = args.budget_s - (time.monotonic() - start)
        if left < 20:
            result["sections"][name] = {"ok": False, "error": "skipped: --budget-s spent"}
            continue
        try:
            result["sections"][name] = runners[name](min(LIMITS_S[name], left))
        except Exception as err:  # one section's failure is a result, not the end of the check
            result["sections"][name] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:500]}"}
    result["seconds"] = time.monotonic() - start
    result["ok"] = all(s.get("ok") for s in result["sections"].values())
    path = write_json(result, args.out / "gpu_check.json")
    print(table(result))
    print(f"wrote {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
