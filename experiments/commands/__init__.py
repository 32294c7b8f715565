"""One module per `ultramem` subcommand. Each defines HELP, add_arguments(parser) and run(args) -> int.

Top-level imports stay light (argparse, stdlib): heavy libraries are imported inside run().
"""
