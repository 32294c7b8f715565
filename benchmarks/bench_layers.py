"""Layer benchmark: this project's UltraMem, PKM, MoE and dense FFN layers and its retrieval kernel, side by side in
one run with the public peers and the bare embedding_bag bound.

  ultramem bench layers [--format table|json] [--out DIR] [--threads 2] [--repeats 10] [--warmup 3] [--only TEXT]

Per case: forward (training mode, graph built), forward+backward and inference (eval mode, torch.no_grad) wall time
as the median and interquartile range of --repeats calls after --warmup calls, interleaved across cases (see
benchmarks/common.py), and the peak memory of one forward+backward and of one inference call.

Cases, at d = 256 and 1024 tokens (--batch x --seq):
  lucidrains/ultra-mem           UltraMem(dim=256, num_memories=65536, topk=32): 2 core heads, each its own table of
                                 65536/4 rows x 128 and its own top-32 -> 64 rows of 128 floats read per token
  lucidrains/product-key-memory  PKM(dim=256, heads=4, num_keys=256, topk=32): 256^2 values of width 256
  ours ultramem                  UltraMemLayer, 65536 physical values of width 128 (num_keys 256), 2 heads x top-32
                                 (64 rows of 128 floats per token, as above), 2 MCS cores, E=4, key_dim 128, query
                                 conv 5 (lucidrains' defaults), projection 4*128 -> 256
  ours ultramem_same_slots       the same with num_keys 128: 16384 physical values, 65536 virtual slots, i.e.
                                 lucidrains' 256^2 key grid (its num_memories counts slots)
  ours pkm                       PKMLayer, 256^2 values of width 256, 4 heads x top-32, key_dim 128, softmax
  ours moe / dense_ffn           MoEFFN 16 experts top-2 of hidden 1024 (total params = the UltraMem value table),
                                 and the dense MLP 256 -> 1024 -> 256
  ours gather_pool               the retrieval kernel alone on the UltraMem row pattern: 1024 tokens x 64 rows of a
                                 [65536, 128] table, 2 cores, 4 IVE groups (random rows and groups)
  bound/embedding_bag gather     one bare F.embedding_bag weighted sum of the same 1024 x 64 rows x 128 floats
Targets (issue 6): ours ultramem >= 8x faster forward+backward than lucidrains/ultra-mem, and ours ultramem
inference within 3x of the bound's inference. Both ratios are in the table and in the JSON's `targets`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    Timing,
    add_common_arguments,
    format_table,
    grouped_bar_plot,
    header,
    load_warning,
    peak_memory_mb,
    setup,
    spread_warnings,
    time_round_robin,
    write_json,
)

HELP = "time UltraMem/PKM/MoE/dense layers and the retrieval kernel against lucidrains peers and embedding_bag"
NAME = "layers"

D_MODEL = 256
NUM_VALUES = 65536
TOP_M = 32
VALUE_DIM = 128
HEADS = 2  # UltraMem heads (ours) / core heads (lucidrains): 2 x 32 = 64 value rows read per token
GROUPS = 4  # IVE value expansion E
CORES = 2  # MCS cores
SPEEDUP_TARGET = 8.0
BOUND_TARGET = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=1, help="sequences per call (default 1)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only cases whose 'impl/layer' contains TEXT (repeatable; the bound and the peers "
                             "the ratios need are kept)")


@dataclass
class Case:
    impl: str  # ours | lucidrains/ultra-mem | lucidrains/product-key-memory | bound/embedding_bag
    layer: str
    config: dict[str, Any]
    params: int
    fwd: Callable[[], Any]
    fwd_bwd: Callable[[], Any]
    inference: Callable[[], Any]
    reset: Callable[[], None]  # drop gradients, so a memory measurement starts without the previous step's

    @property
    def label(self) -> str:
        return f"{self.impl}/{self.layer}"


# ---- cases -------------------------------------------------------------------------------------------------------


def module_case(impl: str, layer: str, module: nn.Module, x: torch.Tensor, config: dict[str, Any]) -> Case:
    """A layer called as module(x); its output is a tensor or a tuple whose first item is the output and which may
    carry an auxiliary loss (our (y, aux) dict, lucidrains' (y, indices, aux_loss)); backward goes through both."""

    def loss_of(out: Any) -> torch.Tensor:
        if not isinstance(out, tuple):
            return out.float().sum()
        y, extra = out[0], out[-1]
        aux = extra.get("aux_loss") if isinstance(extra, dict) else extra
        loss = y.float().sum()
        return loss + aux if isinstance(aux, torch.Tensor) and aux.requires_grad else loss

    def fwd() -> Any:
        module.train()
        return module(x)

    def reset() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None

    def fwd_bwd() -> None:
        module.train()
        reset()
        loss_of(module(x)).backward()

    def inference() -> Any:
        module.eval()
        with torch.no_grad():
            return module(x)

    params = sum(p.numel() for p in module.parameters())
    return Case(impl, layer, config, params, fwd, fwd_bwd, inference, reset)


def ultramem_input(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, seq, D_MODEL, device=device).requires_grad_()


def our_memory_config(layer: str):
    """MemoryConfig of our memory rows. `ultramem` has NUM_VALUES physical values (grid of (256*2)^2 virtual slots
    with E=4); `ultramem_same_slots` has NUM_VALUES virtual slots, i.e. lucidrains' key grid of 256^2 over a
    quarter as many physical rows (its `num_memories` counts slots: each core head's table has 65536/4 rows)."""
    from ultramem.config import MemoryConfig

    n = int(NUM_VALUES**0.5)
    if layer == "pkm":
        cfg = MemoryConfig(num_keys=n, key_dim=128, value_dim=D_MODEL, heads=4, query_share=1, top_m=TOP_M,
                           score="softmax", value_proj=False, tucker_rank=1, num_cores=1, value_expansion=1)
    else:
        num_keys = n if layer == "ultramem" else n // int(GROUPS**0.5)
        cfg = MemoryConfig(num_keys=num_keys, key_dim=128, value_dim=VALUE_DIM, heads=HEADS, query_share=2,
                           top_m=TOP_M, score="none", query_conv=5, value_proj=True, tucker_rank=2,
                           num_cores=CORES, value_expansion=GROUPS)
    cfg.validate()
    return cfg


def build_cases(batch: int, seq: int, device: torch.device,
                only: list[str]) -> tuple[list[Case], list[dict[str, str]]]:
    """The cases --only selects that can be built here, and a list of {label, reason} for those that cannot."""
    builders: list[tuple[str, Callable[[], Case]]] = [
        ("lucidrains/ultra-mem/ultramem", lambda: lucidrains_ultramem(batch, seq, device)),
        ("lucidrains/product-key-memory/pkm", lambda: lucidrains_pkm(batch, seq, device)),
        ("ours/ultramem", lambda: ours_memory("ultramem", batch, seq, device)),
        ("ours/ultramem_same_slots", lambda: ours_memory("ultramem_same_slots", batch, seq, device)),
        ("ours/pkm", lambda: ours_memory("pkm", batch, seq, device)),
        ("ours/moe", lambda: ours_moe(batch, seq, device)),
        ("ours/dense_ffn", lambda: ours_dense(batch, seq, device)),
        ("ours/gather_pool", lambda: ours_gather_pool(batch * seq, device, backend="auto")),
        ("bound/embedding_bag/gather", lambda: bound_embedding_bag(batch * seq, device)),
    ]
    if device.type == "cuda":
        from ultramem.kernels.retrieval import triton_available

        if triton_available():  # the PyTorch path next to the Triton kernel it is the reference of
            builders.append(("ours/gather_pool[torch]", lambda: ours_gather_pool(batch * seq, device, "torch")))
    cases, skipped = [], []
    wanted = selected([label for label, _ in builders], only)
    for label, build in builders:
        if label not in wanted:
            continue
        torch.manual_seed(0)
        try:
            cases.append(build())
        except ImportError as err:
            skipped.append({"label": label, "reason": f"not importable: {err}"})
    return cases, skipped


def lucidrains_ultramem(batch: int, seq: int, device: torch.device) -> Case:
    from ultra_mem import UltraMem

    kwargs = dict(dim=D_MODEL, num_memories=NUM_VALUES, topk=TOP_M)
    module = UltraMem(**kwargs).to(device)
    config = {**kwargs, "core_heads": module.heads, "dim_values": module.memories.shape[-1],
              "value_expansion": module.value_expansion}
    return module_case("lucidrains/ultra-mem", "ultramem", module, ultramem_input(batch, seq, device), config)


def lucidrains_pkm(batch: int, seq: int, device: torch.device) -> Case:
    from product_key_memory import PKM

    kwargs = dict(dim=D_MODEL, heads=4, num_keys=int(NUM_VALUES**0.5), topk=TOP_M)
    module = PKM(**kwargs).to(device)
    return module_case("lucidrains/product-key-memory", "pkm", module, ultramem_input(batch, seq, device),
                       {**kwargs, "dim_head": 128})


def ours_memory(layer: str, batch: int, seq: int, device: torch.device) -> Case:
    cfg = our_memory_config(layer)
    if layer == "pkm":
        from ultramem.memory.pkm import PKMLayer as Layer
    else:
        from ultramem.memory.ultramem import UltraMemLayer as Layer
    module = Layer(D_MODEL, cfg, 1).to(device)
    return module_case("ours", layer, module, ultramem_input(batch, seq, device),
                       {"d_model": D_MODEL, **dataclasses.asdict(cfg)})


def ours_moe(batch: int, seq: int, device: torch.device) -> Case:
    from ultramem.config import MoEConfig
    from ultramem.moe import MoEFFN

    cfg = MoEConfig(num_experts=16, top_k=2, expert_hidden=4 * D_MODEL)
    cfg.validate()
    module = MoEFFN(D_MODEL, 4 * D_MODEL, cfg, init_std=0.02, n_layers=1, dropout=0.0).to(device)
    return module_case("ours", "moe", module, ultramem_input(batch, seq, device),
                       {"d_model": D_MODEL, **dataclasses.asdict(cfg)})


def ours_dense(batch: int, seq: int, device: torch.device) -> Case:
    from ultramem.mlp import MLP

    module = MLP(D_MODEL, 4 * D_MODEL, init_std=0.02, n_layers=1).to(device)
    return module_case("ours", "dense_ffn", module, ultramem_input(batch, seq, device),
                       {"d_model": D_MODEL, "hidden": 4 * D_MODEL})


def retrieval_inputs(tokens: int, device: torch.device, cores: int):
    """The UltraMem row pattern: HEADS*TOP_M uniformly random rows per token of a [NUM_VALUES, VALUE_DIM] table."""
    K = HEADS * TOP_M
    values = nn.Parameter(torch.randn(NUM_VALUES, VALUE_DIM, device=device) * 0.02)
    rows = torch.randint(0, NUM_VALUES, (tokens, K), device=device)
    scores = torch.randn(tokens, K, cores, device=device).requires_grad_()
    return values, rows, scores


def ours_gather_pool(tokens: int, device: torch.device, backend: str) -> Case:
    from ultramem.kernels.retrieval import gather_pool

    values, rows, scores = retrieval_inputs(tokens, device, CORES)
    groups = torch.randint(0, GROUPS, rows.shape, device=device)

    def fwd() -> torch.Tensor:
        return gather_pool(values, rows, scores, groups, GROUPS, backend)

    def reset() -> None:
        values.grad = scores.grad = None

    def fwd_bwd() -> None:
        reset()
        fwd().sum().backward()

    def inference() -> torch.Tensor:
        with torch.no_grad():
            return fwd()

    layer = "gather_pool" if backend == "auto" else f"gather_pool[{backend}]"
    config = {"tokens": tokens, "rows_per_token": rows.shape[1], "num_values": NUM_VALUES, "value_dim": VALUE_DIM,
              "cores": CORES, "groups": GROUPS, "backend": backend}
    return Case("ours", layer, config, values.numel(), fwd, fwd_bwd, inference, reset)


def bound_embedding_bag(tokens: int, device: torch.device) -> Case:
    """The floor for reading these rows: one weighted-sum embedding_bag, no cores, no groups, no scoring."""
    values, rows, scores = retrieval_inputs(tokens, device, 1)
    weights = scores.squeeze(-1).detach().requires_grad_()

    def fwd() -> torch.Tensor:
        return F.embedding_bag(rows, values, mode="sum", per_sample_weights=weights)

    def reset() -> None:
        values.grad = weights.grad = None

    def fwd_bwd() -> None:
        reset()
        fwd().sum().backward()

    def inference() -> torch.Tensor:
        with torch.no_grad():  # a detached table takes embedding_bag's forward-only kernel
            return F.embedding_bag(rows, values.detach(), mode="sum", per_sample_weights=weights.detach())

    config = {"tokens": tokens, "rows_per_token": rows.shape[1], "num_values": NUM_VALUES, "value_dim": VALUE_DIM}
    return Case("bound/embedding_bag", "gather", config, values.numel(), fwd, fwd_bwd, inference, reset)


# ---- measurement and report ------------------------------------------------------------------------------------------


def measure(cases: list[Case], device: torch.device, warmup: int, repeats: int) -> list[dict[str, Any]]:
    timings: dict[str, dict[str, Timing]] = {}
    for mode in ("fwd", "fwd_bwd", "inference"):
        timings[mode] = time_round_robin({c.label: getattr(c, mode) for c in cases}, device, warmup, repeats)
    rows = []
    for c in cases:
        row: dict[str, Any] = {"impl": c.impl, "layer": c.layer, "params": c.params}
        for mode in ("fwd", "fwd_bwd", "inference"):
            t = timings[mode][c.label]
            row[f"{mode}_ms"] = t.median
            row[f"{mode}_ms_iqr"] = t.iqr
        c.reset()
        row["peak_mem_mb"] = peak_memory_mb(c.fwd_bwd, device)
        c.reset()
        row["inference_peak_mem_mb"] = peak_memory_mb(c.inference, device)
        row["samples_ms"] = {mode: timings[mode][c.label].samples_ms for mode in ("fwd", "fwd_bwd", "inference")}
        row["config"] = c.config
        rows.append(row)
    add_ratios(rows)
    return rows


# our layer -> the peer row it is compared with
PEER_OF = {"ultramem": "lucidrains/ultra-mem/ultramem", "ultramem_same_slots": "lucidrains/ultra-mem/ultramem",
           "pkm": "lucidrains/product-key-memory/pkm"}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """speedup_*_vs_peer = peer time / our time (ours at the peer's settings); inference_vs_bound = our inference
    time / the bare embedding_bag's (the retrieval rows only: kernel and UltraMem read the same rows as the bound)."""
    by = {f"{r['impl']}/{r['layer']}": r for r in rows}
    bound = by.get("bound/embedding_bag/gather")
    for r in rows:
        if r["impl"] != "ours":
            continue
        peer = by.get(PEER_OF.get(r["layer"], ""))
        if peer is not None:
            r["speedup_fwd_bwd_vs_peer"] = peer["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["speedup_inference_vs_peer"] = peer["inference_ms"] / r["inference_ms"]
        if bound is not None and (r["layer"].startswith("ultramem") or r["layer"].startswith("gather_pool")):
            r["inference_vs_bound"] = r["inference_ms"] / bound["inference_ms"]
            r["fwd_bwd_vs_bound"] = r["fwd_bwd_ms"] / bound["fwd_bwd_ms"]


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ours = next((r for r in rows if r["impl"] == "ours" and r["layer"] == "ultramem"), {})
    out = []
    speedup = ours.get("speedup_fwd_bwd_vs_peer")
    if speedup is not None:
        out.append({"name": "ours ultramem fwd+bwd speedup over lucidrains/ultra-mem", "value": speedup,
                    "target": f">= {SPEEDUP_TARGET:g}", "met": speedup >= SPEEDUP_TARGET})
    ratio = ours.get("inference_vs_bound")
    if ratio is not None:
        out.append({"name": "ours ultramem inference / bare embedding_bag inference", "value": ratio,
                    "target": f"<= {BOUND_TARGET:g}", "met": ratio <= BOUND_TARGET})
    return out


COLUMNS = [
    ("impl", "impl"), ("layer", "layer"), ("params", "params"),
    ("fwd_ms", "fwd ms"), ("fwd_bwd_ms", "fwd+bwd ms"), ("fwd_bwd_ms_iqr", "(iqr)"),
    ("inference_ms", "infer ms"), ("inference_ms_iqr", "(iqr)"),
    ("peak_mem_mb", "peak MB"), ("inference_peak_mem_mb", "infer MB"),
    ("speedup_fwd_bwd_vs_peer", "x peer fwd+bwd"), ("speedup_inference_vs_peer", "x peer infer"),
    ("inference_vs_bound", "infer/bound"),
]


def selected(labels: list[str], only: list[str]) -> list[str]:
    """--only filters 'impl/layer' labels; the bound and the peers of every selected layer stay (the ratios)."""
    if not only:
        return labels
    keep = {label for label in labels if any(t in label for t in only)}
    keep |= {PEER_OF[label[len("ours/"):]] for label in keep if label[len("ours/"):] in PEER_OF}
    return [label for label in labels if label in keep or label.startswith("bound/")]


def run(args: argparse.Namespace) -> int:
    device = setup(args)
    if args.batch < 1 or args.seq < 1:
        raise SystemExit(f"error: --batch and --seq must be >= 1 (got {args.batch}, {args.seq})")
    cases, skipped = build_cases(args.batch, args.seq, device, args.only)
    busy = [load_warning(torch.get_num_threads())]
    rows = measure(cases, device, args.warmup, args.repeats)
    busy.append(load_warning(0))
    warnings = [w for w in busy if w][:1] + spread_warnings(rows, ("fwd", "fwd_bwd", "inference"))
    settings = {"batch": args.batch, "seq": args.seq, "tokens": args.batch * args.seq, "d_model": D_MODEL,
                "warmup": args.warmup, "repeats": args.repeats, "timing": "wall clock, median and IQR of "
                "interleaved repeats; fwd in train mode, inference in eval mode under torch.no_grad"}
    payload = {**header(NAME, device, settings), "rows": rows, "targets": targets(rows), "skipped": skipped,
               "warnings": warnings}
    json_path = write_json(payload, args.out / f"{NAME}.json")
    if not args.no_plot:
        labels = [f"{r['impl']}/{r['layer']}" for r in rows]
        grouped_bar_plot(labels, {m: [r[f"{m}_ms"] for r in rows] for m in ("fwd", "fwd_bwd", "inference")},
                         args.out / f"{NAME}.png", ylabel="ms (median, log scale)",
                         title=f"layers, {args.batch * args.seq} tokens, d={D_MODEL}, {device}, "
                               f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.format == "json":
        print(json_path.read_text(), end="")
        return 0
    print(format_table(rows, COLUMNS))
    for t in payload["targets"]:
        print(f"target: {t['name']} = {t['value']:.3g} (want {t['target']}): {'met' if t['met'] else 'NOT met'}")
    for s in skipped:
        print(f"skipped {s['label']}: {s['reason']}")
    for w in warnings:
        print(f"warning: {w}")
    print(f"wrote {json_path}" + ("" if args.no_plot else f" and {args.out / (NAME + '.png')}"))
    return 0
