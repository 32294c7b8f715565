"""Inference benchmark (the paper's Fig. 1): decode-step latency and bytes of parameters read vs batch size for Dense,
MoE, UltraMem, Memory+ and UltraMemV2 models of equal activated compute, the sparse ones of equal total parameters.

  ultramem bench inference [--batch-sizes 1,4,16,64,256,1024] [--kv-len 2048] [--kv-budget-gb 0.125]
                           [--sparsity 100] [--size default|tiny] [--format table|json] [--out DIR] [--threads 2]
                           [--repeats 5] [--warmup 2] [--clock wall|cpu]

One decode step = the model on one new token per sequence (sequence length 1) with a KV cache holding kv_len
positions, in eval mode under torch.no_grad, fp32. The models share one backbone (d_model, layers, heads, so
identical attention and KV cache) and differ in the FFN:
  dense     the MLP widened so that its activated non-embedding parameters equal UltraMem's
  ultramem  the dense backbone (FFN 4d) plus UltraMem memory layers in the paper's skip-layer layout (E=4, r=2,
            h=2, raw scores), value tables sized to `sparsity` x the activated parameters
  moe       top-2 MoE in every block: expert width solved so activated parameters equal UltraMem's, expert count so
            total parameters equal UltraMem's (the paper's rule for its MoE/UltraMem pairs)
  memory_plus  Meta's Memory+ (the layer REPLACES the FFN of as many blocks as UltraMem has memory layers, spread
            evenly: '1,3' of 4): one shared table of UltraMem's value width, 4 heads (Meta's), half-key width =
            UltraMem's key width, q/k norm, SiLU gate; top_m solved for UltraMem's activated parameters and num_keys
            for its total (the rule of the memory_plus-tK presets, ultramem/presets.py)
  ultramem_v2  UltraMemV2 in every block beside the FFN: values + pre-values of UltraMem's value width (D_p:D_v =
            1:3), UltraMem's key width, heads and top_m, share_ratio 0.5, paper init; the FFN width solved for
            UltraMem's activated parameters and num_keys for its total (the ultramem_v2-tK presets' rule)
All counts come from ultramem.accounting (the same code the presets and the trainer use); each model's activated
and total parameters over UltraMem's are in the JSON (`models.<family>.match`), with a warning past 3%.

Why these sizes. Decoding reads every parameter a step touches once per step, whatever the batch, and computes
2 x activated parameters per token, so a model is memory-bound while B < B* ~ (total / active) x (FLOP/s per byte/s)
x 2 / bytes_per_param. On the paper's A100 (312 TFLOP/s bf16 over 2 TB/s) its 12x MoE stays memory-bound up to
B* ~ 1900, which is why the MoE's expert reads (nearly all experts from B ~ 64 on) set its latency there. This CPU
does about 10 FLOP per byte of DRAM bandwidth in fp32, 16x fewer, so with the paper's 12x the MoE would turn
compute-bound near B ~ 240 and the comparison would time matrix multiplies rather than memory traffic: the default
--sparsity 100 keeps the A100's regime up to B ~ 1000 (--sparsity 12 runs the literal ratio). The default backbone
(d 128, 4 layers, 2 memory layers '0:1/2:3', 1 head x top-32 of 1024-wide values) gives 2.1M activated and 208M total
parameters: 830 MB per sparse model (four of them: 3.3 GB in all), 26x the 32 MB last-level cache, so the reads come
from DRAM as they would from HBM. Wide values keep the key grid small (n' = 634 keys per side): on a CPU UltraMem's
per-token top-k over the 2 n' keys and the m^2 candidates is a real cost, which a GPU hides.

KV cache. kv_len positions of keys and values per sequence for every layer is B x kv_len x 2 x layers x d x 4
bytes, 1 GiB at B=64 and 16 GiB at B=1024 for the default model: more than a shared 24 GiB machine can hold, and
reads the models share. The cache of one batch is capped at --kv-budget-gb (default 1/8 GiB: kv_len 2048 up
to B=16, 512 at 64, 128 at 256, 32 at 1024); each row reports the kv_len it ran with (kv_len_used) and its KV bytes.

Bytes touched, per row: measured from the step's actual routing (distinct experts per MoE layer, distinct physical
value rows per memory layer, taken in an extra, untimed call at the same position) times their sizes, plus every
dense parameter, the output head and the KV cache; next to it the analytic model ultramem.accounting.decode_bytes
(uniform routing). A table several layers read (Memory+'s shared values, UltraMemV2's global values + pre-values)
is counted once per step: its distinct rows over all those layers (`table_rows_touched`, one entry per table;
`value_rows_touched` stays per layer). `value_bytes` / `analytic_value_bytes` are the table part of each count.
Per batch size and memory family f (ultramem, memory_plus, ultramem_v2), moe_<f>_latency_ratio = MoE median latency
/ f's (moe_ultramem_latency_ratio as before; likewise the bytes ratios); the crossover is the smallest batch size
from which f stays faster. Results: JSON and a log-log plot of latency and bytes vs batch size in
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    add_common_arguments,
    format_table,
    header,
    load_warning,
    setup,
    spying_lookups,
    time_round_robin,
    write_json,
)
from ultramem import build_model
from ultramem.accounting import count_params, decode_bytes, num_memory_layers
from ultramem.config import MemoryConfig, MemoryPlusConfig, ModelConfig, MoEConfig, UltraMemV2Config
from ultramem.families import families, get_family
from ultramem.kernels.grouped import grouped_mm_unsupported_reason
from ultramem.model import KVCache
from ultramem.presets import _solve_memory_plus, _solve_ultramem_v2  # the tiny ladder's matching rules

HELP = ("decode latency and bytes read vs batch size: Dense / MoE / UltraMem / Memory+ / UltraMemV2 (the paper's "
        "Fig. 1), MoE/memory latency ratios")
NAME = "inference"
TARGET_RATIO = 2.0
TARGET_FROM_BATCH = 64
BYTES_PER_PARAM = 4  # fp32 weights
MATCH_TOLERANCE = 0.03  # warn when a model's activated (sparse models: and total) params are further from UltraMem's
MEMORY_PLUS_HEADS = 4  # Meta's
SIZED = ("dense", "moe", "ultramem", "memory_plus", "ultramem_v2")  # the families model_configs builds
FAMILIES = tuple(f.name for f in families() if f.name in SIZED)  # in registry order
# the memory families compared with MoE: sparse, without routed experts
MEMORY_FAMILIES = tuple(f.name for f in families()
                        if f.name in FAMILIES and f.sparse and f.parallel.expert_module is None)
SHORT = {"ultramem": "UM", "memory_plus": "M+", "ultramem_v2": "V2"}  # table headers


@dataclass(frozen=True)
class Size:
    """The shared backbone and the UltraMem memory; the dense FFN and the MoE are solved from them."""

    d_model: int
    n_layers: int
    n_heads: int
    memory_layers: str  # skip-layer spec, see ultramem/memory/placement.py
    value_dim: int
    key_dim: int
    heads: int
    top_m: int
    vocab: int = 256


SIZES = {
    # ~2M activated non-embedding parameters; total = sparsity x that (about 200M at the default 100)
    "default": Size(d_model=128, n_layers=4, n_heads=2, memory_layers="0:1/2:3", value_dim=1024, key_dim=32, heads=1,
                    top_m=32),
    # for tests: builds in milliseconds
    "tiny": Size(d_model=32, n_layers=2, n_heads=2, memory_layers="0:1", value_dim=16, key_dim=8, heads=1, top_m=4),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, warmup=2, repeats=5, clock=True)
    parser.add_argument("--batch-sizes", default="1,4,16,64,256,1024",
                        help="comma-separated decode batch sizes (default 1,4,16,64,256,1024)")
    parser.add_argument("--kv-len", type=int, default=2048, help="KV cache positions per sequence (default 2048)")
    parser.add_argument("--kv-budget-gb", type=float, default=0.125,
                        help="cap on the KV cache of one batch in GiB; kv_len is lowered to fit (default 0.125)")
    parser.add_argument("--sparsity", type=float, default=100.0,
                        help="total / activated non-embedding parameters of MoE and UltraMem (default 100; paper 12)")
    parser.add_argument("--size", choices=sorted(SIZES), default="default", help="model backbone (default default)")


# ---- the three models -------------------------------------------------------------------------------------------


def model_configs(size: Size, sparsity: float, seq_len: int, grouped_mm: str = "auto") -> dict[str, Any]:
    """{family: ModelConfig}: UltraMem at `sparsity`, then MoE, Dense, Memory+ and UltraMemV2 matched to it (see the
    module docstring)."""
    d, L = size.d_model, size.n_layers
    base = ModelConfig(family="dense", vocab_size=size.vocab, seq_len=seq_len, n_layers=L, d_model=d,
                       n_heads=size.n_heads)
    memory = MemoryConfig(layers=size.memory_layers, num_keys=2, key_dim=size.key_dim, value_dim=size.value_dim,
                          heads=size.heads, query_share=size.heads, top_m=size.top_m, score="none", qk_norm=True,
                          value_proj=True, tucker_rank=2, num_cores=2, value_expansion=4, init="paper")

    def ultramem(num_keys: int):  # noqa: ANN202
        return dataclasses.replace(base, family="ultramem", memory=dataclasses.replace(memory, num_keys=num_keys))

    # The dense part of UltraMem grows with num_keys (keys are read by every token): fixed point in a few steps.
    num_keys = max(memory.top_m, 2)
    for _ in range(20):
        pc = count_params(ultramem(num_keys))
        # value rows for total = sparsity x active (non-embedding), given this num_keys' dense part
        rows = (sparsity * pc.active_non_embedding - (pc.non_embedding - pc.sparse)) / (pc.sparse // num_keys**2)
        nxt = max(math.isqrt(int(rows)), math.ceil(memory.top_m / memory.key_expansion), 2)
        if nxt == num_keys:
            break
        num_keys = nxt
    um = ultramem(num_keys)
    target = count_params(um)
    shared = count_params(dataclasses.replace(base, ffn_hidden=1)).non_embedding - L * 2 * d  # all but the FFN
    dense = dataclasses.replace(base, ffn_hidden=max(8, round((target.active_non_embedding - shared) / (2 * d * L))))
    k, experts = 2, 0
    for _ in range(3):  # the router (d x E per layer) is activated too: solve width and count together
        hidden = max(8, 8 * round((target.active_non_embedding - shared - L * d * experts) / (L * k * 2 * d * 8)))
        experts = max(k, round((target.non_embedding - shared) / (L * (2 * d * hidden + d))))
    moe = dataclasses.replace(base, family="moe", moe=MoEConfig(num_experts=experts, top_k=k, expert_hidden=hidden,
                                                                grouped_mm=grouped_mm))
    M = num_memory_layers(um)
    blocks = ",".join(str((2 * j + 1) * L // (2 * M)) for j in range(M))  # M blocks spread evenly: '1,3' of 4
    memory_plus = _solve_memory_plus(base, MemoryPlusConfig(
        layers=blocks, replace_ffn=True, key_dim=2 * size.key_dim, heads=MEMORY_PLUS_HEADS, top_m=size.top_m,
        value_dim=size.value_dim, qk_norm=True, swilu=True), target.active_non_embedding, target.non_embedding)
    v2 = _solve_ultramem_v2(base, UltraMemV2Config(
        key_dim=size.key_dim, value_dim=3 * size.value_dim // 4, pre_value_dim=size.value_dim // 4, heads=size.heads,
        top_m=size.top_m, tucker_rank=2, num_cores=2, query_per_rank=True, share_ratio=0.5, init="paper"),
        target.active_non_embedding, target.non_embedding)
    return {"dense": dense.validate(), "moe": moe.validate(), "ultramem": um.validate(),
            "memory_plus": memory_plus.validate(), "ultramem_v2": v2.validate()}


def parameter_match(configs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{family: {active_vs_ultramem, total_vs_ultramem}}: non-embedding parameter counts over UltraMem's."""
    ref = count_params(configs["ultramem"])
    out = {}
    for f, c in configs.items():
        pc = count_params(c)
        out[f] = {"active_vs_ultramem": pc.active_non_embedding / ref.active_non_embedding,
                  "total_vs_ultramem": pc.non_embedding / ref.non_embedding}
    return out


def match_warnings(match: dict[str, dict[str, float]]) -> list[str]:
    """A line per model whose activated (and, for a sparse family, total) parameters miss UltraMem's by more than
    MATCH_TOLERANCE."""
    out = []
    for f, m in match.items():
        keys = ["active_vs_ultramem"] + (["total_vs_ultramem"] if get_family(f).sparse else [])
        off = {k: m[k] for k in keys if abs(m[k] - 1) > MATCH_TOLERANCE}
        if off:
            out.append(f"{f}: " + ", ".join(f"{k} = {v:.3f}" for k, v in off.items())
                       + f" (more than {MATCH_TOLERANCE:.0%} from UltraMem's)")
    return out


def moe_matmuls(device: torch.device) -> str:
    """'on' where torch._grouped_mm works: one grouped matmul that skips experts without tokens is the faster decode
    path here at every batch size (measured: 2.1 vs 2.7 ms per layer at B=1, 12 vs 15 at B=64), so MoE gets its
    best kernel; 'auto' (per-expert loop at small batches) elsewhere."""
    return "on" if grouped_mm_unsupported_reason(device, torch.float32, (8, 8)) is None else "auto"


def is_sparse(name: str) -> bool:
    """Parameters a token selects from: MoE expert matrices and memory value tables (accounting's `sparse`): those of
    the memory layers (memories.j.values), of a table shared by the blocks (shared.values, UltraMemV2's
    shared.pre_values) or a Memory+ layer's private one (blocks.i.ffn.memory.table.values)."""
    table = name.startswith(("memories.", "shared.")) or ".table." in name
    return name.endswith((".w_in", ".w_out")) or (table and name.endswith((".values", ".pre_values")))


# ---- bytes touched by one step ----------------------------------------------------------------------------------


def block_memories(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The memory layers inside the blocks' FFN slots (Memory+, UltraMemV2: MemoryFFN.memory), in block order."""
    return [m for m in (getattr(block.ffn, "memory", None) for block in model.blocks) if m is not None]


def table_width(table: torch.nn.Module) -> int:
    """Parameters per row of a shared table: all its row-indexed tensors are read at the selected rows (Memory+'s
    values; UltraMemV2's values and pre_values)."""
    return sum(p.shape[1] for p in table.parameters(recurse=False))


@torch.no_grad()
def touched(model: torch.nn.Module, idx: torch.Tensor, cache, kv_len: int) -> dict[str, Any]:  # noqa: ANN001
    """Run one decode step at position kv_len - 1 and count what it read: distinct experts per MoE layer, distinct
    physical value rows per memory layer and per table (a table several layers read counts each row once), and the
    bytes of parameters (dense + head + touched sparse) and KV cache."""
    cfg = model.cfg
    rows_per_layer: list[int] = []
    hooks = []
    for mem in model.memories:
        def record(module, args, out, mem=mem):  # noqa: ANN001, ANN202
            virtual = out[0]  # TDQKR output: virtual slot ids [BT, H*m]
            rows_per_layer.append(int(torch.unique(mem.shuffle[virtual].long() % mem.cfg.num_values).numel()))
        hooks.append(mem.retrieval.register_forward_hook(record))
    inner = block_memories(model)
    selected: dict[int, list[torch.Tensor]] = {}  # id(table) -> the physical rows each of its readers selected
    try:
        # lookup's output: (physical rows [BT, H*m], ...)
        with spying_lookups(inner, lambda mem, out: selected.setdefault(id(mem.table), []).append(out[0])):
            cache.pos = kv_len - 1
            model(idx, cache=cache)
    finally:
        for h in hooks:
            h.remove()
    experts_per_layer = [int((block.ffn.last_load > 0).sum()) for block in model.blocks] if cfg.moe else []
    dense = sum(p.numel() for n, p in model.named_parameters() if not is_sparse(n) and n != "wte.weight")
    params = dense + cfg.vocab_size * cfg.d_model  # the (tied) output head reads the whole embedding table
    if not cfg.tie_embeddings:
        params += int(torch.unique(idx).numel()) * cfg.d_model
    if cfg.moe is not None:
        params += sum(experts_per_layer) * 2 * cfg.d_model * cfg.moe.expert_hidden
    values = 0
    table_rows: list[int] = []
    if cfg.memory is not None:
        values = sum(rows_per_layer) * cfg.memory.value_dim
        table_rows = list(rows_per_layer)  # one table per layer
    tables = {id(mem.table): mem.table for mem in inner}
    for key, rows in selected.items():
        rows_per_layer += [int(torch.unique(r).numel()) for r in rows]
        table_rows.append(int(torch.unique(torch.cat([r.flatten() for r in rows])).numel()))
        values += table_rows[-1] * table_width(tables[key])
    params += values
    kv = 2 * cfg.n_layers * idx.shape[0] * kv_len * cfg.d_model
    return {"param_bytes": params * BYTES_PER_PARAM, "kv_bytes": kv * BYTES_PER_PARAM,
            "bytes_touched": (params + kv) * BYTES_PER_PARAM,
            "experts_touched": experts_per_layer or None, "value_rows_touched": rows_per_layer or None,
            "table_rows_touched": table_rows or None, "value_bytes": values * BYTES_PER_PARAM}


def analytic_values(cfg, batch_size: int) -> tuple[float, float]:  # noqa: ANN001
    """(parameters, rows) of the value tables one decode step reads under ultramem.accounting's uniform routing, all
    tables together: the family's decode_values hook (a shared table once per step), else (UltraMem, PKM) every
    memory layer's expected distinct rows of its own table; (0, 0) without tables."""
    fam = get_family(cfg.family)
    if fam.decode_values is not None:
        read, _ = fam.decode_values(cfg, batch_size)
        width = (cfg.memory_v2.value_dim + cfg.memory_v2.pre_value_dim if cfg.memory_v2 is not None
                 else cfg.memory_plus.value_dim or cfg.d_model)
        return read, read / width
    if cfg.memory is not None:
        rows = num_memory_layers(cfg) * decode_bytes(cfg, batch_size, 1).value_rows_touched
        return rows * cfg.memory.value_dim, rows
    return 0.0, 0.0


# ---- measurement ------------------------------------------------------------------------------------------------


def kv_len_for(batch: int, kv_len: int, d_model: int, n_layers: int, budget_gb: float) -> int:
    """kv_len, lowered so that the batch's cache (keys + values, every layer, fp32) fits in `budget_gb` GiB."""
    per_position = batch * 2 * n_layers * d_model * BYTES_PER_PARAM
    return max(1, min(kv_len, int(budget_gb * 2**30 // per_position)))


def measure(models: dict[str, torch.nn.Module], batch_sizes: list[int], args: argparse.Namespace,
            device: torch.device) -> list[dict[str, Any]]:
    cfg = next(iter(models.values())).cfg
    rows = []
    for B in batch_sizes:
        kv = kv_len_for(B, args.kv_len, cfg.d_model, cfg.n_layers, args.kv_budget_gb)
        rows += measure_batch(models, B, kv, args, device)
    add_ratios(rows)
    return rows


def measure_batch(models: dict[str, torch.nn.Module], B: int, kv: int, args: argparse.Namespace,
                  device: torch.device) -> list[dict[str, Any]]:
    """Time one decode step of every model at batch B, position kv - 1, interleaved; then count what it reads."""
    cfg = next(iter(models.values())).cfg
    shape = (B, cfg.n_heads, kv, cfg.head_dim)
    # One cache for all the models: they share the attention shapes, and a step's latency does not depend on the
    # cached values. Writing the buffers once makes their pages resident before timing.
    k = [torch.randn(shape, device=device) for _ in range(cfg.n_layers)]
    v = [torch.randn(shape, device=device) for _ in range(cfg.n_layers)]
    caches = {f: KVCache(k, v, [{} for _ in m.memories]) for f, m in models.items()}
    idx = torch.randint(0, cfg.vocab_size, (B, 1), generator=torch.Generator().manual_seed(B)).to(device)

    def step(f: str) -> Any:
        caches[f].pos = kv - 1
        with torch.no_grad():
            return models[f](idx, cache=caches[f])

    cases = {f: (lambda f=f: step(f)) for f in models}
    if "ultramem" in models:  # the bounds: UltraMem's step with memory layers that cost nothing, or only their reads
        cases[FLOOR] = lambda: floor_step(models["ultramem"], lambda: step("ultramem"))
        chosen = record_selections(models["ultramem"], lambda: step("ultramem"))
        cases[READS] = lambda: reads_step(models["ultramem"], chosen, lambda: step("ultramem"))
    timings = time_round_robin(cases, device, args.warmup, args.repeats, args.clock)
    rows = []
    for f, model in models.items():
        t = timings[f]
        analytic = decode_bytes(model.cfg, B, kv, bytes_per_param=BYTES_PER_PARAM)
        value_params, table_rows = analytic_values(model.cfg, B)
        rows.append({"batch_size": B, "family": f, "model": model_label(model.cfg), "kv_len_used": kv,
                     "latency_ms": t.median, "latency_ms_iqr": t.iqr, "samples_ms": t.samples_ms,
                     **touched(model, idx, caches[f], kv),
                     "analytic_bytes": analytic.total, "analytic_param_bytes": analytic.params,
                     "analytic_experts_touched": analytic.experts_touched,
                     "analytic_value_rows_touched": analytic.value_rows_touched,
                     "analytic_table_rows_touched": table_rows or None,
                     "analytic_value_bytes": value_params * BYTES_PER_PARAM})
        if f == "ultramem" and FLOOR in timings:
            rows[-1]["floor_latency_ms"] = timings[FLOOR].median
            rows[-1]["reads_latency_ms"] = timings[READS].median
    return rows


FLOOR = "ultramem_floor"


class _FreeMemory(torch.nn.Module):
    """A memory layer that returns zeros: no retrieval, no reads (the bound's stand-in)."""

    def forward(self, h: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        return torch.zeros_like(h), {}


def floor_step(model: torch.nn.Module, step: Callable[[], Any]) -> Any:
    """One decode step of `model` with its memory layers swapped for `_FreeMemory`: everything but the memory
    layers (attention over the KV cache, the FFNs, embeddings, LM head) as the UltraMem model runs it. MoE latency /
    this is the highest MoE/UltraMem ratio any retrieval implementation could reach on this machine."""
    memories = model.memories
    model.memories = torch.nn.ModuleList(_FreeMemory() for _ in memories)
    try:
        return step()
    finally:
        model.memories = memories


READS = "ultramem_reads"


class _ReadsOnly(torch.nn.Module):
    """A memory layer's value path alone, on the selection its real forward made: the same gather-pool of the same
    value rows with the same scores, the same value projection; no query, no key scoring, no top-k."""

    def __init__(self, layer: torch.nn.Module, selection: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        super().__init__()
        self.layer, self.selection = layer, selection

    def forward(self, h: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        rows, groups, scores = self.selection  # [BT, K] physical rows, [BT, K] IVE groups, [BT, K, C] scores
        mem = self.layer
        pooled = mem.gather_pool(mem.values, rows, scores.to(mem.values.dtype), groups, mem.cfg.value_expansion)
        y = mem.value_proj(pooled) if mem.value_proj is not None else pooled  # [BT, d]
        return y.view(h.shape), {}


def record_selections(model: torch.nn.Module, step: Callable[[], Any]) -> list[tuple[torch.Tensor, ...]]:
    """(rows, groups, scores) that each memory layer of `model` selects in one real decode `step`."""
    chosen: list[tuple[torch.Tensor, ...]] = []
    with spying_lookups(list(model.memories), lambda mem, out: chosen.append(out)):
        step()
    return chosen


def reads_step(model: torch.nn.Module, chosen: list[tuple[torch.Tensor, ...]], step: Callable[[], Any]) -> Any:
    """One decode step of `model` whose memory layers only read and project the rows they chose in the real step
    (`record_selections`): the same output, without the retrieval. MoE latency / this is the highest MoE/UltraMem
    ratio any faster scoring and top-k could reach with these value reads on this machine."""
    memories = model.memories
    model.memories = torch.nn.ModuleList(_ReadsOnly(m, c) for m, c in zip(memories, chosen, strict=True))
    try:
        return step()
    finally:
        model.memories = memories


def model_label(cfg) -> str:  # noqa: ANN001
    pc = count_params(cfg)
    return (f"{cfg.family} L{cfg.n_layers} d{cfg.d_model}: {pc.non_embedding / 1e6:.1f}M total, "
            f"{pc.active_non_embedding / 1e6:.2f}M active")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per memory family f: moe_<f>_latency_ratio = MoE latency / f's (and the bytes ratios, measured and analytic)
    on every row of its batch size; for f = ultramem these are the fields moe_ultramem_* of earlier files."""
    by = {(r["batch_size"], r["family"]): r for r in rows}
    for r in rows:
        moe = by.get((r["batch_size"], "moe"))
        for f in MEMORY_FAMILIES:
            mem = by.get((r["batch_size"], f))
            if moe and mem:
                r[f"moe_{f}_latency_ratio"] = moe["latency_ms"] / mem["latency_ms"]
                r[f"moe_{f}_bytes_ratio"] = moe["bytes_touched"] / mem["bytes_touched"]
                r[f"moe_{f}_analytic_bytes_ratio"] = moe["analytic_bytes"] / mem["analytic_bytes"]
        um = by.get((r["batch_size"], "ultramem"))
        if moe and um and "floor_latency_ms" in um:
            r["moe_ultramem_bound_ratio"] = moe["latency_ms"] / um["floor_latency_ms"]
        if moe and um and "reads_latency_ms" in um:
            r["moe_ultramem_reads_bound_ratio"] = moe["latency_ms"] / um["reads_latency_ms"]


def crossover(ratios: dict[int, float]) -> dict[str, int | None]:
    """The smallest batch from which the MoE / memory latency ratio stays >= 1, and >= TARGET_RATIO."""
    batches = sorted(ratios)

    def stays_above(level: float) -> int | None:
        above = None
        for b in reversed(batches):
            if ratios[b] < level:
                break
            above = b
        return above

    return {"crossover_batch": stays_above(1.0), "ratio_2x_from_batch": stays_above(TARGET_RATIO)}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Crossover (smallest batch from which UltraMem stays faster than MoE) and the >= 2x target from batch 64 on;
    `memory_families`: the MoE latency ratios and crossovers of every memory family measured."""
    ratios = {r["batch_size"]: r["moe_ultramem_latency_ratio"] for r in rows if "moe_ultramem_latency_ratio" in r}
    batches = sorted(ratios)
    per_family = {}
    for f in MEMORY_FAMILIES:
        key = f"moe_{f}_latency_ratio"
        fr = {r["batch_size"]: r[key] for r in rows if key in r}
        if fr:
            per_family[f] = {"moe_latency_ratio": fr, **crossover(fr)}
    bound = {r["batch_size"]: r["moe_ultramem_bound_ratio"] for r in rows if "moe_ultramem_bound_ratio" in r}
    reads = {r["batch_size"]: r["moe_ultramem_reads_bound_ratio"] for r in rows
             if "moe_ultramem_reads_bound_ratio" in r}
    judged = [b for b in batches if b >= TARGET_FROM_BATCH]
    return {"moe_ultramem_latency_ratio": ratios, "moe_ultramem_bound_ratio": bound,
            "moe_ultramem_reads_bound_ratio": reads, **crossover(ratios),
            "target": {"name": f"MoE/UltraMem decode latency >= {TARGET_RATIO:g}x for every batch >= "
                               f"{TARGET_FROM_BATCH}", "judged_batches": judged,
                       "met": all(ratios[b] >= TARGET_RATIO for b in judged) if judged else None},
            "memory_families": per_family}


# ---- output -----------------------------------------------------------------------------------------------------


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib  # lazy: only when a plot is written (--no-plot skips it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the file-only backend

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for f in FAMILIES:
        rs = sorted((r for r in rows if r["family"] == f), key=lambda r: r["batch_size"])
        if not rs:
            continue
        bs = [r["batch_size"] for r in rs]
        style = get_family(f).style
        ax_t.plot(bs, [r["latency_ms"] for r in rs], marker=style.marker, color=style.color, label=f)
        ax_b.plot(bs, [r["bytes_touched"] / 2**20 for r in rs], marker=style.marker, color=style.color,
                  label=f"{f} measured")
        ax_b.plot(bs, [r["analytic_bytes"] / 2**20 for r in rs], ls="--", color=style.color, label=f"{f} analytic")
    ratios = {r["batch_size"]: r["moe_ultramem_latency_ratio"] for r in rows if r["family"] == "moe"}
    for b, ratio in ratios.items():
        ax_t.annotate(f"{ratio:.1f}x", (b, next(r["latency_ms"] for r in rows if r["batch_size"] == b
                                                and r["family"] == "moe")), textcoords="offset points",
                      xytext=(0, 6), ha="center", fontsize=7)
    for ax, ylabel in ((ax_t, "decode step latency, ms (median)"), (ax_b, "bytes read per step, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax_t.set_title("latency (labels: MoE / UltraMem)", fontsize=9)
    ax_b.set_title("parameters + KV cache read (solid: measured routing; dashed: accounting)", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COLUMNS = [("batch_size", "batch"), ("family", "family"), ("kv_len_used", "kv_len"), ("latency_ms", "ms"),
           ("latency_ms_iqr", "(iqr)"), ("bytes_touched", "bytes"), ("analytic_bytes", "analytic bytes"),
           ("moe_ultramem_latency_ratio", "MoE/UM latency"), ("moe_ultramem_bytes_ratio", "MoE/UM bytes")]
COLUMNS += [(f"moe_{f}_latency_ratio", f"MoE/{SHORT.get(f, f)} latency") for f in MEMORY_FAMILIES if f != "ultramem"]


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"error: --batch-sizes must be integers >= 1, got {text!r}")
    return sorted(set(sizes))


def run(args: argparse.Namespace) -> int:
    device = setup(args)
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    if args.kv_len < 1 or args.kv_budget_gb <= 0 or args.sparsity < 1:
        raise SystemExit("error: --kv-len must be >= 1, --kv-budget-gb > 0 and --sparsity >= 1 "
                         f"(got {args.kv_len}, {args.kv_budget_gb}, {args.sparsity})")

    configs = model_configs(SIZES[args.size], args.sparsity, seq_len=args.kv_len, grouped_mm=moe_matmuls(device))
    models = {}
    for f in FAMILIES:
        torch.manual_seed(0)
        models[f] = build_model(configs[f], device=device).eval()
    busy = [load_warning(torch.get_num_threads())]
    rows = measure(models, batch_sizes, args, device)
    busy.append(load_warning(0))
    result = summary(rows)
    settings = {"batch_sizes": batch_sizes, "kv_len": args.kv_len, "kv_budget_gb": args.kv_budget_gb,
                "sparsity": args.sparsity, "size": args.size, "dtype": "float32", "warmup": args.warmup,
                "repeats": args.repeats, "clock": args.clock,
                "timing": f"{args.clock} clock, median and IQR of interleaved repeats of one decode step"}
    match = parameter_match(configs)
    models_info = {f: {"config": c.to_dict(), "params": count_params(c).to_dict(), "label": model_label(c),
                       "match": match[f]} for f, c in configs.items()}
    payload = {**header(NAME, device, settings), "models": models_info, "rows": rows, **result,
               "warnings": [w for w in busy if w][:1] + match_warnings(match)}
    json_path = write_json(payload, args.out / f"{NAME}.json")
    if not args.no_plot:
        plot(rows, args.out / f"{NAME}.png", f"decode step, kv_len {args.kv_len} (capped at {args.kv_budget_gb:g} "
             f"GiB), {device}, {torch.get_num_threads()} threads, sparsity {args.sparsity:g}x")
    if args.format == "json":
        print(json_path.read_text(), end="")
        return 0
    for f, info in models_info.items():
        m = info["match"]
        print(f"{f:11s} {info['label']} (active / total vs UltraMem: {m['active_vs_ultramem']:.3f} / "
              f"{m['total_vs_ultramem']:.3f})")
    print(format_table(rows, COLUMNS))
    t = result["target"]
    for f, fs in result["memory_families"].items():
        print(f"crossover ({get_family(f).title} faster than MoE from batch): {fs['crossover_batch']}; "
              f">= {TARGET_RATIO:g}x from batch: {fs['ratio_2x_from_batch']}")
    print(f"target: {t['name']}: {({True: 'met', False: 'NOT met', None: 'no batch size judged'})[t['met']]}")
    print("MoE/UltraMem latency (bounds: MoE / UltraMem with memory layers that only read and project their rows; "
          "MoE / UltraMem with free memory layers): " + ", ".join(
              f"{r:.2f}x ({result['moe_ultramem_reads_bound_ratio'].get(b, float('nan')):.2f}x, "
              f"{result['moe_ultramem_bound_ratio'].get(b, float('nan')):.2f}x) @{b}"
              for b, r in result["moe_ultramem_latency_ratio"].items()))
    for w in payload["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {json_path}" + ("" if args.no_plot else f" and {args.out / (NAME + '.png')}"))
    return 0
