"""Run a benchmark; it prints a table (or JSON) and writes <name>.json and <name>.png to benchmarks/results/.

  ultramem bench layers [--format table|json] [--out DIR] [--threads N] [--repeats N] [--warmup N]

Each benchmark is a module benchmarks/<module>.py defining HELP, add_arguments(parser) and run(args) -> int;
`ultramem bench NAME -h` lists its options. The module (and torch with it) is imported only once NAME is chosen.
"""

from __future__ import annotations

import argparse
import importlib

HELP = "run a benchmark and write its JSON and plot to benchmarks/results/"

# name -> (module, one-line help); a new benchmark is one line here.
BENCHMARKS = {
    "layers": ("benchmarks.bench_layers", "layer fwd / fwd+bwd / inference time and memory vs lucidrains peers"),
    "inference": ("benchmarks.bench_inference", "decode latency and bytes read vs batch: every family (dense, MoE, UltraMem, UltraMemV2, Memory+)"),
    "throughput": ("benchmarks.bench_throughput", "training tokens/s (and MFU on GPU) per family, tiny presets"),
    "memsize": ("benchmarks.bench_memsize", "training step time vs value-table size at fixed activated compute (flat?)"),
    "trainer": ("benchmarks.bench_trainer", "trainer overhead vs a bare PyTorch loop, same model/data/steps (<= 10%)"),
    "scheduler": ("benchmarks.bench_scheduler", "sweep planning time and makespan of 12 short runs vs the ideal"),
    "fit": ("benchmarks.bench_fit", "4,500-start Chinchilla fit time (<= 5 s) and bootstrap CI coverage"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "benchmarks:\n" + "\n".join(f"  {n:<12} {h}" for n, (_, h) in BENCHMARKS.items())
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), metavar="NAME", help="one of: " + ", ".join(BENCHMARKS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (NAME -h lists them)")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHMARKS[args.benchmark][0])
    parser = argparse.ArgumentParser(prog=f"ultramem bench {args.benchmark}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.options)) or 0)
