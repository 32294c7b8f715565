"""Trainer overhead: `experiments.trainer.train` against a bare PyTorch loop on the same model, data and steps.

  ultramem bench trainer [--preset dense-t1] [--data embedded] [--steps 200] [--batch-size 8] [--seq-len 64]
                         [--format table|json] [--out DIR] [--threads 2] [--repeats 3] [--warmup 1]

Both arms are timed end to end, from "config in hand" to "last step done", in interleaved repeats (see
benchmarks/common.py), so setup counts on both sides:
  bare     open the token cache, build the model (same seed), AdamW over the same parameter groups, then per step:
           next batch, forward, loss + aux loss, backward, clip the gradient norm, optimizer step, zero grads,
           model.on_optimizer_step(). Constant LR, no logging, no evaluation, no checkpoint.
  trainer  train(cfg, fresh run folder) with its real bookkeeping: LR schedule and group multipliers, per-step
           statistics, a metrics line every --log-every steps (one host sync), status.json updates, the final
           evaluation (--eval-batches batches) and the final checkpoint, W&B disabled.
overhead = median(trainer) / median(bare) - 1; target <= 10% (issue 3). The JSON also gives the ratio of the fastest
runs (`overhead_best`), which a load spike on a shared machine disturbs less than the medians. The small default
model makes each step cheap, which is the worst case for a fixed per-step cost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    Timing,
    add_common_arguments,
    format_table,
    grouped_bar_plot,
    header,
    load_warning,
    setup,
    write_json,
)
from experiments.config import run_config_from_dict
from experiments.data import TokenLoader, prepare_data
from experiments.resolve import model_config, resolve_run_config
from experiments.trainer import fused_adamw, setup_env, train
from ultramem import build_model

HELP = "trainer overhead vs a bare PyTorch loop on the same model, data and steps (target <= 10%)"
NAME = "trainer"
TARGET = 0.10
WARMUP_STEPS = 10  # steps of each untimed warm-up run (imports, allocator, data pages)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, warmup=1, repeats=3, threads=2)
    parser.add_argument("--preset", default="dense-t1", help="model preset (default dense-t1)")
    parser.add_argument("--data", default="embedded", help="data.source (default: the embedded corpus)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per timed run (default 200)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--log-every", type=int, default=10, help="trainer log interval (default 10)")
    parser.add_argument("--eval-batches", type=int, default=1, help="batches of the trainer's final eval (default 1)")


def run_config(args: argparse.Namespace, device: torch.device, steps: int):  # noqa: ANN201
    cfg = run_config_from_dict({
        "model": {"preset": args.preset},
        "data": {"source": args.data},
        "train": {"steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": 0,
                  "log_every": args.log_every, "eval_every": steps + 1, "eval_batches": args.eval_batches,
                  "ckpt_every": steps, "keep_checkpoints": 1, "device": device.type, "threads": args.threads,
                  "knowledge_probe": False},
        "wandb": {"mode": "disabled"},
    }, "bench trainer")
    return resolve_run_config(cfg)


def bare_loop(cfg, steps: int) -> float:  # noqa: ANN001
    """The loop a user would write by hand; returns the last loss (read once, at the end)."""
    t = cfg.train
    env = setup_env(t)
    prepared = prepare_data(cfg.data, progress=False)
    torch.manual_seed(cfg.seed)
    model = build_model(model_config(cfg)).to(env.device)
    groups = [{k: v for k, v in g.items() if k != "lr_mult_fn"} for g in model.param_groups(t.weight_decay)]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused_adamw(groups))
    loader = TokenLoader(prepared, "train", seq_len=t.seq_len, batch_size=t.batch_size, seed=cfg.seed)
    loss = None
    for _ in range(steps):
        x, y = loader.next_batch()
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        with env.autocast():
            out = model(x, y)
            loss = out.loss + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.on_optimizer_step()
    return float(loss.item())


def trainer_run(cfg, root: Path) -> float:  # noqa: ANN001
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    try:
        return float(train(cfg, run_dir)["train_loss"])
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    device = setup(args)
    os.environ["WANDB_MODE"] = "disabled"
    if args.steps < 1:
        raise SystemExit(f"error: --steps must be >= 1 (got {args.steps})")
    cfg, warm_cfg = run_config(args, device, args.steps), run_config(args, device, WARMUP_STEPS)

    prepare_data(cfg.data, progress=False)  # tokenise before any timing
    busy = [load_warning(torch.get_num_threads())]
    samples: dict[str, list[float]] = {"bare": [], "trainer": []}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        root = Path(tmp)
        arms = {"bare": lambda c: bare_loop(c, c.train.steps), "trainer": lambda c: trainer_run(c, root)}
        for _ in range(args.warmup):
            for fn in arms.values():
                fn(warm_cfg)
        for r in range(args.repeats):
            for name in (["bare", "trainer"] if r % 2 == 0 else ["trainer", "bare"]):
                start = time.perf_counter()
                arms[name](cfg)
                samples[name].append(time.perf_counter() - start)
    busy.append(load_warning(0))
    timings = {name: Timing([s * 1e3 for s in v]) for name, v in samples.items()}
    tokens = args.steps * args.batch_size * args.seq_len
    rows = [{"arm": name, "wall_s": t.median / 1e3, "wall_s_iqr": t.iqr / 1e3, "best_s": min(samples[name]),
             "samples_s": samples[name], "step_ms": t.median / args.steps, "tokens_per_s": tokens / (t.median / 1e3)}
            for name, t in timings.items()]
    overhead = timings["trainer"].median / timings["bare"].median - 1.0
    overhead_best = min(samples["trainer"]) / min(samples["bare"]) - 1.0
    settings = {"preset": args.preset, "data": args.data, "steps": args.steps, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "log_every": args.log_every, "eval_batches": args.eval_batches,
                "warmup": args.warmup, "repeats": args.repeats,
                "timing": "end-to-end wall clock per run, median and IQR of interleaved repeats"}
    payload = {**header(NAME, device, settings), "rows": rows, "overhead": overhead, "overhead_best": overhead_best,
               "targets": [{"name": "trainer_overhead", "value": overhead, "target": f"<= {TARGET:.0%}",
                            "met": overhead <= TARGET}],
               "warnings": [w for w in busy if w][:1]}
    json_path = write_json(payload, args.out / f"{NAME}.json")
    if not args.no_plot:
        grouped_bar_plot([r["arm"] for r in rows], {"wall s": [r["wall_s"] for r in rows]},
                         args.out / f"{NAME}.png", ylabel="s per run (median)", log=False,
                         title=f"trainer vs bare loop, {args.preset}, {args.steps} steps, {device}, "
                               f"overhead {overhead:+.1%}")
    if args.format == "json":
        print(json_path.read_text(), end="")
        return 0
    print(format_table(rows, [("arm", "arm"), ("wall_s", "wall s"), ("wall_s_iqr", "IQR s"), ("best_s", "best s"),
                              ("step_ms", "ms/step"), ("tokens_per_s", "tokens/s")]))
    met = "met" if overhead <= TARGET else "NOT met"
    print(f"target: trainer overhead = {overhead:+.1%} (want <= {TARGET:.0%}): {met}; fastest runs: "
          f"{overhead_best:+.1%}")
    for w in payload["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {json_path}" + ("" if args.no_plot else f" and {args.out / (NAME + '.png')}"))
    return 0
