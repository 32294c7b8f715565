"""The `ultramem` command line, the top layer: one module per subcommand, each defining HELP,
add_arguments(parser) and run(args) -> int. `cli.main` assembles them; `python -m cli ...` = `ultramem ...`.

Module tops stay light (argparse, stdlib) so that `ultramem --help` and `ultramem sweep plan` start fast: each
command imports its heavy libraries (torch, Ray, scipy, pandas) inside run().
"""
