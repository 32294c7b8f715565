"""The training loop: one resolved RunConfig in, one complete run folder out (docs/training.md).

    final = train(cfg, run_dir)      # resolves cfg, trains, auto-resumes from run_dir/checkpoints

- AdamW (beta1 0.9, beta2 0.95, weight decay 0.1 by default: paper Table 4) over the model's own parameter groups
  (`model.param_groups`: which tensors decay is the model library's decision, and each group's LR multiplier is a
  function of training progress, e.g. the value-table multiplier decaying to 1x);
- LR: linear warmup, then cosine to `min_lr_ratio` of the peak at the last step;
- gradient accumulation over micro-batches, gradient clipping, `model.on_optimizer_step()` after every optimizer
  step (the TDQKR rank-1 refresh), auxiliary losses added to the loss and logged separately;
- bf16 autocast on CUDA, fp32 on CPU; optional torch.compile; DDP under torchrun (nccl on CUDA, gloo on CPU), or
  the sharded layouts of `parallel` (FSDP, expert and memory parallelism: experiments/distributed.py);
- validation on the held-out split every `eval_every` steps and at the end; throughput and MFU at every log line;
- checkpoints (atomic) every `ckpt_every` steps and at the end; a re-run resumes from the newest one and reaches
  the same final state as an uninterrupted run (same data order, same RNG);
- WSD cooldown branches: a trunk (`train.branches`) also saves and keeps (`branch_points/`) its checkpoint at each
  branch step; a branch run (`train.branch_of`) with no checkpoint of its own starts from its trunk's kept
  checkpoint of its branch step (a sibling run folder), so it is the trunk's run cooled down there;
- a non-finite loss or gradient norm ends the run as `diverged` without overwriting the last good checkpoint.

Data order does not depend on the number of processes: step k consumes the same global batch of windows for any
world size, rank r taking the r-th block of it (experiments.data.loader), so a DDP run sees exactly the sequences
of a single-process run.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from experiments import checkpoint, distributed
from experiments.config import RUN_ID, RunConfig, TrainConfig, branch_points, run_id, wsd_cooldown_start
from experiments.data import TokenLoader, knowledge_probe, prepare_data
from experiments.distributed import Parallel, load_sharded, restore_rng, setup_process_group, split_by_mesh
from experiments.resolve import model_config, resolve_run_config
from experiments.throughput import ThroughputMeter
from experiments.tracking import WandbMirror
from runfolder import EvalRow, Final, RecordError, RunDir, TrainRow, run_state
from ultramem import build_model, row_sparse
from ultramem.accounting import count_params, flops_per_token
from ultramem.config import ConfigError, ModelConfig
from ultramem.families import block_summary
from ultramem.memory.usage import RowUsage

STATUS_EVERY_S = 10.0  # status.json progress between checkpoints: often enough for `sweep status`, no fsync storm


class Diverged(RuntimeError):
    """The loss or gradient norm became NaN/inf. The run folder keeps the last good checkpoint."""


class RunBusy(RuntimeError):
    """Another process holds the run's lock."""


# ---- schedule and optimizer ------------------------------------------------------------------------------------


def lr_at(step: int, t: TrainConfig) -> float:
    """Peak-LR schedule at optimizer step `step` (0-based) of a resolved TrainConfig.

    Linear warmup over `t.warmup` steps to `t.lr`; then, to the floor `t.lr * t.min_lr_ratio` at the last step:
      cosine  (paper Table 4) half a cosine from the first post-warmup step
      linear  a straight line from the first post-warmup step
      wsd     constant at `t.lr`, then over the last `t.cooldown` fraction of the steps a cooldown to the floor,
              `linear` (a fraction p of the way down at cooldown progress p) or `1-sqrt` (sqrt(p) of the way
              down, i.e. lr = peak (1 - sqrt(p)) to a zero floor; Hagele et al. 2024)
    """
    warmup, steps, peak, floor = int(t.warmup), int(t.steps), float(t.lr), t.min_lr_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    if t.schedule == "wsd":
        start = wsd_cooldown_start(steps, warmup, t.cooldown)  # first cooldown step
        if step < start:
            return peak
        p = min(1.0, (step - start + 1) / max(1, steps - start))  # reaches 1 at the last step
        down = p if t.cooldown_shape == "linear" else math.sqrt(p)
        return peak * (1.0 - (1.0 - floor) * down)
    progress = min(1.0, (step - warmup) / max(1, steps - warmup - 1))
    if t.schedule == "linear":
        return peak * (1.0 - (1.0 - floor) * progress)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: torch.nn.Module, t: TrainConfig, distributed_run: bool = False
                    ) -> tuple[torch.optim.AdamW, list[Any]]:
    """AdamW over `model.param_groups(weight_decay)`; returns it and each group's LR multiplier function. With
    `value_updates: rows_read` the value tables are marked for row-sparse gradients and the optimizer is
    ultramem.row_sparse.RowSparseAdamW (AdamW for everything else). With `dense` in one process on the CPU (not
    compiled) the tables' dense gradients are assembled from the rows read (`row_sparse.dense_grads_from_rows`:
    the same gradient and update, without a whole-table gradient per reading layer)."""
    sparse = t.value_updates == "rows_read"
    if sparse:
        if distributed_run:
            raise ConfigError("train.value_updates: 'rows_read' runs in one process only (its sparse gradients do not "
                              "go through DDP/FSDP or a split table); use 'dense' for a parallel layout")
        if not row_sparse.mark_row_sparse(model):
            raise ConfigError("train.value_updates: 'rows_read' needs a memory value table read through gather_pool "
                              f"(pkm, ultramem, ultramem_v2, memory_plus); {type(model).__name__} has none: use "
                              "'dense'")
    elif not (distributed_run or t.compile or dist.is_initialized()):
        row_sparse.dense_grads_from_rows(model)
    groups, mult_fns = [], []
    for group in split_by_mesh(model.param_groups(t.weight_decay)):
        group = dict(group)
        mult_fns.append(group.pop("lr_mult_fn", None))
        groups.append(group)
    kernel = {"auto": {"fused": fused_adamw(groups)}, "fused": {"fused": True},
              "for_loop": {"foreach": False}}[t.adamw]
    optimizer = row_sparse.RowSparseAdamW if sparse else torch.optim.AdamW
    opt = optimizer(groups, lr=float(t.lr), betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
                    **kernel)
    return opt, mult_fns


def fused_adamw(groups: list[dict[str, Any]]) -> bool | None:
    """AdamW's fused kernel (one pass per tensor, no temporaries) wherever torch has one: CUDA, and the CPU since
    torch 2.4. On the CPU it takes 17 ms per step for 14.7M fp32 parameters where the default per-tensor loop takes
    62-84 ms (1 thread, docs/performance.md), and the weights agree to 1.5e-8 after a step. None (torch's default)
    for any other device or dtype."""
    params = [p for g in groups for p in g["params"]]
    ok = params and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16,
                                                                         torch.float16, torch.float64)
                        for p in params)
    return True if ok else None


def set_lr(opt: torch.optim.Optimizer, mult_fns: list[Any], step: int, t: TrainConfig) -> float:
    """Set every group's LR for `step`: schedule(step) * the group's multiplier at progress step/steps, or, for a
    group with a "fixed_lr" (Memory+'s value table), that LR: constant (ByteDance's port: no warmup, no decay), or
    with "fixed_lr_scheduled" fixed_lr * schedule(step) / t.lr (Meta's lingua, whose LambdaLR scales every group's
    own LR by the schedule). The progress runs over `t.lr_mult_steps` when set (a cooldown branch keeps its trunk's
    clock), else over `t.steps`."""
    base = lr_at(step, t)
    progress = step / int(t.lr_mult_steps or t.steps)
    for group, fn in zip(opt.param_groups, mult_fns, strict=True):
        fixed = group.get("fixed_lr")
        if fixed is None:
            group["lr"] = base * (fn(progress) if fn is not None else 1.0)
        else:
            group["lr"] = float(fixed) * (base / float(t.lr) if group.get("fixed_lr_scheduled") else 1.0)
    return base


def clip_gradients(opt: torch.optim.Optimizer, model: torch.nn.Module, max_norm: float,
                   par: Parallel | None = None) -> torch.Tensor:
    """Clip `model`'s gradients to `max_norm`; returns their total norm before clipping. Without optimizer groups
    marked "clip_separately" one norm over all parameters is clipped; with them (Memory+'s value table under
    value_clip: separate) those groups' parameters are clipped on their own and the rest on theirs, as Meta's train
    loop does, and the norm returned is sqrt(rest^2 + apart^2), the same total."""
    apart = {id(p) for g in opt.param_groups if g.get("clip_separately") for p in g["params"]}
    # value_updates rows_read: torch's clip refuses sparse gradients; row_sparse's takes both. One process and
    # nothing sharded (build_optimizer refuses the rest), so no reduction over ranks is needed
    sparse = any(p.grad is not None and p.grad.is_sparse for p in model.parameters())
    if sparse:
        par = None
    local_clip = row_sparse.clip_grad_norm_ if sparse else torch.nn.utils.clip_grad_norm_
    if not apart and par is None:
        return local_clip(model.parameters(), max_norm)
    if not apart:
        return par.clip_grad_norm_(model, max_norm)
    # distributed.clip_grad_norm_ takes a list of plain tensors and DTensors on any meshes (any layout of `par`)
    clip = local_clip if par is None else distributed.clip_grad_norm_
    params = list(model.parameters())
    sets = [[p for p in params if id(p) not in apart], [p for p in params if id(p) in apart]]
    return torch.linalg.vector_norm(torch.stack([clip(ps, max_norm).float() for ps in sets]))


# ---- processes, devices, precision -----------------------------------------------------------------------------


@dataclass
class Env:
    rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None = fp32

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.amp_dtype == torch.bfloat16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_env(t: TrainConfig) -> Env:
    """Device, precision and (under torchrun) the process group."""
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but torch sees no CUDA device; use 'auto' or 'cpu'")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    rank, world = setup_process_group(device)
    if t.threads:
        torch.set_num_threads(t.threads)
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and device.type == "cuda")
    return Env(rank, world, device, torch.bfloat16 if bf16 else None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- per-step statistics ---------------------------------------------------------------------------------------


class Window:
    """Per-step statistics since the last log line. Tensors until `sync` (one host-device sync per log line),
    then floats averaged over processes; the float form is what a checkpoint stores."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.rows: list[tuple[int, dict[str, float]]] = []

    def add(self, step: int, stats: dict[str, torch.Tensor]) -> None:
        self.pending.append((step, stats))

    def sync(self, world_size: int) -> None:
        if not self.pending:
            return
        keys = list(self.pending[0][1])
        table = torch.stack([torch.stack([s[k].float() for k in keys]) for _, s in self.pending])  # [n, k]
        if world_size > 1:
            dist.all_reduce(table)
            table /= world_size
        for (step, _), values in zip(self.pending, table.tolist(), strict=True):
            self.rows.append((step, dict(zip(keys, values, strict=True))))
        self.pending = []

    def first_nonfinite(self) -> tuple[int, str, float] | None:
        for step, row in self.rows:
            for key in ("loss", "aux_loss", "grad_norm"):
                if not math.isfinite(row[key]):
                    return step, key, row[key]
        return None

    def mean(self) -> dict[str, float]:
        keys = self.rows[0][1]
        return {k: sum(r[k] for _, r in self.rows) / len(self.rows) for k in keys}

    def clear(self) -> None:
        self.rows = []

    def state_dict(self) -> list[tuple[int, dict[str, float]]]:
        assert not self.pending, "sync() before saving"
        return list(self.rows)

    def load_state_dict(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self.pending, self.rows = [], [(int(s), dict(r)) for s, r in rows]


# ---- steps -----------------------------------------------------------------------------------------------------


def train_step(model: torch.nn.Module, raw: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, t: TrainConfig, env: Env, par: Parallel | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step on this rank's rows of the global batch, in micro-batches of t.micro_batch_size."""
    if par is not None:
        par.take_comm()  # evaluation traffic since the last step is not this step's
    xs, ys = x.split(t.micro_batch_size), y.split(t.micro_batch_size)
    n = len(xs)
    loss_sum = aux_sum = None
    aux_parts: dict[str, torch.Tensor] = {}
    for i, (xb, yb) in enumerate(zip(xs, ys, strict=True)):
        xb, yb = xb.to(env.device, non_blocking=True), yb.to(env.device, non_blocking=True)
        sync = i == n - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
        with (contextlib.nullcontext() if sync else model.no_sync()), env.autocast():
            out = model(xb, yb)
            ((out.loss + out.aux_loss) / n).backward()
        loss_sum = out.loss.detach() if loss_sum is None else loss_sum + out.loss.detach()
        aux_sum = out.aux_loss.detach() if aux_sum is None else aux_sum + out.aux_loss.detach()
        for name, value in out.aux.items():
            value = value.detach().float()
            aux_parts[name] = value if name not in aux_parts else aux_parts[name] + value
    max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
    if par is not None:
        par.finish_gradients(raw)
    grad_norm = clip_gradients(opt, raw, max_norm, par)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if par is None:
        raw.on_optimizer_step()
    else:
        par.on_optimizer_step(raw)
    stats = {"loss": loss_sum / n, "aux_loss": aux_sum / n, "grad_norm": grad_norm}
    stats.update({f"aux/{k}": v / n for k, v in aux_parts.items()})
    if par is not None:
        stats.update({f"comm/{k}": torch.tensor(float(v), device=env.device)
                      for k, v in sorted(par.take_comm().items())})
    return stats


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_loader: Any, t: TrainConfig, env: Env) -> tuple[float, dict[str, float]]:
    """Mean cross-entropy (nats/token) over the first `eval_batches` fixed batches of the held-out split, and the
    memory layers' row usage on those batches (ultramem.memory.usage; {} without memory layers, and for
    multi-process or compiled runs, where tables may be sharded and hooks would be traced).

    The val loader serves the same batches on every call, sharded by rank like the training batches."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=env.device)
    count = 0
    with RowUsage(model, enabled=env.world_size == 1 and not t.compile) as usage:
        for x, y in val_loader.eval_batches(t.eval_batches):
            for xb, yb in zip(x.split(t.micro_batch_size), y.split(t.micro_batch_size), strict=True):
                with env.autocast():
                    total += model(xb.to(env.device), yb.to(env.device)).loss.float()
                count += 1
    model.train(was_training)
    if env.world_size > 1:
        dist.all_reduce(total)
        count *= env.world_size
    return total.item() / count, usage.stats()


# ---- the run ---------------------------------------------------------------------------------------------------


def train(cfg: RunConfig, run_dir: str | Path, source: str = "<config>", count_attempt: bool = False,
          force: bool = False) -> dict[str, Any]:
    """Train `cfg` into `run_dir` (resuming from its newest checkpoint) and return final.json's content.

    count_attempt: add one to status.json's `attempts` once the run is ours to train (`ultramem train`; a
    scheduler counts the processes it launches itself). force: write the run into a folder that holds something
    else (see write_run_config).

    Raises Diverged on a non-finite loss, RunBusy if another process trains this run, ConfigError if `run_dir`
    holds a different run. A run whose status is already `done` returns its final.json without training.
    """
    resolved = resolve_run_config(cfg, source)
    rd = RunDir(run_dir)
    env = setup_env(resolved.train)
    if env.world_size != resolved.parallel.nproc:
        raise ConfigError(f"{source}: parallel.nproc is {resolved.parallel.nproc} but {env.world_size} processes "
                          "were started; set parallel.nproc to the torchrun --nproc_per_node (it fixes the "
                          "per-process batch)")
    par = Parallel.from_config(resolved.parallel, model_config(resolved), env.device, env.rank, env.world_size,
                               bf16=env.amp_dtype == torch.bfloat16, source=source)
    with contextlib.ExitStack() as stack:

        def claim() -> bool:
            if not stack.enter_context(rd.lock()):
                raise RunBusy(f"{rd.path}: another process is training this run ({rd.lock_owner()}); wait for it "
                              "or stop it first")
            now = run_state(rd)
            if now.state == "unreadable" and env.main:
                print(f"warning: {now.detail}; resuming the run from its checkpoints, which rewrites it",
                      file=sys.stderr, flush=True)
            if now.state == "diverged":
                raise Diverged(f"{rd.path}: this run diverged in an earlier attempt ({now.status.error}); "
                               "a diverged run is final: train a changed config in a new folder")
            write_run_config(rd, resolved, force)
            if now.state == "done":
                return True
            if count_attempt:
                rd.update_status(attempts=(now.status.attempts if now.status else 0) + 1)
            return False

        if _on_rank0(claim, env):
            return rd.final()
        try:
            return _run(resolved, rd, env, par)
        except Diverged:
            raise
        except BaseException as err:
            if env.main:
                with contextlib.suppress(OSError):  # a full disk may refuse this write too: `err` says why
                    rd.update_status(state="failed", error=_describe(err, rd.path))
            raise


def _run(cfg: RunConfig, rd: RunDir, env: Env, par: Parallel) -> dict[str, Any]:
    t, rid = cfg.train, run_id(cfg.model_dump(mode="json"))
    mcfg = model_config(cfg)
    params = count_params(mcfg).to_dict()
    fpt = flops_per_token(mcfg, t.seq_len, training=True)
    tokens_per_step = t.batch_size * t.seq_len

    if env.main:
        rd.update_status(state="running", total_steps=t.steps, error=None, threads=torch.get_num_threads())
    prepared = _prepare_data_once(prepare_data, cfg, env)

    seed_everything(cfg.seed)
    raw = par.prepare(build_model(mcfg))
    opt, mult_fns = build_optimizer(raw, t, distributed_run=env.world_size > 1 or par.layout.sharded)
    per_rank = t.batch_size // env.world_size
    loader = TokenLoader(prepared, split="train", seq_len=t.seq_len, batch_size=per_rank, seed=cfg.seed,
                         rank=env.rank, world_size=env.world_size)
    val_loader = TokenLoader(prepared, split="val", seq_len=t.seq_len, batch_size=per_rank, seed=cfg.seed,
                             rank=env.rank, world_size=env.world_size)
    window = Window()
    start = 0
    last_val: float | None = None
    last_mean: dict[str, float] | None = None
    state = par.load_latest(rd, raw, opt)
    from_trunk = state is None and t.branch_of is not None
    if from_trunk:
        state = _load_branch_point(cfg, rd, raw, opt, par, env)
    if state is not None:
        start = _restore(state, loader, window, env, cfg.seed)
        last_mean, last_val = state["last_mean"], state["last_val"]
        if env.main and from_trunk:  # the branch's curve starts with the trunk's up to the branch step
            trunk = _trunk_dir(rd, t.branch_of)
            rd.truncate_metrics_after(0)
            for row in trunk.metrics():
                if row.get("step", 0) <= start:
                    rd.append_metrics(row)
        elif env.main:
            rd.truncate_metrics_after(start)
    elif env.main:
        rd.truncate_metrics_after(0)
    if env.main:
        rd.update_status(step=start, tokens=start * tokens_per_step, resumed_from=start)
    keep = {s for _, _, s in branch_points(t.model_dump(mode="json"))}  # a trunk's branch steps
    if env.main:
        for s in sorted(keep):
            if s <= start:  # saved before a kill that came before they were kept
                checkpoint.keep_branch_point(rd, s)

    compiled = torch.compile(raw) if t.compile else raw
    model = par.wrap(compiled)
    model.train()

    wandb = _start_wandb(cfg, rd, rid, mcfg, params, fpt, env)
    meter = ThroughputMeter(fpt, env.device, env.dtype_name, env.world_size)
    bar = _progress_bar(t.steps, start, env)
    window_start = start
    status_at = time.monotonic()
    t_begin = time.perf_counter()
    try:
        for step in range(start, t.steps):
            done_steps = step + 1
            base_lr = set_lr(opt, mult_fns, step, t)
            x, y = loader.next_batch()
            stats = train_step(model, raw, opt, x, y, t, env, par)
            window.add(done_steps, stats)
            is_last = done_steps == t.steps
            if done_steps % t.log_every == 0 or is_last:
                window.sync(env.world_size)
                _check_finite(window, rd, env, wandb)
                rates = meter.rates((done_steps - window_start) * tokens_per_step)
                last_mean = window.mean()
                row = _train_row(done_steps, tokens_per_step, fpt, base_lr, last_mean, rates)
                window.clear()
                meter.start()
                window_start = done_steps
                if env.main:
                    rd.append_metrics(row)
                    if time.monotonic() - status_at >= STATUS_EVERY_S:
                        rd.update_status(step=done_steps, tokens=done_steps * tokens_per_step)
                        status_at = time.monotonic()
                    wandb.log(row.to_dict(), done_steps)
                    bar.set_postfix(loss=f"{row.loss:.3f}", refresh=False)
            if done_steps % t.eval_every == 0 or is_last:
                with meter.paused():
                    last_val, usage = evaluate(compiled, val_loader, t, env)
                row = EvalRow(done_steps, done_steps * tokens_per_step, done_steps * tokens_per_step * fpt,
                              last_val, time.time(), memory=usage or None)
                if env.main:
                    rd.append_metrics(row)
                    wandb.log(row.to_dict(), done_steps)
            if done_steps % t.ckpt_every == 0 or is_last or done_steps in keep:
                with meter.paused():
                    window.sync(env.world_size)
                    _check_finite(window, rd, env, wandb)
                    _save(rd, done_steps, raw, opt, loader, window, t, env, par,
                          {"last_mean": last_mean, "last_val": last_val})
                    if done_steps in keep and env.main:
                        checkpoint.keep_branch_point(rd, done_steps)
                if env.main:
                    rd.update_status(step=done_steps, tokens=done_steps * tokens_per_step)
                    status_at = time.monotonic()
            bar.update(1)
    except BaseException:
        wandb.finish(1)
        raise
    finally:
        bar.close()

    wall = time.perf_counter() - t_begin
    final = _final_record(cfg, rid, mcfg, params, fpt, last_mean, last_val, wall, start, prepared)
    if t.knowledge_probe and (env.main or par.layout.sharded):  # a sharded model needs every rank's forward
        final.knowledge = knowledge_probe(raw, prepared, env.device)
    if env.main:
        rd.write_final(final)
        rd.update_status(state="done", step=t.steps, tokens=t.steps * tokens_per_step, error=None)
        wandb.summary(final.to_dict())
        wandb.finish(0)
    return final.to_dict()


def _prepare_data_once(prepare_data: Any, cfg: RunConfig, env: Env) -> Any:
    """Rank 0 tokenises (or finds the cache); the others wait, then read the same content-addressed cache."""
    if env.world_size == 1:
        return prepare_data(cfg.data)
    if env.main:
        prepared = prepare_data(cfg.data)
    dist.barrier()
    if not env.main:
        prepared = prepare_data(cfg.data)
    return prepared


def _load_branch_point(cfg: RunConfig, rd: RunDir, raw: torch.nn.Module, opt: torch.optim.Optimizer,
                       par: Parallel, env: Env) -> dict[str, Any] | None:
    """A branch with no checkpoint of its own: load its trunk's kept checkpoint of the branch step into model and
    optimizer and return its other entries; None (with a note) when the trunk has none, and the branch then trains
    from step 0, which reaches the same state at the branch step at the full cost."""
    t = cfg.train
    trunk = _trunk_dir(rd, str(t.branch_of))
    step = wsd_cooldown_start(t.steps, int(t.warmup), t.cooldown)
    path = trunk.branch_point(step)
    if path is None:
        if env.main:
            why = f"its state: {run_state(trunk).state}" if trunk.path.exists() else "no such folder"
            print(f"note: cooldown branch of {t.branch_of}: {trunk.path} has no kept checkpoint of step {step} "
                  f"({why}); training the branch from step 0 (the same run, at the full cost)",
                  file=sys.stderr, flush=True)
        return None
    sharded = path.suffix == checkpoint.SHARDED_SUFFIX
    if not sharded and par.layout.sharded:
        raise ConfigError(f"{path} is a single-file checkpoint; train the branch with its trunk's layout (parallel "
                          "block) or let it start from step 0 by training it in a folder of its own")
    verified = checkpoint.verify(path)  # CorruptCheckpoint names the file; the trunk's copy is left as it is
    state = load_sharded(path, raw, opt, verified) if sharded else par._load_file(path, raw, opt, verified)
    if int(state["step"]) != step:
        raise RuntimeError(f"{path}: holds step {state['step']}, expected {step}")
    if env.main:
        print(f"cooldown branch of {t.branch_of}: starting from {path} (step {step} of {t.steps})",
              file=sys.stderr, flush=True)
    return state


def _trunk_dir(rd: RunDir, branch_of: str) -> RunDir:
    """The trunk of cooldown branch `rd`: the sibling folder named by its run id, never a path (TrainConfig
    validates `branch_of` as a run id; checked again here, where it becomes one), and never a link out of the
    folder that holds both (a trunk's checkpoint is loaded from it)."""
    if not RUN_ID.fullmatch(branch_of):
        raise ConfigError(f"{rd.config_path}: train.branch_of {branch_of!r} is not a run id (a sibling run folder); "
                          "remove it unless this run is a cooldown branch")
    parent = rd.path.parent
    trunk = parent / branch_of
    if trunk.exists() and trunk.resolve().parent != parent.resolve():
        raise ConfigError(f"{trunk}: the trunk of this cooldown branch (train.branch_of) leads out of {parent} (to "
                          f"{trunk.resolve()}); a trunk must be a run folder beside its branches, not a link")
    return RunDir(trunk)


def _restore(state: dict[str, Any], loader: Any, window: Window, env: Env, seed: int) -> int:
    """The rest of a checkpoint once the model and optimizer are loaded; returns its step. Warns when the
    checkpoint was computed with another torch thread count (CPU reductions then round differently)."""
    threads, now = state.get("threads"), torch.get_num_threads()
    if env.main and threads is not None and int(threads) != now and env.device.type == "cpu":
        print(f"warning: the checkpoint of step {int(state['step'])} was computed with {int(threads)} torch threads, "
              f"this process has {now}: the resumed run is not bitwise the uninterrupted one (CPU sums round by "
              f"thread count); set train.threads: {int(threads)} (or OMP_NUM_THREADS={int(threads)}) to resume it "
              "bitwise", file=sys.stderr, flush=True)
    loader.load_state_dict(state["loader"])
    window.load_state_dict(state["window"])
    restore_rng(state["rng"], env.rank, env.world_size, seed, int(state["step"]), env.device)
    return int(state["step"])


def _save(rd: RunDir, step: int, raw: torch.nn.Module, opt: torch.optim.Optimizer, loader: Any, window: Window,
          t: TrainConfig, env: Env, par: Parallel, last: dict[str, Any]) -> None:
    """`last`: the latest logged training mean and validation loss, so a run killed after its final checkpoint
    still reports them."""
    rng = checkpoint.rng_state(env.device)
    rngs = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    extras = {"loader": loader.state_dict(), "window": window.state_dict(), "rng": rngs,
              "threads": torch.get_num_threads(), **last}  # the thread count: `_restore` warns on a change
    par.save(rd, step, raw, opt, extras, t.keep_checkpoints)


def _check_finite(window: Window, rd: RunDir, env: Env, wandb: WandbMirror) -> None:
    bad = window.first_nonfinite()
    if bad is None:
        return
    step, key, value = bad
    last = checkpoint.newest(rd)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
    msg = (f"{key} became {value} at step {step}; {kept}. Lower train.lr (or raise train.warmup), check the "
           "data for bad values, and start the run again in a new folder")
    if env.main:
        rd.update_status(state="diverged", step=step, error=msg)
        wandb.finish(1)
    raise Diverged(msg)


def _train_row(step: int, tokens_per_step: int, fpt: float, lr: float, mean: dict[str, float],
               rates: dict[str, Any]) -> TrainRow:
    aux = {k.split("/", 1)[1]: v for k, v in mean.items() if k.startswith("aux/")}
    comm = {k.split("/", 1)[1]: v for k, v in mean.items() if k.startswith("comm/")}
    return TrainRow(step=step, tokens=step * tokens_per_step, flops=step * tokens_per_step * fpt, loss=mean["loss"],
                    aux_loss=mean["aux_loss"], aux=aux, lr=lr, grad_norm=mean["grad_norm"], **rates,
                    comm_bytes=comm or None, time=time.time())


def _final_record(cfg: RunConfig, rid: str, mcfg: ModelConfig, params: dict[str, int], fpt: float,
                  mean: dict[str, float] | None, val: float | None, wall: float, start: int,
                  prepared: Any) -> Final:
    t = cfg.train
    tokens = t.steps * t.batch_size * t.seq_len
    trained_here = (t.steps - start) * t.batch_size * t.seq_len
    meta = prepared.meta
    return Final(
        run_id=rid, name=cfg.name, sweep=cfg.sweep, family=mcfg.family, preset=cfg.model.get("preset"),
        seed=cfg.seed, train_loss=None if mean is None else mean["loss"], val_loss=val, params=dict(params),
        total_params=params["total"], active_params=params["active"], non_embedding_params=params["non_embedding"],
        flops_per_token=fpt, tokens=tokens, flops=tokens * fpt, steps=t.steps, batch_size=t.batch_size,
        seq_len=t.seq_len, lr=t.lr, memory=_memory_summary(mcfg, params), moe=_moe_summary(mcfg), knowledge=None,
        wall_s=wall, tokens_per_s=trained_here / wall if trained_here and wall > 0 else None,
        tokenizer=cfg.data.tokenizer, vocab_size=mcfg.vocab_size, data_source=meta.get("source", cfg.data.source),
        data_sha256=getattr(prepared, "source_sha256", None),
    )


def _memory_summary(mcfg: ModelConfig, params: dict[str, int]) -> dict[str, Any] | None:
    return block_summary(mcfg, params, "memory")  # the family's Family.summary when it owns the memory block


def _moe_summary(mcfg: ModelConfig) -> dict[str, Any] | None:
    return block_summary(mcfg, {}, "moe")


def _start_wandb(cfg: RunConfig, rd: RunDir, rid: str, mcfg: ModelConfig, params: dict[str, int], fpt: float,
                 env: Env) -> WandbMirror:
    if not env.main:
        return WandbMirror()
    config = {**cfg.model_dump(mode="json"), "run_id": rid, "family": mcfg.family, "params": dict(params),
              "n_params_total": params["total"], "n_params_active": params["active"],
              "n_params_non_embedding": params["non_embedding"], "flops_per_token": fpt,
              "total_flops": fpt * cfg.train.tokens}
    return WandbMirror.start(cfg, rd.path, rid, config)


def write_run_config(rd: RunDir, resolved: RunConfig, force: bool = False) -> None:
    """Write config.yaml (and the run.json marker), refusing a folder that holds a different run or files that
    are not a run's, unless `force`."""
    check_run_folder(rd, resolved, force)
    new = resolved.model_dump(mode="json")
    rd.write_config(new, run_id(new))


def check_run_folder(rd: RunDir, resolved: RunConfig, force: bool = False) -> None:
    """ConfigError unless `rd` is free for this run (absent, empty, or this run's folder), or `force`. Writes
    nothing: `ultramem train` asks before it creates or locks anything, the trainer again under the lock."""
    new = resolved.model_dump(mode="json")
    rid = run_id(new)
    if not force and rd.path.is_dir():
        try:
            old, marker, foreign = rd.read_config(), rd.read_marker(), rd.foreign_entries()
        except RecordError as err:
            raise ConfigError(f"{err}; {rd.path} is not a folder of this run: choose another output folder (--out), "
                              "delete the file, or pass --force to overwrite it") from None
        if old is not None and run_id(old) != rid:
            diff = ", ".join(_diff_keys(old, new)) or "content"
            raise ConfigError(f"{rd.path} already holds another run (its config.yaml differs in: {diff}); choose "
                              "another output folder or delete this one")
        if old is None and marker is not None and marker.run_id != rid:  # (config.yaml, when present, rules)
            raise ConfigError(f"{rd.path} is the run folder of {marker.run_id} (its run.json), not of {rid}; choose "
                              "another output folder, or pass --force to overwrite it")
        if foreign:
            shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
            raise ConfigError(f"{rd.path} is not empty and is not a run folder (it holds {shown}); choose another "
                              "output folder (--out), or pass --force to write the run into it anyway")


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _progress_bar(total: int, initial: int, env: Env) -> Any:
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=not (env.main and sys.stderr.isatty()))


def _on_rank0(fn: Any, env: Env) -> Any:
    """Run `fn` on rank 0 only; every rank returns its result or raises its exception."""
    if env.world_size == 1:
        return fn()
    box: list[Any] = [None]
    if env.main:
        try:
            box[0] = ("ok", fn())
        except Exception as err:
            box[0] = ("err", err)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "err":
        raise value
    return value


def describe_error(err: BaseException, run_dir: Path | None = None) -> str:
    """One line for a terminal: the first line of status.json's `error` (`_describe`)."""
    return _describe(err, run_dir).splitlines()[0]


def is_refused_write(err: BaseException) -> bool:
    """Whether `err` comes from a write the disk refused (full, quota, read-only, I/O error): the user's to fix,
    so a terminal gets `describe_error`'s one line rather than a traceback."""
    return _os_error_in_chain(err) is not None


def _describe(err: BaseException, run_dir: Path | None = None) -> str:
    """status.json's `error`. A failed write (full disk, quota, permissions) often surfaces as another error (torch:
    "unexpected pos N vs M") with the OSError only in its chain: then the OSError, the file and the fix come first."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, ConfigError):  # a validation error: its message names the file, the field and the fix
        return str(err)
    tb = traceback.extract_tb(err.__traceback__)
    where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
    text = f"{type(err).__name__}: {err}{where}"
    os_err = _os_error_in_chain(err)
    if os_err is None:
        return text
    path = os_err.filename or _path_being_written(err) or run_dir or "the run folder"
    if os_err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free space or move --out (the run folder) to another disk, then run the same command again"
    elif os_err.errno == errno.EROFS:
        fix = "move --out (the run folder) to a writable disk, then run the same command again"
    else:
        fix = "check the disk, then run the same command again"
    detail = "" if os_err is err else f" ({text})"
    return f"{os_err.strerror or os.strerror(os_err.errno)} while writing {path}; {fix}{detail}"


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)  # a write the disk refused


def _os_error_in_chain(err: BaseException) -> OSError | None:
    """The first OSError of a refused write (full disk, quota, read-only, I/O error) in `err`, its __cause__ and
    __context__ chains."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return e
        todo += [e.__cause__, e.__context__]
    return None


def _path_being_written(err: BaseException) -> str | None:
    """The file an atomic write (runfolder.atomic.atomic_write) was writing when `err` was raised, if any."""
    found = None
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "atomic_write" and "path" in tb.tb_frame.f_locals:
            found = str(tb.tb_frame.f_locals["path"])
        tb = tb.tb_next
    return found
