"""Weights & Biases as an optional mirror of the run folder. The folder is the record; W&B is never fatal.

- wandb is imported only when the mode is not 'disabled' (a sweep of 1,000 runs never pays for the import);
- mode: $WANDB_MODE when set, else `wandb.mode` of the run config (disabled | offline | online);
  offline writes a real `RUN_DIR/wandb/offline-run-*` directory that `wandb sync` uploads later;
- W&B files live inside the run folder (`dir=RUN_DIR`, so RUN_DIR/wandb/);
- the W&B run id is the run id with resume="allow", so a resumed attempt continues the same W&B run;
- group = `wandb.group` or the sweep name, job_type = `wandb.job_type` or the model family;
- x-axes (`define_metric`, AXES): the losses are charted against `flops`, the rest against `tokens` (every row
  carries both, so either is one click away in a panel's x-axis), so a sweep's group compares runs of different
  sizes at equal compute rather than at equal step;
- any exception from init, log or finish is reported once on stderr and turns the mirror off.
"""

from __future__ import annotations

import os
import sys
from typing import Any

INIT_TIMEOUT_S = 60.0
# step metric -> the metrics W&B charts against it by default
AXES = {
    "flops": ("loss", "val_loss", "aux_loss"),
    "tokens": ("lr", "grad_norm", "aux/*", "memory/*", "tokens_per_s", "flops_per_s", "mfu", "peak_mem_mb"),
}


class WandbMirror:
    def __init__(self, run: Any = None):
        self.run = run

    @property
    def active(self) -> bool:
        return self.run is not None

    @classmethod
    def start(cls, cfg: Any, run_dir: str | os.PathLike, run_id: str, config: dict[str, Any]) -> WandbMirror:
        """Open (or resume) the W&B run for `cfg` (a RunConfig); an inactive mirror if disabled or on failure."""
        mode = os.environ.get("WANDB_MODE") or cfg.wandb.mode
        if mode == "disabled":
            return cls()
        try:
            import wandb  # lazy: only when mirroring (module docstring); a disabled mirror never pays for it

            run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=cfg.name or run_id,
                id=run_id,
                resume="allow",
                group=cfg.wandb.group or cfg.sweep,
                job_type=cfg.wandb.job_type or config.get("family"),
                tags=list(cfg.wandb.tags),
                config=config,
                dir=os.fspath(run_dir),
                mode=mode,
                settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, console="off", silent=True),
            )
        except Exception as err:  # W&B is a mirror: training goes on without it
            _warn("init", err)
            return cls()
        try:
            define_axes(run)
        except Exception as err:  # the charts fall back to the step as x-axis; the mirror goes on
            _warn("define_metric", err)
        return cls(run)

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(flatten(record), step=step)
        except Exception as err:
            _warn("log", err)
            self.run = None

    def summary(self, final: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(flatten(final))
        except Exception as err:
            _warn("summary", err)
            self.run = None

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as err:
            _warn("finish", err)
        self.run = None


def define_axes(run: Any) -> None:
    """Declare AXES on a W&B run: each axis a step metric, its metrics charted against it."""
    for axis, metrics in AXES.items():
        run.define_metric(axis)
        for metric in metrics:
            run.define_metric(metric, step_metric=axis)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'aux': {'moe_z': 1.0}} -> {'aux/moe_z': 1.0}; None values are dropped (W&B charts ignore them)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif value is not None:
            out[name] = value
    return out


def _warn(what: str, err: BaseException) -> None:
    print(f"warning: W&B {what} failed ({type(err).__name__}: {err}); training continues, the run folder is "
          "the record (set wandb.mode: disabled or WANDB_MODE=disabled to silence)", file=sys.stderr)
