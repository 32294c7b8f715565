"""Benchmarks run by `ultramem bench <name>` (registry: cli/bench.py).

Each benchmark module defines HELP, add_arguments(parser) and run(args) -> int, times with `benchmarks.common`
(warm-ups, repeats, median and spread, peak memory) and writes `<name>.json` and `<name>.png` to
benchmarks/results/ (or --out) with the machine, torch version and thread count next to the numbers.
"""
