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
  memory_plus-tK-x6 Meta's Memory+ (the memory layer REPLACES the FFN of its blocks) on the same backbone: one memory
                    layer in the middle block up to 4 blocks, two from 5 blocks ("1,3" of 5, "1,4" of 6), value
                    dim d (Meta's v_dim = D), key dim d/2 (Meta's "sum of the sub-key dims = D/2"), q/k norm (the
                    paper's advice for small models), swilu, one shared table. 8 heads (Meta: 4), top_m then
                    solved so activated params equal the MoE/UltraMem mean (a replaced FFN leaves those params to
                    the memory: at 4 heads top_m would exceed num_keys), num_keys so total params equal their mean.
                    Value table: constant value LR 1e-3 and one joint gradient clip, the rules their committed runs
                    trained with (Meta's are value_lr_schedule: scheduled, value_clip: separate).
  ultramem_v2-tK-x6 UltraMemV2 in every block beside the FFN, the 227M run's recipe scaled to d: 1 head x top-32, key
                    / value / pre-value dim d/4, per-rank queries, ring windows share_ratio 0.5, paper init, value
                    LR 4x -> 1x. As the authors shrink the FFN for iso-compute (4992 vs 5504 at 227M), the FFN
                    width is solved so activated params equal the MoE/UltraMem mean (3.4-4 d), num_keys so total
                    params equal their mean.
Short names dense-tiny, moe-tiny, pkm-tiny, ultramem-tiny, memory_plus-tiny, ultramem_v2-tiny are the t2 models.

The authors' 227M comparison (digest §4: the official repository's scripts, V2 paper Table 10)
------------------------------------------------------------------------------------------------
One backbone, 20 layers, d 768, 12 heads, vocab 50304, context 4096, init_std sqrt(2 / (5 d)) (full_megatron).
The scripts' FFNs are SwiGLU with OLMo's mlp_hidden_size (5504 -> inner 2752); ours is a 2-matrix GELU MLP of the
same parameters, inner 1.5 x 2752 = 4128 (6016 -> 4512 for Memory+, 4992 -> 3744 for UltraMemV2).
  ultramem-227m-official  run_ultramem_v1.sh: layers 2:5/6:9/10:13/14:17, 808 keys, key dim 192, value dim 384,
                          2 heads sharing one query x top-80, E = 4 (1616 keys per side), r = 2, 2 cores, official
                          init, value LR 4x -> 1x over training.
  memory_plus-227m        run_memory_plus.sh, ByteDance's port (beside the FFN: replace_ffn false, what the 227M
                          comparison ran): blocks 4,8,12,16, 1138 keys, half-key dim 384 (key_dim 768), value dim
                          768 = d, 2 heads x top-80, one shared table at the constant value LR 1e-3 (no warmup
                          or decay) and clipped with the rest of the model, the port's rules (OLMo's trainer).
  ultramem_v2-227m        README / run.sh: a layer in every block beside the FFN, 360 keys per layer slice (global
                          table 360^2 x 20 rows, share_ratio 0.5 -> 1138 keys per side), key dim 192, 1 head x top-32,
                          value and pre-value dim 192, value LR 4x -> 1x, per-rank queries (the paper's; the script's
                          flag is off, which the digest §2.7 finds to be a shape error), the released code's init.
  moe-227m-64e-top8       run_moe.sh's 64 experts, top-8 (lb 0.01, z 0.001, OLMoE's un-renormalised gates); the
                          expert width is not in the digest
                          and is inferred: the multiple of 8 giving ultramem-227m-official's total parameters.
`preset_source(name)` says which presets are the authors' configurations and which are inferred or ours.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ultramem.accounting import count_params
from ultramem.config import (
    ConfigError,
    MemoryConfig,
    MemoryPlusConfig,
    ModelConfig,
    MoEConfig,
    UltraMemV2Config,
)

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
    return _ladder_presets(_TINY, pkm=True)


# The study ladder (docs/results/study_isoflop): finer than _TINY so an IsoFLOP budget holds >= 5 sizes. Active
# parameters grow ~1.3-1.8x per rung (the tiny ladder's ~3x steps leave <= 3 sizes per budget) from 10k to 360k, the
# range 4 epochs of tinyshakespeare (4.2M tokens) can train near 3-100 tokens/param; heads of 12-16 dims.
# name: (d_model, n_layers, n_heads, memory layout); only dense, MoE and UltraMem (the study's three families).
_STUDY = {
    "s1": (16, 2, 1, "0:1"),
    "s2": (24, 2, 2, "0:1"),
    "s3": (32, 2, 2, "0:1"),
    "s4": (32, 3, 2, "0:2"),
    "s5": (48, 2, 3, "0:1"),
    "s6": (48, 3, 3, "0:2"),
    "s7": (56, 3, 4, "0:2"),
    "s8": (64, 3, 4, "0:2"),
    "s9": (80, 3, 5, "0:2"),
    "s10": (96, 3, 6, "0:2"),
}


# The one-shape ladder (issue 26 item 4): one shape rule from ~10k to >1M activated params, so that neighbouring
# rungs differ in width only (the study ladder alternates 2 and 3 layers, and its 3-layer s4 sits above both of its
# 2-layer neighbours). Rule: ONE_SHAPE_LAYERS blocks, ONE_SHAPE_HEADS heads, d_model stepping ~1.15-1.33x
# (params ~1.3-1.6x per rung), UltraMem's memory spanning blocks 1:3 (a two-block skip on every rung), MoE and
# UltraMem matched to dense as on the study ladder (_ladder_presets). Names oK: dense-o1 ... ultramem-o15-x6, and
# dense-oK-wide (dense with MoE's activated FFN width: the wide-FFN control).
ONE_SHAPE_LAYERS = 4
ONE_SHAPE_HEADS = 2
ONE_SHAPE_LAYOUT = "1:3"
# o0 (d_model 8, added for study v3: MoE and UltraMem need a rung below o1's ~19k activated params to bracket the
# smallest budget's optimum; 10 would leave an odd head_dim) is numbered so that o1-o15 keep their names; its step
# to o1 is 1.5x in width (1.6x in MoE's and UltraMem's activated params, 1.9x in dense's).
ONE_SHAPE_WIDTHS = (8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160)
_ONE_SHAPE = {f"o{i}": (d, ONE_SHAPE_LAYERS, ONE_SHAPE_HEADS, ONE_SHAPE_LAYOUT)
              for i, d in enumerate(ONE_SHAPE_WIDTHS)}


def _ladder_presets(ladder: dict[str, tuple[int, int, int, str]], pkm: bool,
                    wide: bool = False) -> dict[str, ModelConfig]:
    """dense, MoE-2inE and UltraMem-x6 (and PKM-x6 if `pkm`) at every size of `ladder`: UltraMem's num_keys gives
    TINY_MULTIPLE x dense's non-embedding params, MoE matches UltraMem's activated and total params. With `wide`,
    also dense-<size>-wide: dense with MoE's activated FFN width (top_k x expert width), the control that tells
    expert sparsity from a wider FFN (issue 26 item 3; it matches MoE in activated params, not in total)."""
    out = {}
    for size, (d, L, nh, layout) in ladder.items():
        dense = _dense(L, d, nh, TINY_VOCAB, TINY_SEQ_LEN)
        target = TINY_MULTIPLE * count_params(dense).non_embedding
        ultramem = _solve_num_keys(dense, _ultramem_memory(d, layout, 2, max(8, d // 8), 16), "ultramem", target)
        moe = _matched_moe(dense, ultramem)
        out[f"dense-{size}"] = dense
        out[f"moe-{size}-2in{moe.moe.num_experts}"] = moe
        out[f"ultramem-{size}-x{TINY_MULTIPLE}"] = ultramem
        if wide:
            out[f"dense-{size}-wide"] = _with(dense, ffn_hidden=moe.moe.top_k * moe.moe.expert_hidden)
        if pkm:
            total = count_params(ultramem).non_embedding
            out[f"pkm-{size}-x{TINY_MULTIPLE}"] = _solve_num_keys(
                dense, _pkm_memory(d, L, 2, d // 4, 2, 16), "pkm", total)
    return out


def _aliases(presets: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
    tiny = {}
    for name, cfg in presets.items():
        family, size = name.split("-")[:2]
        if size == "t2":
            tiny[f"{family}-tiny"] = cfg
    return tiny


# ---- the tiny ladder of the families added later (after the four above, so their order stays) -----------------

# n_layers -> the blocks whose FFN a Memory+ layer replaces on the tiny ladder
_MEMORY_PLUS_TINY_LAYERS = {2: "1", 3: "1", 4: "2", 5: "1,3", 6: "1,4"}
MEMORY_PLUS_TINY_HEADS = 8


def _solve_memory_plus(base: ModelConfig, memory: MemoryPlusConfig, active: float, total: float) -> ModelConfig:
    """Memory+ on `base` with the given activated and total non-embedding params: top_m (activated params are
    linear in it) and num_keys (the nearest integer for the total), alternated until they settle."""
    def build(n: int, m: int) -> ModelConfig:
        return _with(base, family="memory_plus", memory_plus=dataclasses.replace(memory, num_keys=n, top_m=m))

    n, m = 2, memory.top_m
    for _ in range(8):
        lo, hi = 2, 1 << 16
        while lo < hi:  # smallest n reaching the total, then the nearer of n - 1 and n
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if count_params(build(mid, m)).non_embedding >= total else (mid + 1, hi)
        n = min((lo - 1, lo), key=lambda k: abs(count_params(build(max(k, 2), m)).non_embedding - total))
        a1, a2 = (count_params(build(n, k)).active_non_embedding for k in (1, 2))
        m = min(n, max(1, round(1 + (active - a1) / (a2 - a1))))
    return build(n, m)


def _tiny_memory_plus_presets(tiny: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
    out = {}
    for size, (d, L, nh, _) in _TINY.items():
        moe = next(cfg for name, cfg in tiny.items() if name.startswith(f"moe-{size}-"))
        um = count_params(tiny[f"ultramem-{size}-x{TINY_MULTIPLE}"])
        mo = count_params(moe)
        # the value table's rules as the committed runs of these presets trained (a constant value LR, one joint
        # clip), so that their run ids keep meaning what they ran; Meta's own rules are value_lr_schedule:
        # scheduled, value_clip: separate (docs/families.md "Memory+")
        memory = MemoryPlusConfig(layers=_MEMORY_PLUS_TINY_LAYERS[L], replace_ffn=True, key_dim=d // 2,
                                  heads=MEMORY_PLUS_TINY_HEADS, top_m=32, value_dim=0, qk_norm=True, swilu=True,
                                  value_lr_schedule="constant", value_clip="joint")
        out[f"memory_plus-{size}-x{TINY_MULTIPLE}"] = _solve_memory_plus(
            _dense(L, d, nh, TINY_VOCAB, TINY_SEQ_LEN), memory,
            active=(um.active_non_embedding + mo.active_non_embedding) / 2,
            total=(um.non_embedding + mo.non_embedding) / 2)
    return out


def _solve_ultramem_v2(base: ModelConfig, memory: UltraMemV2Config, active: float, total: float) -> ModelConfig:
    """UltraMemV2 on `base` with the given activated and total non-embedding params: the FFN width (a multiple of
    8; activated params are linear in it) and num_keys (the nearest integer for the total), alternated."""
    def build(n: int, f: int) -> ModelConfig:
        return _with(base, family="ultramem_v2", ffn_hidden=f, memory_v2=dataclasses.replace(memory, num_keys=n))

    n, f = 2, base.ffn_inner
    for _ in range(8):
        lo, hi = 2, 1 << 16
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if count_params(build(mid, f)).non_embedding >= total else (mid + 1, hi)
        n = min((lo - 1, lo), key=lambda k: abs(count_params(build(max(k, 2), f)).non_embedding - total))
        a1, a2 = (count_params(build(n, w)).active_non_embedding for w in (8, 16))
        f = max(8, 8 * round(1 + (active - a1) / (a2 - a1)))
    return build(n, f)


def _tiny_ultramem_v2_presets(tiny: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
    out = {}
    for size, (d, L, nh, _) in _TINY.items():
        moe = next(cfg for name, cfg in tiny.items() if name.startswith(f"moe-{size}-"))
        um, mo = count_params(tiny[f"ultramem-{size}-x{TINY_MULTIPLE}"]), count_params(moe)
        memory = UltraMemV2Config(key_dim=d // 4, value_dim=d // 4, pre_value_dim=d // 4, heads=1, top_m=32,
                                  tucker_rank=2, num_cores=2, query_per_rank=True, share_ratio=0.5,
                                  value_lr_mult=4.0, value_lr_decay=1.0, init="paper")
        out[f"ultramem_v2-{size}-x{TINY_MULTIPLE}"] = _solve_ultramem_v2(
            _dense(L, d, nh, TINY_VOCAB, TINY_SEQ_LEN), memory,
            active=(um.active_non_embedding + mo.active_non_embedding) / 2,
            total=(um.non_embedding + mo.non_embedding) / 2)
    return out


# ---- the authors' 227M configurations (digest §4) -------------------------------------------------------------

OFFICIAL_INIT_STD = 0.02282177322938192  # sqrt(2 / (5 * 768)), the scripts' init_std (full_megatron)


def swiglu_equivalent(mlp_hidden_size: int) -> int:
    """OLMo's mlp_hidden_size h is a SwiGLU of inner h/2 (3 matrices of d x h/2); the 2-matrix MLP of the same
    parameters has inner 1.5 x h/2."""
    return 3 * mlp_hidden_size // 4


def _official_227m_presets() -> dict[str, ModelConfig]:
    base = _with(_dense(20, 768, 12, PAPER_VOCAB, 4096), init_std=OFFICIAL_INIT_STD)
    ultramem = _with(base, family="ultramem", ffn_hidden=swiglu_equivalent(5504), memory=MemoryConfig(
        layers="2:5/6:9/10:13/14:17", num_keys=808, key_dim=192, value_dim=384, heads=2, query_share=2, top_m=80,
        score="none", qk_norm=True, value_proj=True, tucker_rank=2, num_cores=2, value_expansion=4, init="official",
        value_lr_mult=4.0, value_lr_decay=1.0))
    memory_plus = _with(base, family="memory_plus", ffn_hidden=swiglu_equivalent(6016), memory_plus=MemoryPlusConfig(
        layers="4,8,12,16", replace_ffn=False, num_keys=1138, key_dim=2 * 384, heads=2, top_m=80, value_dim=0,
        qk_norm=True, swilu=True, value_lr=1e-3, value_lr_schedule="constant", value_clip="joint",  # the port's rules
        shared_values=True))
    ultramem_v2 = _with(base, family="ultramem_v2", ffn_hidden=swiglu_equivalent(4992), memory_v2=UltraMemV2Config(
        num_keys=360, key_dim=192, value_dim=192, pre_value_dim=192, heads=1, top_m=32, tucker_rank=2, num_cores=2,
        query_per_rank=True, share_ratio=0.5, value_lr_mult=4.0, value_lr_decay=1.0, init="official"))
    # 64 experts top-8 (run_moe.sh); the width giving ultramem's total (a multiple of 8, for grouped GEMM)
    E, k, d, L = 64, 8, base.d_model, base.n_layers
    shared = count_params(_with(base, ffn_hidden=1)).non_embedding - L * 2 * d  # everything but the FFN
    hidden = 8 * round((count_params(ultramem).non_embedding - shared - L * d * E) / (L * E * 2 * d * 8))
    moe = _with(base, family="moe", moe=MoEConfig(num_experts=E, top_k=k, expert_hidden=hidden,
                                                  normalize_gates=False))  # OLMoE's gates are not renormalised
    return {"ultramem-227m-official": ultramem, "memory_plus-227m": memory_plus, "ultramem_v2-227m": ultramem_v2,
            "moe-227m-64e-top8": moe}


# ---- where each preset comes from --------------------------------------------------------------------------------

SOURCE_AUTHORS = "authors"
SOURCE_TABLE1 = "inferred (Table 1 totals)"
SOURCE_227M = "inferred (227M totals)"
SOURCE_TINY = "ours (tiny ladder)"
SOURCE_STUDY = "ours (study ladder)"
SOURCE_ONE_SHAPE = "ours (one-shape ladder)"


def _sources(paper: dict[str, ModelConfig], tiny: dict[str, ModelConfig],
             official: dict[str, ModelConfig]) -> dict[str, str]:
    out = {name: SOURCE_TABLE1 for name in paper}
    out |= {name: SOURCE_TINY for name in tiny}
    out |= {name: SOURCE_227M if name.startswith("moe-") else SOURCE_AUTHORS for name in official}
    return out


def _all_presets() -> dict[str, ModelConfig]:
    paper, tiny = _paper_presets(), _tiny_presets()
    official = _official_227m_presets()
    tiny_later = {**_tiny_memory_plus_presets(tiny), **_tiny_ultramem_v2_presets(tiny)}
    study = _ladder_presets(_STUDY, pkm=False)
    one_shape = _ladder_presets(_ONE_SHAPE, pkm=False, wide=True)
    presets = {**paper, **tiny, **official, **tiny_later, **study, **one_shape}
    PRESET_SOURCES.update(_sources(paper, {**tiny, **tiny_later}, official))
    PRESET_SOURCES.update({name: SOURCE_STUDY for name in study})
    PRESET_SOURCES.update({name: SOURCE_ONE_SHAPE for name in one_shape})
    aliases = _aliases(presets)
    PRESET_SOURCES.update({alias: SOURCE_TINY for alias in aliases})
    presets.update(aliases)
    for name, cfg in presets.items():
        try:
            cfg.validate()
        except ConfigError as err:  # a broken preset is a bug in this file, say which
            raise ConfigError(f"preset {name!r}: {err}") from err
    return presets


PRESET_SOURCES: dict[str, str] = {}  # preset name -> where it comes from (filled with PRESETS)
PRESETS: dict[str, ModelConfig] = _all_presets()


def preset_source(name: str) -> str:
    """"authors" (the authors' released configuration), "inferred (...)" (solved from published totals) or
    "ours (tiny ladder)", "ours (study ladder)" or "ours (one-shape ladder)"."""
    return PRESET_SOURCES[name]


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
