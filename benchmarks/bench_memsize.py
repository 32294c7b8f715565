"""Training step time vs value-table size at fixed activated compute (UltraMem and Memory+): is the cost flat?

  ultramem bench memsize [--size t5] [--families ultramem,memory_plus] [--rows 64,128,256,512,1024]
                         [--value-updates dense,rows_read] [--retrieval-free] [--batch-size 8] [--seq-len 256]
                         [--steps 2] [--repeats 3] [--threads 1] [--clock cpu]

The paper's claim: a memory layer's compute does not grow with its table. Each case is the tiny-ladder preset of
the family with num_keys = k for k in --rows (so k^2 physical value rows: UltraMem's N, Memory+'s shared table),
everything else fixed (top-m, heads, widths: the activated parameters change only by the keys, 2 k per side;
`flops_per_token` and `flops_ratio_largest_over_smallest` say by how much, from ultramem.accounting).
One sample = --steps full optimizer steps (forward, backward, clip, AdamW, zero_grad, rank-1 refresh), timed in
two parts: forward + backward, and the rest (clip + AdamW + zero_grad + refresh: "optimizer"). One model is built
at a time (the largest tables take GBs with their AdamW state), the families interleaved per size, and the
smallest size is timed again at the end to show the drift of the machine during the run. Printed: ms per step
and the ratios largest / smallest rows for the step and for forward + backward; `optimizer_ms_per_mparam` is the
measured bound of what does grow: AdamW and the gradient clip visit every table row every step (dense), so their
cost is linear in the table (ms per million table parameters). --value-updates times each case twice, side by side:
with dense updates (AdamW over every row, as the papers and the trainer's default) and with `rows_read`
(`train.value_updates: rows_read`, ultramem.row_sparse: a sparse table gradient of the rows read and an AdamW step
on those rows only), so the cost of the dense semantics is measured in the same run. --retrieval-free adds, per
size, the dense case with every memory layer's lookup (query, key scores, top-k) replayed from a real step
(`bench_throughput.replay_lookups`): what grows without the keys, which grow with sqrt(rows) by design.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from typing import Any

import torch

from benchmarks.bench_throughput import preset_name, replay_lookups
from benchmarks.common import add_common_arguments, format_table, header, load_warning, setup, write_json
from experiments.config import TrainConfig
from experiments.trainer import build_optimizer, clip_gradients
from ultramem import build_model
from ultramem.accounting import count_params, flops_per_token
from ultramem.errors import ConfigError
from ultramem.presets import get_preset

HELP = "training step time vs value-table size (64^2..1024^2 rows) at fixed activated compute"
NAME = "memsize"
FAMILIES = ("ultramem", "memory_plus")
FIELD = {"ultramem": "memory", "memory_plus": "memory_plus"}
UPDATES = ("dense", "rows_read")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, warmup=1, repeats=3, threads=1, clock=True)
    parser.add_argument("--size", default="t5", help="tiny-ladder size (default t5)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated of {','.join(FAMILIES)}")
    parser.add_argument("--rows", default="64,128,256,512,1024",
                        help="num_keys values k (k^2 table rows), comma-separated (default 64,128,256,512,1024)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed sample (default 2)")
    parser.add_argument("--value-updates", default=",".join(UPDATES),
                        help="comma-separated of dense,rows_read (train.value_updates; default both, side by side)")
    parser.add_argument("--retrieval-free", action="store_true",
                        help="also time each dense case with its lookups replayed from a real step (no key scoring "
                             "or top-k): the growth that is not the keys'")


def config(family: str, size: str, num_keys: int):  # noqa: ANN201
    cfg = get_preset(preset_name(family, size))
    field = FIELD[family]
    return dataclasses.replace(cfg, **{field: dataclasses.replace(getattr(cfg, field), num_keys=num_keys)})


def time_case(cfg, args: argparse.Namespace, device: torch.device,  # noqa: ANN001
              updates: str = "dense") -> dict[str, Any]:
    """Build, warm up and time one configuration: median ms per step of fwd+bwd and of the optimizer part.
    updates: a train.value_updates value, or "retrieval_free" (dense, lookups replayed)."""
    now = time.perf_counter if args.clock == "wall" else time.process_time
    torch.manual_seed(0)
    model = build_model(cfg, device=device).train()
    free = updates == "retrieval_free"
    # the trainer's optimizer (retrieval_free: dense updates)
    opt, _ = build_optimizer(model, TrainConfig(lr=1e-3, value_updates="dense" if free else updates))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if free:
        replay_lookups(model, x)
    fb, rest = [], []
    for i in range(args.warmup + args.repeats):
        t_fb = t_rest = 0.0
        for _ in range(args.steps):
            t0 = now()
            out = model(x, y)
            (out.loss + out.aux_loss).backward()
            t1 = now()
            clip_gradients(opt, model, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.on_optimizer_step()
            t_fb, t_rest = t_fb + t1 - t0, t_rest + now() - t1
        if i >= args.warmup:
            fb.append(t_fb * 1e3 / args.steps)
            rest.append(t_rest * 1e3 / args.steps)
    pc = count_params(cfg)
    del model, opt
    gc.collect()
    med = lambda v: sorted(v)[len(v) // 2]
    table = pc.sparse  # value-table parameters
    return {"fwd_bwd_ms": med(fb), "optimizer_ms": med(rest), "step_ms": med(fb) + med(rest),
            "table_params": table, "active_params": pc.active_non_embedding,
            "flops_per_token": flops_per_token(cfg, args.seq_len, training=True),
            "optimizer_ms_per_mparam": med(rest) / (table / 1e6), "samples_fwd_bwd_ms": fb, "samples_optimizer_ms": rest}


def ratios(rows: list[dict[str, Any]], families: list[str], updates: list[str]) -> dict[str, dict[str, float]]:
    """Largest / smallest table per family and value-update kind: keyed "<family>" (dense) or "<family>/rows_read"."""
    out = {}
    for f, u in [(f, u) for f in families for u in updates]:
        rs = [r for r in rows if r["family"] == f and r["value_updates"] == u and not r.get("drift_check")]
        lo, hi = min(rs, key=lambda r: r["rows"]), max(rs, key=lambda r: r["rows"])
        out[f if u == "dense" else f"{f}/{u}"] = {
            "rows_smallest": lo["rows"], "rows_largest": hi["rows"],
            "step_ratio_largest_over_smallest": hi["step_ms"] / lo["step_ms"],
            "fwd_bwd_ratio_largest_over_smallest": hi["fwd_bwd_ms"] / lo["fwd_bwd_ms"],
            # the keys: each token scores 2 n' keys per head, n' ~ sqrt(rows), so the activated FLOPs grow too
            "flops_ratio_largest_over_smallest": hi["flops_per_token"] / lo["flops_per_token"],
            "optimizer_ms_per_mparam_at_largest": hi["optimizer_ms_per_mparam"]}
    return out


def run(args: argparse.Namespace) -> int:
    device = setup(args)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not families or any(f not in FAMILIES for f in families):
        raise SystemExit(f"error: --families must name some of {', '.join(FAMILIES)} (got {args.families!r})")
    try:
        keys = sorted({int(k) for k in args.rows.split(",") if k.strip()})
    except ValueError:
        raise SystemExit(f"error: --rows must be comma-separated integers (got {args.rows!r})") from None
    updates = [u.strip() for u in args.value_updates.split(",") if u.strip()]
    if not updates or any(u not in UPDATES for u in updates):
        raise SystemExit(f"error: --value-updates must name some of {', '.join(UPDATES)} (got {args.value_updates!r})")
    if not keys or keys[0] < 2 or min(args.batch_size, args.seq_len, args.steps) < 1:
        raise SystemExit("error: --rows values must be >= 2 and --batch-size, --seq-len, --steps >= 1")
    if args.retrieval_free:
        updates = [*updates, "retrieval_free"]
    busy = [load_warning(torch.get_num_threads())]
    rows = []
    for k in [*keys, keys[0]]:  # the smallest again at the end: the machine's drift during the run
        for f in families:
            try:
                cfg = config(f, args.size, k)
                cfg.validate()
            except ConfigError as err:
                raise SystemExit(f"error: --rows {k} for {f}: {err}") from None
            for u in updates:
                rows.append({"family": f, "value_updates": u, "num_keys": k, "rows": k * k,
                             "drift_check": len(rows) >= len(keys) * len(families) * len(updates),
                             **time_case(cfg, args, device, u)})
    busy.append(load_warning(0))
    summary = ratios(rows, families, updates)
    settings = {k: getattr(args, k) for k in ("size", "batch_size", "seq_len", "steps", "warmup", "repeats", "clock")}
    settings["families"], settings["num_keys"], settings["value_updates"] = families, keys, updates  # + retrieval_free
    payload = {**header(NAME, device, settings), "rows": rows, "ratios": summary, "warnings": [w for w in busy if w][:1]}
    path = write_json(payload, args.out / f"{NAME}.json")
    if args.format == "json":
        print(path.read_text(), end="")
        return 0
    print(format_table(rows, [("family", "family"), ("value_updates", "value updates"), ("rows", "rows"), ("table_params", "table params"),
                              ("flops_per_token", "FLOPs/token"), ("fwd_bwd_ms", "fwd+bwd ms/step"),
                              ("optimizer_ms", "optimizer ms/step"), ("step_ms", "ms/step"),
                              ("drift_check", "drift check")]))
    for f, r in summary.items():
        print(f"{f}: step time {r['rows_largest']} / {r['rows_smallest']} rows = "
              f"{r['step_ratio_largest_over_smallest']:.2f}x (fwd+bwd {r['fwd_bwd_ratio_largest_over_smallest']:.2f}x; "
              f"activated FLOPs/token {r['flops_ratio_largest_over_smallest']:.2f}x); "
              f"optimizer {r['optimizer_ms_per_mparam_at_largest']:.2f} ms per M table params")
    for w in payload["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {path}")
    return 0
