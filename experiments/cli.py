"""`ultramem` command line: one entry point, one module per subcommand (see experiments/commands/)."""

from __future__ import annotations

import argparse
import importlib
import sys

from ultramem.config import ConfigError

# name -> module defining HELP, add_arguments(parser), run(args)
COMMANDS = {
    "models": "experiments.commands.models",
    "data": "experiments.commands.data",
    "train": "experiments.commands.train",
    "sweep": "experiments.commands.sweep",
    "fit": "experiments.commands.fit",
    "plots": "experiments.commands.plots",
    "bench": "experiments.commands.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ultramem", description="Scaling-law experiment suite for dense, MoE, PKM and UltraMem language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_path in COMMANDS.items():
        module = importlib.import_module(module_path)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
