"""Named model presets: the paper's sizes (Table 1) and a tiny ladder for CPU scaling studies. Pure Python.

`get_preset(name, overrides)` returns a fresh, validated `ModelConfig`; overrides are applied field by field
(nested dicts or dotted keys, e.g. {"memory.top_m": 8}). `ultramem models` lists every preset with its counts;
`table1_comparison()` sets the paper-size presets against the paper's Table 1. A new family's presets go here.

Paper sizes (Huang et al. 2025, Table 1; the v1 Table 6 shapes were not recovered, see the digest §3 and §9)
--------------------------------------------------------------------------------------------------------------
  dense-*    GPT-3-style shapes whose 12 L d^2 reproduces Table 1 exactly: 151M = 12 x 1024, 680M = 24 x 1536,
             1.6B = 32 x 2048, 6.5B = 32 x 4096 (FFN 4d, head_dim 64 or 128), vocab 50304 (OLMo tokenizer,
             padded; the v1 tokenizer is unknown and does not enter Table 1, which counts non-embedding params).
  moe-*-2inN top-2 of N experts in every block, each a 2-matrix GELU MLP whose inner width is solved from the
             Table 1 total, rounded to a multiple of 8 for grouped GEMM (2528 = 2.47 d, 3584 = 2.33 d,
             4672 = 2.28 d); activated FLOPs then match too.
  ultramem-*-x12  the v1 recipe: skip-layer layout (memory j reads block a, adds after block a+3 or a+4; 3, 6, 6
             memory layers, 1.6B's layout is the digest's '3:7/.../28:32' read as 1-indexed), E = 4, r = 2, h = 2,
             H = 2 heads sharing one query, raw scores, q/k RMSNorm, half value dim (d/2) + projection, paper init.
             key_dim 256, 256, 512; top_m 32, 32, 42 per head (42 x 2 is the digest's example for d = 2048);
             num_keys solved so total params match Table 1 (1100, 1333, 1789 -> N = num_keys^2 rows per layer).
  pkm-*-x12  the Table 2 baseline: one big PKM layer in parallel with the middle block's FFN, 4 heads with their
             own queries, key_dim 256, top-32, softmax, full value dim, no q/k norm, XLM init, no value LR boost,
             num_keys solved so that total params equal the UltraMem preset's (Table 1 has no PKM row).

Tiny ladder (CPU): six sizes t1..t6 from 0.1M to 4.7M non-embedding params, byte vocabulary (256), context 256
------------------------------------------------------------------------------------------------------------------
  dense-tK          d_model 64..256, 2..6 layers, head_dim 32, FFN 4d.
  ultramem-tK-x6    the same backbone plus UltraMem memory (shapes as the paper presets, key_dim d/8 (>= 8),
                    top_m 16, one memory layer up to 4 blocks, two from 5 blocks) with num_keys solved so that
                    total non-embedding params are 6x the dense model's. key_dim d/8 rather than the paper
                    presets' d/4 because keys are dense parameters read by every token and, at this scale, would
                    otherwise add 40% to the activated FLOPs.
  moe-tK-2inN       the same backbone with top-2 MoE in every block; the expert width is solved so activated
                    params equal the UltraMem model's, then N so that total params equal it too (the paper's
                    rule: MoE and UltraMem of one size have the same activated FLOPs and total parameters).
  pkm-tK-x6         the PKM baseline on the same backbone, total params equal to the UltraMem model's.
The memory and MoE models carry the memory's dense overhead (keys, query and value projections), so their
activated params are 13-26% above the dense model of the same size (the most at t1), as in Table 1 where
MoE/UltraMem-151M run 0.35 GFLOPs/token against the dense model's 0.30.
Short names dense-tiny, moe-tiny, pkm-tiny, ultramem-tiny are the t2 models (< 2.5M params), for tests and docs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ultramem.accounting import count_params
from ultramem.config import ConfigError, MemoryConfig, ModelConfig, MoEConfig

PAPER_VOCAB = 50304
TINY_VOCAB = 256
TINY_SEQ_LEN = 256
TINY_MULTIPLE = 6  # UltraMem/MoE/PKM total params = this x dense (non-embedding) on the tiny ladder


# ---- building blocks --------------------------------------------------------------------------------------------


def _dense(n_layers: int, d_model: int, n_heads: int, vocab: int, seq_len: int) -> ModelConfig:
    return ModelConfig(family="dense", vocab_size=vocab, seq_len=seq_len, n_layers=n_layers, d_model=d_model,
                       n_heads=n_heads)


def _ultramem_memory(d_model: int, layers: str, num_keys: int, key_dim: int, top_m: int) -> MemoryConfig:
    return MemoryConfig(layers=layers, num_keys=num_keys, key_dim=key_dim, value_dim=d_model // 2, heads=2,
                        query_share=2, top_m=top_m, score="none", qk_norm=True, value_proj=True, tucker_rank=2,
                        num_cores=2, value_expansion=4, init="paper")


def _pkm_memory(d_model: int, n_layers: int, num_keys: int, key_dim: int, heads: int, top_m: int) -> MemoryConfig:
    middle = n_layers // 2
    return MemoryConfig(layers=f"{middle}:{middle}", num_keys=num_keys, key_dim=key_dim, value_dim=d_model,
                        heads=heads, query_share=1, top_m=top_m, score="softmax", qk_norm=False, value_proj=False,
                        tucker_rank=1, num_cores=1, value_expansion=1, init="xlm", value_lr_mult=1.0)


def _with(base: ModelConfig, **fields: Any) -> ModelConfig:
    return dataclasses.replace(base, **fields)


def _solve_num_keys(base: ModelConfig, memory: MemoryConfig, family: str, target_total: float) -> ModelConfig:
    """Smallest num_keys whose model has >= target_total non-embedding params (totals grow with num_keys)."""
    def build(n: int) -> ModelConfig:
        return _with(base, family=family, memory=dataclasses.replace(memory, num_keys=n))

    lo, hi = 2, 1 << 16
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count_params(build(mid)).non_embedding >= target_total else (mid + 1, hi)
    return build(lo)


def _matched_moe(base: ModelConfig, like: ModelConfig, top_k: int = 2) -> ModelConfig:
    """MoE on `base` with the activated and total non-embedding params of `like` (expert width, then count)."""
    d, L = base.d_model, base.n_layers
    target = count_params(like)
    shared = count_params(_with(base, ffn_hidden=1)).non_embedding - L * 2 * d  # everything but the FFN
    # A multiple of 8 keeps every expert row 16-byte aligned, which torch._grouped_mm requires.
    hidden = 8 * round((target.active_non_embedding - shared) / (L * top_k * 2 * d * 8))
    experts = round((target.non_embedding - shared) / (L * (2 * d * hidden + d)))
    return _with(base, family="moe", moe=MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=hidden))


# ---- the paper's sizes ------------------------------------------------------------------------------------------

# name: (n_layers, d_model, n_heads, moe experts, moe expert width, memory layout, key_dim, top_m, num_keys)
_PAPER = {
    "151m": (12, 1024, 16, 32, 2528, "1:4/5:8/9:11", 256, 32, 1100),
    "680m": (24, 1536, 24, 33, 3584, "1:4/5:8/9:12/13:16/17:20/21:23", 256, 32, 1333),
    "1.6b": (32, 2048, 16, 34, 4672, "2:6/7:11/12:16/17:21/22:26/27:31", 512, 42, 1789),
}


def _paper_presets() -> dict[str, ModelConfig]:
    out = {}
    for size, (L, d, nh, E, h_e, layout, Dk, m, knum) in _PAPER.items():
        dense = _dense(L, d, nh, PAPER_VOCAB, 2048)
        ultramem = _with(dense, family="ultramem", memory=_ultramem_memory(d, layout, knum, Dk, m))
        pkm = _solve_num_keys(dense, _pkm_memory(d, L, 2, 256, 4, 32), "pkm", count_params(ultramem).non_embedding)
        out[f"dense-{size}"] = dense
        out[f"moe-{size}-2in{E}"] = _with(dense, family="moe", moe=MoEConfig(num_experts=E, top_k=2,
                                                                             expert_hidden=h_e))
        out[f"ultramem-{size}-x12"] = ultramem
        out[f"pkm-{size}-x12"] = pkm
    out["dense-6.5b"] = _dense(32, 4096, 32, PAPER_VOCAB, 2048)
    return out


# ---- the tiny CPU ladder ----------------------------------------------------------------------------------------

# name: (d_model, n_layers, n_heads, memory layout)
_TINY = {
    "t1": (64, 2, 2, "0:1"),
    "t2": (96, 3, 3, "0:2"),
    "t3": (128, 4, 4, "1:3"),
    "t4": (160, 5, 5, "1:3/3:4"),
    "t5": (192, 6, 6, "1:3/3:5"),
    "t6": (256, 6, 8, "1:3/3:5"),
}


def _tiny_presets() -> dict[str, ModelConfig]:
    out = {}
    for size, (d, L, nh, layout) in _TINY.items():
        dense = _dense(L, d, nh, TINY_VOCAB, TINY_SEQ_LEN)
        target = TINY_MULTIPLE * count_params(dense).non_embedding
        ultramem = _solve_num_keys(dense, _ultramem_memory(d, layout, 2, max(8, d // 8), 16), "ultramem", target)
        total = count_params(ultramem).non_embedding
        moe = _matched_moe(dense, ultramem)
        pkm = _solve_num_keys(dense, _pkm_memory(d, L, 2, d // 4, 2, 16), "pkm", total)
        out[f"dense-{size}"] = dense
        out[f"moe-{size}-2in{moe.moe.num_experts}"] = moe
        out[f"ultramem-{size}-x{TINY_MULTIPLE}"] = ultramem
        out[f"pkm-{size}-x{TINY_MULTIPLE}"] = pkm
    return out


def _aliases(presets: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
    tiny = {}
    for name, cfg in presets.items():
        family, size = name.split("-")[:2]
        if size == "t2":
            tiny[f"{family}-tiny"] = cfg
    return tiny


def _all_presets() -> dict[str, ModelConfig]:
    presets = {**_paper_presets(), **_tiny_presets()}
    presets.update(_aliases(presets))
    for name, cfg in presets.items():
        try:
            cfg.validate()
        except ConfigError as err:  # a broken preset is a bug in this file, say which
            raise ConfigError(f"preset {name!r}: {err}") from err
    return presets


PRESETS: dict[str, ModelConfig] = _all_presets()


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A fresh copy of preset `name` with `overrides` applied field by field (validated)."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {', '.join(PRESETS)} "
                          f"(`ultramem models` lists them)")
    return PRESETS[name].override(overrides or {})


# ---- the paper's Table 1 ----------------------------------------------------------------------------------------

# Huang et al. 2025, Table 1 (verbatim via the digest's [REV] source): total parameters (B) and GFLOPs per token.
PAPER_TABLE1: dict[str, tuple[float, float]] = {
    "dense-151m": (0.15, 0.30),
    "moe-151m-2in32": (2.04, 0.35),
    "ultramem-151m-x12": (2.03, 0.35),
    "dense-680m": (0.68, 1.36),
    "moe-680m-2in33": (8.95, 1.50),
    "ultramem-680m-x12": (8.93, 1.49),
    "dense-1.6b": (1.61, 3.21),
    "moe-1.6b-2in34": (21.36, 3.52),
    "ultramem-1.6b-x12": (21.41, 3.50),
    "dense-6.5b": (6.44, 12.88),
}


def table1_comparison(tolerance: float = 0.03) -> list[dict]:
    """Our paper-size presets against Table 1: non-embedding params and 2 x active non-embedding FLOPs."""
    rows = []
    for name, (paper_b, paper_gflops) in PAPER_TABLE1.items():
        pc = count_params(get_preset(name))
        ours_b, ours_gflops = pc.non_embedding / 1e9, 2 * pc.active_non_embedding / 1e9
        err_b, err_f = ours_b / paper_b - 1, ours_gflops / paper_gflops - 1
        rows.append({"preset": name, "params_b": round(ours_b, 3), "paper_params_b": paper_b,
                     "params_rel_err": round(err_b, 4), "gflops": round(ours_gflops, 3),
                     "paper_gflops": paper_gflops, "gflops_rel_err": round(err_f, 4),
                     "within_tolerance": abs(err_b) <= tolerance and abs(err_f) <= tolerance})
    return rows
