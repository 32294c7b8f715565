"""Layer benchmark: this project's UltraMem, PKM, MoE and dense FFN layers and its retrieval kernel, side by side in
one run with the public peers, the bare embedding_bag bound and the parts that bound our layer's inference.

  ultramem bench layers [--format table|json] [--out DIR] [--threads 2] [--repeats 10] [--warmup 3] [--only TEXT]
                        [--clock wall|cpu] [--profile]

Per case: forward (training mode, graph built), forward+backward and inference (eval mode, torch.no_grad) time as
the median and interquartile range of --repeats calls after --warmup calls, interleaved across cases (see
benchmarks/common.py), and the peak memory of one forward+backward and of one inference call. --profile adds the
top operators (torch.profiler, self time per call) of our memory layers to the table and the JSON.

Cases, at d = 256 and 1024 tokens (--batch x --seq):
  lucidrains/ultra-mem ultramem  UltraMem(dim=256, num_memories=65536, topk=32): one 128-wide query against a
                                 256 x 256 key grid (num_memories counts these 65536 addressable slots), 2 core heads,
                                 each with its own core, its own top-32 and its own table of 65536/4 = 16384 rows x 128
                                 (IVE: slot v reads row v // 4), i.e. 4,194,304 value parameters, 64 rows x 128 =
                                 8192 floats read per token
  ours ultramem                  the same memory size: 65536 slots (n' = 256 keys per side, E = 4 over N = 128^2 =
                                 16384 physical rows), 16384 x 256 = 4,194,304 value parameters, top-32, key_dim 128,
                                 query conv 5, d = 256. Its two MCS cores weight the two 128-wide column halves of each
                                 selected row (the paper's version of lucidrains' two per-head tables), so one head of
                                 top-32 reads 32 rows x 256 = the same 8192 floats per token. What the designs cannot
                                 share: lucidrains makes a top-32 per core head (two selections), ours one joint top-32
                                 ranked by the summed cores (MCS); its IVE projections are per head 4 x 128 x 128,
                                 ours the official Linear(4 * 256 -> 256)
  ours ultramem_65k_rows         65536 PHYSICAL rows of 128 (num_keys 256, 262144 slots), 2 heads sharing a query,
                                 top-32 each: the same 64 rows x 128 floats per token, 2x the value parameters
  lucidrains/product-key-memory  PKM(dim=256, heads=4, num_keys=256, topk=32): 256^2 values of width 256
  ours pkm                       PKMLayer, 256^2 values of width 256, 4 heads x top-32, key_dim 128, softmax
  ours memory_plus               Memory+ (Meta; ultramem/memory/memory_plus.py) at the matched row's memory size:
                                 16384 rows x 256 (num_keys 128, value_dim = d), 4,194,304 value parameters, 1 head x
                                 top-32 (32 rows x 256 = the same 8192 floats per token), key_dim 256 (two halves of
                                 128: the matched row's key width per side), SiLU-gated output, no q/k norm (Meta's
                                 released code), its own table. What it cannot share: IVE (16384 slots, not 65536),
                                 cores and the query conv; Meta's default is 4 heads, kept at 1 x 32 here so both
                                 rows run the same top-32 over 128 keys per side and over 32^2 candidates
  ours ultramem_v2               UltraMemV2 (ultramem/memory/ultramem_v2.py) at the same memory size: one layer over
                                 its UltraMemV2Table of 16384 rows (num_keys 128) x (192 values + 64 pre-values: the
                                 paper's D_p:D_v = 1:3), 4,194,304 table parameters, 1 head x top-32 (32 rows x 256 =
                                 the same 8192 floats per token), key_dim 128, Tucker rank 2, 2 cores, per-rank
                                 queries, the released code's init. It cannot share IVE (16384 slots) or the conv
  ours moe / dense_ffn           MoEFFN 16 experts top-2 of hidden 1024 (total params = the 65k-row value table),
                                 and the dense MLP 256 -> 1024 -> 256
  ours gather_pool               the retrieval kernel alone on the 65k-row pattern: 1024 tokens x 64 rows of a
                                 [65536, 128] table, 2 cores, 4 IVE groups (random rows and groups)
  bound/embedding_bag <layer>    one bare F.embedding_bag weighted sum of the rows that layer reads: 1024 x 32 rows
                                 x 256 floats of [16384, 256] (ultramem), 1024 x 64 x 128 of [65536, 128]
                                 (ultramem_65k_rows; the issue's "about 8 ms" figure)
  floor/matmuls <layer>          that layer's three matmuls alone (query projection, query x every key per rank,
                                 value projection), with random operands of its shapes
  floor/topk <layer>             that layer's two top-m calls alone (stage 1 over the n' keys of each side, stage 2
                                 over the m^2 candidates), on random scores; no backward (indices only)
Memory+ and UltraMemV2 have no public peer here (lucidrains' ultra-mem and product-key-memory implement neither), so
their rows have no "x peer" ratio (the JSON's `notes` say so); their infer/bound is against bound/embedding_bag
ultramem, the same 32 rows x 256 floats of a 16384-row table per token.
Targets (issue 6): ours ultramem >= 8x faster forward+backward than lucidrains/ultra-mem, and ours ultramem
inference within 3x of its bound's inference. Both ratios are in the table and in the JSON's `targets`, next to
the inference floor (bound + matmuls + top-k, each timed alone): what this exact algorithm cannot go below here.
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
from torch.profiler import ProfilerActivity, profile

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
from ultramem.config import MemoryConfig, MemoryPlusConfig, MoEConfig, UltraMemV2Config
from ultramem.kernels.retrieval import gather_pool, triton_available
from ultramem.memory.memory_plus import MemoryPlusLayer
from ultramem.memory.pkm import PKMLayer
from ultramem.memory.ultramem import UltraMemLayer
from ultramem.memory.ultramem_v2 import UltraMemV2Layer, UltraMemV2Table
from ultramem.mlp import MLP
from ultramem.moe import MoEFFN

HELP = ("time UltraMem/PKM/Memory+/UltraMemV2/MoE/dense layers and the retrieval kernel against lucidrains peers and "
        "embedding_bag")
NAME = "layers"

D_MODEL = 256
NUM_MEMORIES = 65536  # lucidrains' num_memories: the slots of its 256 x 256 key grid
TOP_M = 32
KEY_DIM = 128
GROUPS = 4  # IVE value expansion E (lucidrains' default too)
CORES = 2  # MCS cores (lucidrains' core heads)
SPEEDUP_TARGET = 8.0
BOUND_TARGET = 3.0
MEMORY_LAYERS = ("ultramem", "ultramem_65k_rows", "pkm")
SHARED_TABLE_LAYERS = ("memory_plus", "ultramem_v2")  # the families with a table shared across blocks (no peer)
NO_PEER_NOTE = ("ours/memory_plus and ours/ultramem_v2 have no public peer in this benchmark: lucidrains' ultra-mem "
                "and product-key-memory implement neither Memory+ nor UltraMemV2, so their rows carry no 'x peer' "
                "ratio; their infer/bound is against bound/embedding_bag/ultramem (the same 32 rows x 256 floats per "
                "token of a 16384-row table)")
MODES = ("fwd", "fwd_bwd", "inference")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, clock=True)
    parser.add_argument("--batch", type=int, default=1, help="sequences per call (default 1)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only cases whose 'impl/layer' contains TEXT (repeatable; the peers, bounds and "
                             "floors the ratios need are kept)")
    parser.add_argument("--profile", action="store_true",
                        help="also record the top operators of our memory layers (torch.profiler)")


@dataclass
class Case:
    impl: str  # ours | lucidrains/ultra-mem | lucidrains/product-key-memory | bound/embedding_bag | floor/...
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
    """MemoryConfig of our memory rows (see the module docstring for how `ultramem` matches lucidrains')."""
    if layer == "pkm":
        cfg = MemoryConfig(num_keys=256, key_dim=KEY_DIM, value_dim=D_MODEL, heads=4, query_share=1, top_m=TOP_M,
                           score="softmax", value_proj=False, tucker_rank=1, num_cores=1, value_expansion=1)
    elif layer in ("ultramem", "ultramem_65k_rows"):
        matched = layer == "ultramem"
        cfg = MemoryConfig(num_keys=128 if matched else 256, key_dim=KEY_DIM, value_dim=2 * KEY_DIM if matched
                           else KEY_DIM, heads=1 if matched else 2, query_share=1 if matched else 2, top_m=TOP_M,
                           score="none", query_conv=5, value_proj=True, tucker_rank=2, num_cores=CORES,
                           value_expansion=GROUPS)
    else:
        raise ValueError(f"unknown memory layer {layer!r}; known: {', '.join(MEMORY_LAYERS)}")
    cfg.validate()
    return cfg


def memory_plus_config() -> MemoryPlusConfig:
    """Memory+ at the matched row's memory size (module docstring): 128^2 rows of d, 1 head x top-32."""
    cfg = MemoryPlusConfig(layers="0", num_keys=128, key_dim=2 * KEY_DIM, heads=1, top_m=TOP_M, value_dim=D_MODEL,
                           qk_norm=False, swilu=True)
    cfg.validate()
    return cfg


def ultramem_v2_config() -> UltraMemV2Config:
    """UltraMemV2 at the matched row's memory size: 128^2 rows of 192 values + 64 pre-values, 1 head x top-32."""
    cfg = UltraMemV2Config(num_keys=128, key_dim=KEY_DIM, value_dim=3 * D_MODEL // 4, pre_value_dim=D_MODEL // 4,
                           heads=1, top_m=TOP_M, tucker_rank=2, num_cores=CORES, query_per_rank=True,
                           share_ratio=0.0, init="official")
    cfg.validate(num_layers=1)
    return cfg


def memory_size(cfg) -> dict[str, int]:  # noqa: ANN001
    """What "the same memory size" compares: addressable slots, value parameters, floats read per token (for
    UltraMemV2 its values and pre-values together: both are read at the selected rows)."""
    if isinstance(cfg, MemoryPlusConfig):
        rows, width, slots = cfg.num_values, cfg.value_dim or D_MODEL, cfg.num_values
    elif isinstance(cfg, UltraMemV2Config):
        rows, width, slots = cfg.table_rows(1), cfg.value_dim + cfg.pre_value_dim, cfg.keys_per_side(1) ** 2
    else:
        rows, width, slots = cfg.num_values, cfg.value_dim, cfg.value_expansion * cfg.num_values
    return {"slots": slots, "value_params": rows * width, "rows_read_per_token": cfg.heads * cfg.top_m,
            "floats_read_per_token": cfg.heads * cfg.top_m * width}


def lucidrains_memory_size(module: nn.Module) -> dict[str, int]:
    heads, rows, dim_values = module.memories.shape  # [core heads, num_memories / value_expansion, dim_values]
    return {"slots": module.num_keys**2, "value_params": heads * rows * dim_values,
            "rows_read_per_token": heads * module.topk, "floats_read_per_token": heads * module.topk * dim_values}


def lucidrains_ultramem(batch: int, seq: int, device: torch.device) -> Case:
    from ultra_mem import UltraMem  # lazy: optional peer (the `peers` extra); only its cases need it

    kwargs = dict(dim=D_MODEL, num_memories=NUM_MEMORIES, topk=TOP_M)
    module = UltraMem(**kwargs).to(device)
    config = {**kwargs, "core_heads": module.heads, "dim_values": module.memories.shape[-1],
              "value_expansion": module.value_expansion, **lucidrains_memory_size(module)}
    return module_case("lucidrains/ultra-mem", "ultramem", module, ultramem_input(batch, seq, device), config)


def lucidrains_pkm(batch: int, seq: int, device: torch.device) -> Case:
    from product_key_memory import PKM  # lazy: optional peer (the `peers` extra); only its cases need it

    kwargs = dict(dim=D_MODEL, heads=4, num_keys=256, topk=TOP_M)
    module = PKM(**kwargs).to(device)
    return module_case("lucidrains/product-key-memory", "pkm", module, ultramem_input(batch, seq, device),
                       {**kwargs, "dim_head": 128})


def ours_memory(layer: str, batch: int, seq: int, device: torch.device) -> Case:
    cfg = our_memory_config(layer)
    Layer = PKMLayer if layer == "pkm" else UltraMemLayer
    module = Layer(D_MODEL, cfg, 1).to(device)
    return module_case("ours", layer, module, ultramem_input(batch, seq, device),
                       {"d_model": D_MODEL, **dataclasses.asdict(cfg), **memory_size(cfg)})


def matched_to_ultramem(cfg) -> dict[str, Any]:  # noqa: ANN001
    """Which memory-size figures of a shared-table family's row equal those of `ours/ultramem`, and which cannot."""
    ours, ref = memory_size(cfg), memory_size(our_memory_config("ultramem"))
    return {"matched_to": "ours/ultramem", "matched": [k for k in ours if ours[k] == ref[k]],
            "not_matched": {k: [ours[k], ref[k]] for k in ours if ours[k] != ref[k]}, "peer": None}


def ours_memory_plus(batch: int, seq: int, device: torch.device) -> Case:
    cfg = memory_plus_config()
    module = MemoryPlusLayer(D_MODEL, cfg).to(device)  # a private table: one layer
    return module_case("ours", "memory_plus", module, ultramem_input(batch, seq, device),
                       {"d_model": D_MODEL, **dataclasses.asdict(cfg), **memory_size(cfg), **matched_to_ultramem(cfg)})


def ours_ultramem_v2(batch: int, seq: int, device: torch.device) -> Case:
    cfg = ultramem_v2_config()
    table = UltraMemV2Table(D_MODEL, cfg, num_layers=1)  # one layer: its window is the whole table
    module = UltraMemV2Layer(D_MODEL, cfg, 0, 1, 0.02, table).to(device)
    return module_case("ours", "ultramem_v2", module, ultramem_input(batch, seq, device),
                       {"d_model": D_MODEL, **dataclasses.asdict(cfg), **memory_size(cfg), **matched_to_ultramem(cfg)})


def ours_moe(batch: int, seq: int, device: torch.device) -> Case:
    cfg = MoEConfig(num_experts=16, top_k=2, expert_hidden=4 * D_MODEL)
    cfg.validate()
    module = MoEFFN(D_MODEL, 4 * D_MODEL, cfg, init_std=0.02, n_layers=1, dropout=0.0).to(device)
    return module_case("ours", "moe", module, ultramem_input(batch, seq, device),
                       {"d_model": D_MODEL, **dataclasses.asdict(cfg)})


def ours_dense(batch: int, seq: int, device: torch.device) -> Case:
    module = MLP(D_MODEL, 4 * D_MODEL, init_std=0.02, n_layers=1).to(device)
    return module_case("ours", "dense_ffn", module, ultramem_input(batch, seq, device),
                       {"d_model": D_MODEL, "hidden": 4 * D_MODEL})


def retrieval_inputs(tokens: int, device: torch.device, layer: str, cores: int):
    """The rows `layer` reads: heads*top_m uniformly random rows per token of its [N, Dv] table."""
    cfg = our_memory_config(layer)
    K = cfg.heads * cfg.top_m
    values = nn.Parameter(torch.randn(cfg.num_values, cfg.value_dim, device=device) * 0.02)
    rows = torch.randint(0, cfg.num_values, (tokens, K), device=device)
    scores = torch.randn(tokens, K, cores, device=device).requires_grad_()
    return values, rows, scores


def grad_case(impl: str, layer: str, config: dict[str, Any], leaves: list[torch.Tensor],
              fn: Callable[[], torch.Tensor], differentiable: bool = True) -> Case:
    """A case from a function of leaf tensors; fwd_bwd backpropagates sum(fn()) (just fn() if not differentiable)."""

    def reset() -> None:
        for t in leaves:
            t.grad = None

    def fwd_bwd() -> None:
        reset()
        out = fn()
        if differentiable:
            out.sum().backward()

    def inference() -> torch.Tensor:
        with torch.no_grad():
            return fn()

    return Case(impl, layer, config, sum(t.numel() for t in leaves if t.requires_grad), fn, fwd_bwd, inference,
                reset)


def ours_gather_pool(tokens: int, device: torch.device, backend: str) -> Case:
    values, rows, scores = retrieval_inputs(tokens, device, "ultramem_65k_rows", CORES)
    groups = torch.randint(0, GROUPS, rows.shape, device=device)
    layer = "gather_pool" if backend == "auto" else f"gather_pool[{backend}]"
    config = {"tokens": tokens, "rows_per_token": rows.shape[1], "num_values": values.shape[0],
              "value_dim": values.shape[1], "cores": CORES, "groups": GROUPS, "backend": backend}
    return grad_case("ours", layer, config, [values, scores],
                     lambda: gather_pool(values, rows, scores, groups, GROUPS, backend))


def bound_embedding_bag(layer: str, tokens: int, device: torch.device) -> Case:
    """The floor for reading `layer`'s rows: one weighted-sum embedding_bag, no cores, no groups, no scoring.
    Under no_grad the table is detached, which takes embedding_bag's forward-only kernel (as our layers do)."""
    values, rows, scores = retrieval_inputs(tokens, device, layer, 1)
    weights = scores.squeeze(-1).detach().requires_grad_()

    def fn() -> torch.Tensor:
        table, w = (values, weights) if torch.is_grad_enabled() else (values.detach(), weights.detach())
        return F.embedding_bag(rows, table, mode="sum", per_sample_weights=w)

    config = {"tokens": tokens, "rows_per_token": rows.shape[1], "num_values": values.shape[0],
              "value_dim": values.shape[1]}
    return grad_case("bound/embedding_bag", layer, config, [values, weights], fn)


def floor_matmuls(layer: str, tokens: int, device: torch.device) -> Case:
    """`layer`'s three matmuls with random operands of its shapes: x [T, d] @ W_q [d, 2 D_k Hq]; per query group and
    side q [T, D_k] @ keys [D_k, s r n']; pooled [T, E D_v] @ W_v [E D_v, d]."""
    cfg = our_memory_config(layer)
    Hq, s, r, n = cfg.heads // cfg.query_share, cfg.query_share, cfg.tucker_rank, cfg.keys_per_side
    x = torch.randn(tokens, D_MODEL, device=device, requires_grad=True)
    w_q = torch.randn(D_MODEL, Hq * 2 * cfg.key_dim, device=device, requires_grad=True)
    keys = torch.randn(Hq * 2, cfg.key_dim, s * r * n, device=device, requires_grad=True)
    pooled = torch.randn(tokens, cfg.value_expansion * cfg.value_dim, device=device, requires_grad=True)
    w_v = torch.randn(cfg.value_expansion * cfg.value_dim, D_MODEL, device=device, requires_grad=True)

    def fn() -> torch.Tensor:
        q = (x @ w_q).view(tokens, Hq * 2, cfg.key_dim).transpose(0, 1)  # [Hq*2, T, Dk]
        return torch.bmm(q, keys).sum() + (pooled @ w_v).sum()

    config = {"tokens": tokens, "query": [D_MODEL, Hq * 2 * cfg.key_dim], "scores": [Hq * 2, cfg.key_dim, s * r * n],
              "value_proj": [cfg.value_expansion * cfg.value_dim, D_MODEL]}
    return grad_case("floor/matmuls", layer, config, [x, w_q, keys, pooled, w_v], fn)


def floor_topk(layer: str, tokens: int, device: torch.device) -> Case:
    """`layer`'s two top-m calls on random scores: stage 1 over [Hq*2*T*s, n'], stage 2 over [Hq*T*s, m*m]."""
    cfg = our_memory_config(layer)
    Hq, s, m, n = cfg.heads // cfg.query_share, cfg.query_share, cfg.top_m, cfg.keys_per_side
    stage1 = torch.randn(Hq * 2 * tokens * s, n, device=device)
    stage2 = torch.randn(Hq * tokens * s, m * m, device=device)

    def fn() -> torch.Tensor:
        return stage1.topk(m, dim=-1, sorted=False).indices.sum() + stage2.topk(m, dim=-1, sorted=False).indices.sum()

    config = {"tokens": tokens, "stage1": list(stage1.shape), "stage2": list(stage2.shape), "k": m}
    return grad_case("floor/topk", layer, config, [], fn, differentiable=False)


# label -> builder(batch, seq, device); the order is the table's
def builders(batch: int, seq: int, device: torch.device) -> list[tuple[str, Callable[[], Case]]]:
    T = batch * seq
    out: list[tuple[str, Callable[[], Case]]] = [
        ("lucidrains/ultra-mem/ultramem", lambda: lucidrains_ultramem(batch, seq, device)),
        ("lucidrains/product-key-memory/pkm", lambda: lucidrains_pkm(batch, seq, device)),
    ]
    out += [(f"ours/{layer}", lambda layer=layer: ours_memory(layer, batch, seq, device)) for layer in MEMORY_LAYERS]
    out += [("ours/memory_plus", lambda: ours_memory_plus(batch, seq, device)),
            ("ours/ultramem_v2", lambda: ours_ultramem_v2(batch, seq, device)),
            ("ours/moe", lambda: ours_moe(batch, seq, device)),
            ("ours/dense_ffn", lambda: ours_dense(batch, seq, device)),
            ("ours/gather_pool", lambda: ours_gather_pool(T, device, backend="auto"))]
    # on CUDA with Triton: the PyTorch path next to the Triton kernel it is the reference of
    if device.type == "cuda" and triton_available():
        out.append(("ours/gather_pool[torch]", lambda: ours_gather_pool(T, device, "torch")))
    for layer in ("ultramem", "ultramem_65k_rows"):
        out += [(f"bound/embedding_bag/{layer}", lambda layer=layer: bound_embedding_bag(layer, T, device)),
                (f"floor/matmuls/{layer}", lambda layer=layer: floor_matmuls(layer, T, device)),
                (f"floor/topk/{layer}", lambda layer=layer: floor_topk(layer, T, device))]
    return out


def build_cases(batch: int, seq: int, device: torch.device,
                only: list[str]) -> tuple[list[Case], list[dict[str, str]]]:
    """The cases --only selects that can be built here, and a list of {label, reason} for those that cannot."""
    todo = builders(batch, seq, device)
    wanted = selected([label for label, _ in todo], only)
    cases, skipped = [], []
    for label, build in todo:
        if label not in wanted:
            continue
        torch.manual_seed(0)
        try:
            cases.append(build())
        except ImportError as err:
            skipped.append({"label": label, "reason": f"not importable: {err}"})
    return cases, skipped


# our layer -> the peer row it is compared with, and the layer whose bound and floors it is compared with
PEER_OF = {"ultramem": "lucidrains/ultra-mem/ultramem", "ultramem_65k_rows": "lucidrains/ultra-mem/ultramem",
           "pkm": "lucidrains/product-key-memory/pkm"}
BOUND_OF = {"ultramem": "ultramem", "ultramem_65k_rows": "ultramem_65k_rows", "gather_pool": "ultramem_65k_rows",
            "gather_pool[torch]": "ultramem_65k_rows", "memory_plus": "ultramem", "ultramem_v2": "ultramem"}


def selected(labels: list[str], only: list[str]) -> list[str]:
    """--only filters 'impl/layer' labels; the peers, bounds and floors of every selected layer stay (the ratios)."""
    if not only:
        return labels
    keep = {label for label in labels if any(t in label for t in only)}
    ours = {label[len("ours/"):] for label in keep if label.startswith("ours/")}
    keep |= {PEER_OF[layer] for layer in ours if layer in PEER_OF}
    bounded = {BOUND_OF[layer] for layer in ours if layer in BOUND_OF}
    keep |= {label for label in labels if label.startswith(("bound/", "floor/")) and label.rsplit("/", 1)[1]
             in bounded}
    return [label for label in labels if label in keep]


# ---- measurement and report ------------------------------------------------------------------------------------------


def measure(cases: list[Case], device: torch.device, warmup: int, repeats: int,
            clock: str = "wall") -> list[dict[str, Any]]:
    timings: dict[str, dict[str, Timing]] = {}
    for mode in MODES:
        timings[mode] = time_round_robin({c.label: getattr(c, mode) for c in cases}, device, warmup, repeats, clock)
    rows = []
    for c in cases:
        row: dict[str, Any] = {"impl": c.impl, "layer": c.layer, "params": c.params}
        for mode in MODES:
            t = timings[mode][c.label]
            row[f"{mode}_ms"] = t.median
            row[f"{mode}_ms_iqr"] = t.iqr
        c.reset()
        row["peak_mem_mb"] = peak_memory_mb(c.fwd_bwd, device)
        c.reset()
        row["inference_peak_mem_mb"] = peak_memory_mb(c.inference, device)
        row["samples_ms"] = {mode: timings[mode][c.label].samples_ms for mode in MODES}
        row["config"] = c.config
        rows.append(row)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """speedup_*_vs_peer = peer time / our time (ours at the peer's settings); *_vs_bound = our time / the bare
    embedding_bag of the same rows; inference_floor_ms = that bound + the layer's matmuls + its top-k (inference,
    each timed alone), and inference_floor_vs_bound = floor / bound: the least inference/bound this algorithm can
    reach with these kernels."""
    by = {f"{r['impl']}/{r['layer']}": r for r in rows}
    for r in rows:
        if r["impl"] != "ours":
            continue
        peer = by.get(PEER_OF.get(r["layer"], ""))
        if peer is not None:
            r["speedup_fwd_bwd_vs_peer"] = peer["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["speedup_inference_vs_peer"] = peer["inference_ms"] / r["inference_ms"]
        target = BOUND_OF.get(r["layer"])
        bound = by.get(f"bound/embedding_bag/{target}")
        if bound is None:
            continue
        r["inference_vs_bound"] = r["inference_ms"] / bound["inference_ms"]
        r["fwd_bwd_vs_bound"] = r["fwd_bwd_ms"] / bound["fwd_bwd_ms"]
        parts = [by.get(f"floor/{part}/{target}") for part in ("matmuls", "topk")]
        if target == r["layer"] and all(parts):  # the floors time that layer's own shapes
            floor = bound["inference_ms"] + sum(p["inference_ms"] for p in parts)
            r["inference_floor_ms"] = floor
            r["inference_floor_vs_bound"] = floor / bound["inference_ms"]


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ours = next((r for r in rows if r["impl"] == "ours" and r["layer"] == "ultramem"), {})
    out = []
    speedup = ours.get("speedup_fwd_bwd_vs_peer")
    if speedup is not None:
        out.append({"name": "ours ultramem fwd+bwd speedup over lucidrains/ultra-mem", "value": speedup,
                    "target": f">= {SPEEDUP_TARGET:g}", "met": speedup >= SPEEDUP_TARGET})
    ratio = ours.get("inference_vs_bound")
    if ratio is not None:
        target = {"name": "ours ultramem inference / bare embedding_bag inference", "value": ratio,
                  "target": f"<= {BOUND_TARGET:g}", "met": ratio <= BOUND_TARGET}
        if "inference_floor_vs_bound" in ours:
            target["floor"] = ours["inference_floor_vs_bound"]
        out.append(target)
    return out


def profile_case(case: Case, device: torch.device, calls: int = 3, top: int = 12) -> dict[str, list[dict]]:
    """Top operators by self time per call of fwd_bwd and inference (one warm-up call, then `calls` profiled)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for mode in ("fwd_bwd", "inference"):
        fn = getattr(case, mode)
        fn()
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events) or 1.0
        out[mode] = [{"op": e.key, "self_ms": getattr(e, key) / 1e3 / calls, "calls": e.count / calls,
                      "share": getattr(e, key) / total} for e in events[:top]]
    return out


COLUMNS = [
    ("impl", "impl"), ("layer", "layer"), ("params", "params"),
    ("fwd_ms", "fwd ms"), ("fwd_bwd_ms", "fwd+bwd ms"), ("fwd_bwd_ms_iqr", "(iqr)"),
    ("inference_ms", "infer ms"), ("inference_ms_iqr", "(iqr)"),
    ("peak_mem_mb", "peak MB"), ("inference_peak_mem_mb", "infer MB"),
    ("speedup_fwd_bwd_vs_peer", "x peer fwd+bwd"), ("speedup_inference_vs_peer", "x peer infer"),
    ("inference_vs_bound", "infer/bound"), ("inference_floor_vs_bound", "floor/bound"),
]


def run(args: argparse.Namespace) -> int:
    device = setup(args)
    if args.batch < 1 or args.seq < 1:
        raise SystemExit(f"error: --batch and --seq must be >= 1 (got {args.batch}, {args.seq})")
    cases, skipped = build_cases(args.batch, args.seq, device, args.only)
    busy = [load_warning(torch.get_num_threads())]
    rows = measure(cases, device, args.warmup, args.repeats, args.clock)
    busy.append(load_warning(0))
    profiles = {c.label: profile_case(c, device) for c in cases
                if args.profile and c.impl == "ours" and c.layer in MEMORY_LAYERS + SHARED_TABLE_LAYERS}
    warnings = [w for w in busy if w][:1] + spread_warnings(rows, MODES)
    settings = {"batch": args.batch, "seq": args.seq, "tokens": args.batch * args.seq, "d_model": D_MODEL,
                "warmup": args.warmup, "repeats": args.repeats, "clock": args.clock,
                "timing": f"{args.clock} clock, median and IQR of interleaved repeats; fwd in train mode, inference "
                          "in eval mode under torch.no_grad"}
    notes = [NO_PEER_NOTE] if any(c.layer in SHARED_TABLE_LAYERS for c in cases if c.impl == "ours") else []
    payload = {**header(NAME, device, settings), "rows": rows, "targets": targets(rows), "skipped": skipped,
               "warnings": warnings, "profiles": profiles, "notes": notes}
    json_path = write_json(payload, args.out / f"{NAME}.json")
    if not args.no_plot:
        labels = [f"{r['impl']}/{r['layer']}" for r in rows]
        grouped_bar_plot(labels, {m: [r[f"{m}_ms"] for r in rows] for m in MODES},
                         args.out / f"{NAME}.png", ylabel=f"ms (median, {args.clock} clock, log scale)",
                         title=f"layers, {args.batch * args.seq} tokens, d={D_MODEL}, {device}, "
                               f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.format == "json":
        print(json_path.read_text(), end="")
        return 0
    print(format_table(rows, COLUMNS))
    for t in payload["targets"]:
        floor = f"; floor (bound + matmuls + top-k) = {t['floor']:.3g}" if "floor" in t else ""
        print(f"target: {t['name']} = {t['value']:.3g} (want {t['target']}): {'met' if t['met'] else 'NOT met'}"
              f"{floor}")
    for label, prof in profiles.items():
        for mode, ops in prof.items():
            print(f"\nprofile {label} {mode} (self ms per call):")
            print(format_table(ops, [("op", "op"), ("self_ms", "self ms"), ("calls", "calls"), ("share", "share")]))
    for note in notes:
        print(f"note: {note}")
    for s in skipped:
        print(f"skipped {s['label']}: {s['reason']}")
    for w in warnings:
        print(f"warning: {w}")
    print(f"wrote {json_path}" + ("" if args.no_plot else f" and {args.out / (NAME + '.png')}"))
    return 0
