"""Training throughput per family: tokens/s of full optimizer steps on the tiny presets, and MFU on GPU.

  ultramem bench throughput [--size tiny|t1..t6] [--families dense,moe,pkm,ultramem] [--batch-size 16]
                            [--seq-len 256] [--steps 10] [--format table|json] [--out DIR] [--threads 2]
                            [--repeats 5] [--warmup 1] [--device auto|cpu|cuda] [--clock wall|cpu] [--profile]

One step is what the trainer does per optimizer step without its bookkeeping: forward on a [batch, seq] batch of
random tokens, loss + auxiliary loss, backward, gradient clipping, AdamW over the model's parameter groups, zero
grads, model.on_optimizer_step() (the TDQKR rank-1 refresh). Each timed sample is --steps steps ended by a host sync;
the families take turns (round robin, see benchmarks/common.py) so load changes hit them alike. tokens/s = batch x
seq x steps / time; FLOPs/s and MFU come from experiments.throughput.ThroughputMeter with
ultramem.accounting.flops_per_token(training=True) (activated parameters + attention), MFU against the GPU's
datasheet peak (None on CPU, where no honest peak exists). On CUDA the step runs under bf16 autocast, as the
trainer's default; on CPU in fp32. The JSON's `tokens_per_s_ratio` holds every family's tokens/s over MoE's (when
MoE is measured); --profile adds the top operators of one step per family (`profiles`, docs/performance.md).
A family written `<family>:rows_read` (e.g. `--families moe,ultramem,ultramem:rows_read`) trains with
`train.value_updates: rows_read` (row-sparse value-table gradients and AdamW steps, ultramem.row_sparse), so both
kinds of update are measured side by side in one run.

`<family>:retrieval_free` is the bound on what a faster retrieval could give (issue 23): the family's own step with
every memory layer's `lookup` (query, key scores, both top-m, score activation, and their backward) replaced by the
selection its real step made on the same batch (`replay_lookups`: the same rows and scores, detached), so the value
reads, the value and output projections, the backbone and the optimizer run as in the real step and the forward
gives the same loss. Its tokens/s over MoE's is the highest ratio any retrieval implementation could reach on this
machine with these value reads.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import (
    Timing,
    add_common_arguments,
    format_table,
    grouped_bar_plot,
    header,
    load_warning,
    setup,
    spying_lookups,
    synchronize,
    write_json,
)
from experiments.config import TrainConfig
from experiments.throughput import ThroughputMeter
from experiments.trainer import build_optimizer, clip_gradients
from ultramem import build_model
from ultramem.accounting import count_params, flops_per_token
from ultramem.errors import ConfigError
from ultramem.families import family_names
from ultramem.presets import get_preset, preset_names

HELP = "training tokens/s (and MFU on GPU) per family on the tiny presets"
NAME = "throughput"
FAMILIES = family_names()
SIZES = ("tiny", "t1", "t2", "t3", "t4", "t5", "t6")
VARIANTS = ("", "rows_read", "retrieval_free")  # <family>[:variant] in --families


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, warmup=1, repeats=5, clock=True)
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny-ladder size of every family (default tiny)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated (default {','.join(FAMILIES)})")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed sample (default 10)")
    parser.add_argument("--profile", action="store_true",
                        help="also record the top operators of one optimizer step per family (torch.profiler)")


def preset_name(family: str, size: str) -> str:
    """The preset of `family` at tiny-ladder `size` (MoE names carry their expert count)."""
    if size == "tiny":
        return f"{family}-tiny"
    names = [n for n in preset_names() if n.startswith(f"{family}-{size}")]
    if len(names) != 1:
        raise SystemExit(f"error: no single {family} preset at size {size} (found {names})")
    return names[0]


class Trainer:
    """A model, its AdamW and a fixed batch; `steps(n)` runs n optimizer steps and returns the last loss."""

    def __init__(self, preset: str, batch_size: int, seq_len: int, device: torch.device, lr: float = 1e-3,
                 variant: str = ""):
        """variant: one of VARIANTS, the `:suffix` of --families ("" the family as it trains)."""
        self.preset, self.variant = preset, variant
        self.cfg = get_preset(preset, {"seq_len": max(seq_len, get_preset(preset).seq_len)})
        torch.manual_seed(0)
        self.model = build_model(self.cfg, device=device).train()
        # the trainer's optimizer (AdamW 0.9 / 0.95, weight decay 0.1, its kernel; rows_read: RowSparseAdamW)
        updates = "rows_read" if variant == "rows_read" else "dense"
        self.opt, _ = build_optimizer(self.model, TrainConfig(lr=lr, value_updates=updates))
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, self.cfg.vocab_size, (batch_size, seq_len + 1), generator=gen).to(device)
        self.x, self.y = tokens[:, :-1], tokens[:, 1:]
        if variant == "retrieval_free":
            replay_lookups(self.model, self.x)
        self.device = device
        self.amp = torch.bfloat16 if device.type == "cuda" else None
        self.flops_per_token = flops_per_token(self.cfg, seq_len, training=True)
        self.params = count_params(self.cfg)

    def steps(self, n: int) -> float:
        loss = None
        for _ in range(n):
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out = self.model(self.x, self.y)
                loss = out.loss + out.aux_loss
            loss.backward()
            clip_gradients(self.opt, self.model, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.model.on_optimizer_step()
        return float(loss.detach())


def replay_lookups(model: torch.nn.Module, x: torch.Tensor) -> int:
    """From now on every memory layer of `model` (each module with a `lookup`: PKM, UltraMem, UltraMemV2, Memory+)
    returns from `lookup` what it returned in one real forward on `x`, detached: no query, no key scoring, no top-k
    and no gradient into them; the layers' value paths are untouched. Returns the number of layers replayed."""
    layers = [m for m in model.modules() if callable(getattr(type(m), "lookup", None))]
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no memory layer with a lookup to replay (retrieval_free "
                          "needs a memory family)")
    recorded: dict[int, tuple] = {}
    with spying_lookups(layers, lambda mem, out: recorded.update({id(mem): tuple(t.detach() for t in out)})), \
            torch.no_grad():
        model(x)
    for mem in layers:  # an instance attribute shadows the method
        mem.lookup = lambda *args, out=recorded[id(mem)], **kwargs: out  # noqa: ARG005
    return len(layers)


def time_trainers(trainers: dict[str, Trainer], steps: int, warmup: int, repeats: int, device: torch.device,
                  clock: str = "wall") -> dict[str, Timing]:
    """Round robin over families: `warmup` untimed samples each, then `repeats` rounds of one timed sample each
    (`clock` wall or cpu, as in benchmarks/common.py)."""
    now = time.perf_counter if clock == "wall" else time.process_time
    runs: dict[str, Callable[[], float]] = {f: (lambda t=t: t.steps(steps)) for f, t in trainers.items()}
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {f: [] for f in runs}
    names = list(runs)
    for r in range(repeats):
        for f in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start = now()
            runs[f]()  # ends with float(loss): a host sync
            samples[f].append((now() - start) * 1e3)
    return {f: Timing(s) for f, s in samples.items()}


def profile_step(trainer: Trainer, top: int = 15) -> list[dict[str, Any]]:
    """Top operators by self time of one full optimizer step (after the timed runs: warm). On CPU the profiler
    reports wall time, so on a loaded machine compare rows within one profile more than across runs."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        trainer.steps(1)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count, "share": getattr(e, key) / total}
            for e in events[:top]]


def rows_for(trainers: dict[str, Trainer], timings: dict[str, Timing], tokens_per_sample: int, steps: int,
             device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for f, tr in trainers.items():
        t = timings[f]
        peak = ThroughputMeter(tr.flops_per_token, device, "bf16" if tr.amp is not None else "fp32").peak_total
        tokens_per_s = tokens_per_sample / (t.median / 1e3)
        flops_per_s = tokens_per_s * tr.flops_per_token
        rows.append({"family": f, "preset": tr.preset, "tokens_per_s": tokens_per_s, "step_ms": t.median / steps,
                     "sample_ms": t.median, "sample_ms_iqr": t.iqr, "samples_ms": t.samples_ms,
                     "flops_per_token": tr.flops_per_token, "flops_per_s": flops_per_s,
                     "mfu": None if peak is None else flops_per_s / peak,
                     "params_total": tr.params.total, "params_active_non_embedding": tr.params.active_non_embedding})
    return rows


def run(args: argparse.Namespace) -> int:
    device = setup(args)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    specs = {f: f.partition(":")[::2] for f in families}  # "ultramem:rows_read" -> ("ultramem", "rows_read")
    if not families or any(fam not in FAMILIES or u not in VARIANTS for fam, u in specs.values()):
        raise SystemExit(f"error: --families must name some of {', '.join(FAMILIES)}, each optionally "
                         f"':rows_read' or ':retrieval_free' (got {args.families!r})")
    if min(args.batch_size, args.seq_len, args.steps) < 1:
        raise SystemExit("error: --batch-size, --seq-len and --steps must be >= 1")
    try:
        trainers = {f: Trainer(preset_name(fam, args.size), args.batch_size, args.seq_len, device, variant=u)
                    for f, (fam, u) in specs.items()}
    except ConfigError as err:  # e.g. moe:rows_read (no value table), dense:retrieval_free (no memory layer)
        raise SystemExit(f"error: --families {args.families}: {err}") from None
    busy = [load_warning(torch.get_num_threads())]
    timings = time_trainers(trainers, args.steps, args.warmup, args.repeats, device, args.clock)
    busy.append(load_warning(0))
    tokens = args.batch_size * args.seq_len * args.steps
    rows = rows_for(trainers, timings, tokens, args.steps, device)
    settings = {"size": args.size, "families": families, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "steps_per_sample": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                "precision": "bf16 autocast" if device.type == "cuda" else "fp32", "clock": args.clock,
                "timing": f"{args.clock} clock per sample of --steps optimizer steps (ends with a host sync), median "
                          "and IQR of interleaved repeats"}
    ratios = {f"{r['family']}_over_moe": r["tokens_per_s"] / moe["tokens_per_s"]
              for moe in rows if moe["family"] == "moe" for r in rows if r["family"] != "moe"}
    profiles = {f: profile_step(tr) for f, tr in trainers.items()} if args.profile else {}
    payload = {**header(NAME, device, settings), "rows": rows, "tokens_per_s_ratio": ratios, "profiles": profiles,
               "warnings": [w for w in busy if w][:1]}
    json_path = write_json(payload, args.out / f"{NAME}.json")
    if not args.no_plot:
        labels = [tr.preset + (f":{tr.variant}" if tr.variant else "") for tr in trainers.values()]
        grouped_bar_plot(labels, {"tokens/s": [r["tokens_per_s"] for r in rows]},
                         args.out / f"{NAME}.png", ylabel="training tokens/s (median)", log=False,
                         title=f"training throughput, batch {args.batch_size} x {args.seq_len}, {device}, "
                               f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.format == "json":
        print(json_path.read_text(), end="")
        return 0
    print(format_table(rows, [("family", "family"), ("preset", "preset"), ("tokens_per_s", "tokens/s"),
                              ("step_ms", "ms/step"), ("sample_ms_iqr", "IQR ms/sample"),
                              ("flops_per_token", "FLOPs/token"), ("flops_per_s", "FLOP/s"), ("mfu", "MFU")]))
    if ratios:
        print("tokens/s vs MoE: " + ", ".join(f"{k.removesuffix('_over_moe')} {v:.2f}x" for k, v in ratios.items()))
    for f, ops in profiles.items():
        print(f"\nprofile {f}, one step (self ms): " + "; ".join(f"{o['op']} {o['self_ms']:.0f}" for o in ops))
    for w in payload["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {json_path}" + ("" if args.no_plot else f" and {args.out / (NAME + '.png')}"))
    return 0
