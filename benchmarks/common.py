"""What every benchmark shares: arguments, timing (median and spread), peak memory, machine info, JSON, table, plot.

Timing: `time_round_robin` warms every case up, then runs the repeats in rounds, each round timing every case once
in a rotated order. On a shared, noisy machine a load spike then hits all cases alike, so ratios between
implementations measured in one run stay meaningful even when absolute times drift. `--clock cpu` times the CPU
time of this process instead of the wall clock: a call then is not charged for the time other processes hold its
core, which makes relative costs measurable on a loaded machine. It equals the latency only at --threads 1 (with
more threads it adds the threads' times up, spin-waits included) and never on CUDA, so it is refused there.

Peak memory of one call, beyond what was live before it:
  - CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before;
  - CPU (Linux): the resident-set high-water mark. glibc's free heap is first returned to the OS (malloc_trim),
    the kernel's mark is reset (`5` > /proc/self/clear_refs), and the peak is VmHWM after the call minus VmRSS
    before it. It counts every allocation (torch's, numpy's, Python's), page-granular; None where unsupported.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from experiments import textfmt

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_common_arguments(parser: argparse.ArgumentParser, *, warmup: int = 3, repeats: int = 10,
                         threads: int | None = 2, clock: bool = False) -> None:
    parser.add_argument("--format", choices=("table", "json"), default="table", help="what to print (default table)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help=f"folder for <name>.json and <name>.png (default {RESULTS_DIR})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch intra-op threads on CPU (default {threads})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed calls per case first (default {warmup})")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed calls per case (default {repeats})")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")
    if clock:
        parser.add_argument("--clock", choices=CLOCKS, default="wall",
                            help="wall (latency, default) or cpu (process CPU time: relative costs on a loaded "
                                 "machine; use with --threads 1)")


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and resolve --device; errors name the flag."""
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"error: --repeats must be >= 1 and --warmup >= 0 (got {args.repeats}, {args.warmup})")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be >= 1 (got {args.threads})")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False (use --device cpu)")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if getattr(args, "clock", "wall") == "cpu" and device.type == "cuda":
        raise SystemExit("error: --clock cpu measures host CPU time, not GPU work; use --clock wall on CUDA")
    return device


# ---- timing ------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    samples_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr(self) -> float:
        """Interquartile range (p75 - p25), the spread reported next to each median."""
        if len(self.samples_ms) < 2:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q[2] - q[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu")


def time_round_robin(cases: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                     repeats: int, clock: str = "wall") -> dict[str, Timing]:
    """Time of each zero-argument callable (`clock` wall or cpu, see the module docstring): `warmup` untimed calls
    each, then `repeats` interleaved rounds."""
    if clock not in CLOCKS:
        raise ValueError(f"time_round_robin: clock={clock!r}; allowed: {', '.join(CLOCKS)}")
    now = time.perf_counter if clock == "wall" else time.process_time
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start = now()
            cases[name]()
            synchronize(device)
            samples[name].append((now() - start) * 1e3)
    return {name: Timing(s) for name, s in samples.items()}


# ---- memory ------------------------------------------------------------------------------------------------------


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one call of `fn` above what was live before it (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not _reset_rss_peak():
        return None
    base = _proc_status_kb("VmRSS")
    fn()
    return (_proc_status_kb("VmHWM") - base) / 1024


def _reset_rss_peak() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# ---- machine -----------------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "git_commit": _git_commit(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import triton  # lazy: optional (the `gpu` extra); probed only to record its version

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def load_warning(threads: int) -> str | None:
    """A warning when other processes compete for the cores: timings then measure the scheduler as much as the
    code (with several torch threads, every parallel region waits for its slowest thread). `threads` is what this
    process is about to add: the 1-min average already counts it after a measurement, so pass 0 then."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load + threads > cpus + 0.5:
        return (f"machine busy: 1-min load average {load:.1f} on {cpus} logical CPUs (plus {threads} threads here); "
                "timings are unreliable; rerun on a quiet machine")
    return None


def spread_warnings(rows: Sequence[dict[str, Any]], metrics: Sequence[str], limit: float = 0.25) -> list[str]:
    """One line per row and metric whose interquartile range exceeds `limit` times its median."""
    out = []
    for r in rows:
        for m in metrics:
            med, iqr = r.get(f"{m}_ms"), r.get(f"{m}_ms_iqr")
            if med and iqr is not None and iqr > limit * med:
                out.append(f"{r['impl']}/{r['layer']} {m}: spread (IQR) {iqr:.3g} ms is {iqr / med:.0%} of the median")
    return out


# ---- output ------------------------------------------------------------------------------------------------------


def header(name: str, device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    """The metadata every results JSON starts with."""
    return {
        "benchmark": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "settings": settings,
    }


def write_json(payload: dict[str, Any], path: Path) -> Path:
    """Atomic write (temp file + rename) so a reader never sees half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Plain fixed-width table; `columns` are (key, header); floats get 4 significant digits, missing -> '-'."""
    cells = [[textfmt.cell(r.get(k)) for k, _ in columns] for r in rows]
    return textfmt.format_table([h for _, h in columns], cells, strip=False)


def grouped_bar_plot(labels: Sequence[str], series: dict[str, Sequence[float | None]], path: Path, *, title: str,
                     ylabel: str, log: bool = True) -> Path:
    """One group of bars per label, one bar per series (missing values are left out)."""
    import matplotlib  # lazy: only when a plot is written (--no-plot skips it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the file-only backend

    n = len(series)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) * max(n, 1) * 0.45 + 2), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@contextmanager
def spying_lookups(memories: list[torch.nn.Module], record: Callable[[torch.nn.Module, Any], None]) -> Iterator[None]:
    """Within the block, every call of `mem.lookup` of these memory layers also passes (mem, its output) to `record`
    (an instance attribute shadows the method; removed on exit)."""
    for mem in memories:
        def lookup(*args, mem=mem, method=mem.lookup):  # noqa: ANN002, ANN202
            out = method(*args)
            record(mem, out)
            return out
        mem.lookup = lookup
    try:
        yield
    finally:
        for mem in memories:
            del mem.lookup


__all__ = [
    "RESULTS_DIR",
    "CLOCKS",
    "Timing",
    "add_common_arguments",
    "setup",
    "synchronize",
    "time_round_robin",
    "peak_memory_mb",
    "load_warning",
    "spread_warnings",
    "machine_info",
    "header",
    "write_json",
    "format_table",
    "grouped_bar_plot",
    "spying_lookups",
]
