"""`python -m experiments.run_one RUN_DIR`: train the run whose resolved config.yaml is in RUN_DIR.

The scheduler's unit of work (it never imports the trainer): one process, or one per GPU under
`torchrun --standalone --nproc_per_node=K -m experiments.run_one RUN_DIR`. A SIGKILL is an ordinary failed
attempt; the next attempt resumes from the newest checkpoint.

Exit codes: 0 done, 1 failed (status.json holds the error), 2 bad configuration, 3 diverged, 4 another process
is training this run.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from ultramem.config import ConfigError

EXIT_DONE, EXIT_FAILED, EXIT_CONFIG, EXIT_DIVERGED, EXIT_BUSY = 0, 1, 2, 3, 4


def launch_command(run_dir: str | Path, nproc: int = 1, python: str = sys.executable) -> list[str]:
    """The command that trains RUN_DIR: `python -m experiments.run_one RUN_DIR`, or under torchrun with one process
    per GPU (`--standalone --nproc_per_node=K`) when nproc > 1. Used by the scheduler and `ultramem train`."""
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "experiments.run_one", str(run_dir)]
    return [python, "-m", "experiments.run_one", str(run_dir)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m experiments.run_one RUN_DIR", file=sys.stderr)
        return EXIT_CONFIG
    # lazy: `launch_command` is imported by the scheduler, which must not import torch or the trainer
    from experiments.config import load_run_config
    from experiments.distributed import teardown
    from experiments.trainer import Diverged, RunBusy, train
    from runfolder import RunDir

    rd = RunDir(args[0])
    try:
        cfg = load_run_config(rd.config_path)
        final = train(cfg, rd.path, source=str(rd.config_path))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except Diverged as err:
        print(f"diverged: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except RunBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BUSY
    except Exception as err:
        traceback.print_exc()  # for train.log; the last line is the summary (status.json holds it too)
        from experiments.trainer import describe_error

        print(f"error: {describe_error(err, rd.path)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        teardown()
    print(f"done: {rd.path} val_loss={final.get('val_loss')} train_loss={final.get('train_loss')}", file=sys.stderr)
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
