"""`ultramem` command line: one entry point, one module per subcommand (`cli/<command>.py`).

The top layer of the project: it assembles `experiments`, `analysis` and `benchmarks`; nothing below imports it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ultramem.config import ConfigError

# name -> module defining HELP, add_arguments(parser), run(args)
COMMANDS = {
    "models": "cli.models",
    "data": "cli.data",
    "train": "cli.train",
    "sweep": "cli.sweep",
    "fit": "cli.fit",
    "seeds": "cli.seeds",
    "plots": "cli.plots",
    "hparams": "cli.hparams",
    "bench": "cli.bench",
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
    except BrokenPipeError:  # `ultramem models | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
