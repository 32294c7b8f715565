"""Parameter counts, FLOPs and decode traffic (ultramem.accounting) against built modules and hand counts."""

from __future__ import annotations

import random

import pytest
import torch

from ultramem import build_model
from ultramem.accounting import (
    count_params,
    decode_bytes,
    expected_distinct,
    flops_per_token,
    retrieval_flops,
)
from ultramem.config import ModelConfig

BASE = ModelConfig(vocab_size=61, seq_len=32, n_layers=3, d_model=32, n_heads=2, ffn_hidden=64)
MEM = {"num_keys": 5, "key_dim": 8, "value_dim": 16, "heads": 2, "top_m": 4}
VARIANTS = {
    "dense": {},
    "dense-untied-layernorm": {"tie_embeddings": False, "norm": "layernorm", "ffn_hidden": 0},
    "moe": {"family": "moe", "moe": {"num_experts": 5, "top_k": 2, "expert_hidden": 24}},
    "moe-default-width": {"family": "moe", "moe": {"num_experts": 3, "top_k": 1}},
    "pkm": {"family": "pkm", "memory": {**MEM, "layers": "1:1", "query_share": 1, "score": "softmax",
                                        "tucker_rank": 1, "num_cores": 1, "value_expansion": 1,
                                        "value_proj": False, "value_dim": 32}},
    "pkm-tricks": {"family": "pkm", "memory": {**MEM, "layers": "0:2", "query_conv": 4, "tucker_rank": 1,
                                               "num_cores": 1, "value_expansion": 1}},
    "ultramem": {"family": "ultramem", "memory": {**MEM, "layers": "0:1/2:2", "query_conv": 3}},
    "ultramem-every-r3-E9": {"family": "ultramem", "memory": {**MEM, "tucker_rank": 3, "num_cores": 4,
                                                              "value_expansion": 9, "qk_norm": False}},
    "ultramem-no-proj": {"family": "ultramem", "memory": {**MEM, "layers": "1:2", "value_proj": False,
                                                          "value_dim": 8, "value_expansion": 4}},
    "memory_plus": {"family": "memory_plus", "memory_plus": {"layers": "0,2", "num_keys": 5, "key_dim": 8,
                                                             "heads": 2, "top_m": 3, "value_dim": 16,
                                                             "qk_norm": True}},
    "memory_plus-beside-private": {"family": "memory_plus", "memory_plus": {
        "layers": "0,2", "replace_ffn": False, "shared_values": False, "swilu": False, "num_keys": 5, "key_dim": 8,
        "heads": 2, "top_m": 3}},
    "ultramem_v2": {"family": "ultramem_v2", "memory_v2": {"num_keys": 4, "key_dim": 8, "value_dim": 12,
                                                           "pre_value_dim": 4, "heads": 2, "top_m": 3,
                                                           "share_ratio": 0.75, "init": "official"}},
    "ultramem_v2-private-one-query": {"family": "ultramem_v2", "memory_v2": {
        "num_keys": 3, "key_dim": 6, "value_dim": 8, "pre_value_dim": 8, "heads": 1, "top_m": 2,
        "query_per_rank": False, "init": "official"}},
}


def sparse_numel(model) -> int:
    total = 0
    for name, p in model.named_parameters():
        if name.endswith((".values", ".pre_values", "ffn.w_in", "ffn.w_out")):  # value tables, experts
            total += p.numel()
    return total


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_count_params_equals_built_module(variant):
    cfg = BASE.override(VARIANTS[variant])
    model = build_model(cfg, device="meta")
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.embedding == model.wte.weight.numel() * (1 if cfg.tie_embeddings else 2)
    assert pc.sparse == sparse_numel(model)
    assert pc.non_embedding == pc.total - pc.embedding
    assert pc.active_non_embedding == pc.active - pc.embedding


def test_hand_count_dense_and_moe():
    # dense: embedding 61*32 = 1952; per block qkv 3*32*32 + proj 32*32 + fc 32*64 + proj 64*32 + 2 norms * 32
    #        = 3072 + 1024 + 2048 + 2048 + 64 = 8256; 3 blocks = 24768; final norm 32
    pc = count_params(BASE)
    assert (pc.embedding, pc.non_embedding, pc.total) == (1952, 24800, 26752)
    # MoE 2-of-5, width 24: per block router 32*5 = 160, experts 5 * 2 * 32 * 24 = 7680 (active 2 * 1536 = 3072)
    pc = count_params(BASE.override(VARIANTS["moe"]))
    attn_norms = 3 * (4096 + 64) + 32
    assert pc.non_embedding == attn_norms + 3 * (160 + 7680)
    assert pc.active_non_embedding == attn_norms + 3 * (160 + 3072)
    assert pc.sparse == 3 * 7680


def test_hand_count_ultramem_memory_layer():
    cfg = BASE.override(VARIANTS["ultramem"])
    # per memory layer: conv 32*3 = 96; query Linear(32, 1*2*8) = 512; q/k norms 2*8 = 16;
    # keys 2 heads * 2 sides * n'=10 * 8 * r=2 = 640; cores h=2 * H=2 * 2*2 = 16; values 25 * 16 = 400;
    # value projection (4*16) * 32 = 2048  ->  dense 96+512+16+640+16+2048 = 3328, values 400
    pc = count_params(cfg)
    assert pc.non_embedding == 24800 + 2 * (3328 + 400)
    assert pc.active_non_embedding == 24800 + 2 * (3328 + 2 * 4 * 16)  # H * m rows of D_v per token
    assert pc.sparse == 800


def test_flops_per_token_closed_forms():
    # dense: 2 * 24800 + logits 2 * 61 * 32 = 53504; attention 4 * L * d * T = 4 * 3 * 32 * 32 = 12288
    assert flops_per_token(BASE) == 53504
    assert flops_per_token(BASE, seq_len=32) == 53504 + 12288
    assert flops_per_token(BASE, seq_len=32, training=True) == 3 * (53504 + 12288)
    moe = BASE.override(VARIANTS["moe"])
    assert flops_per_token(moe) == 2 * count_params(moe).active_non_embedding + 2 * 61 * 32
    um = BASE.override(VARIANTS["ultramem"])
    # per head: stage 1 2*2*n'*r = 80; stage 2 2*m*r*r + 2*m*m*r = 32 + 64; winners h*m*(2r^2 + 2r) = 96
    assert retrieval_flops(um) == 2 * 2 * (80 + 96 + 96)
    pkm = BASE.override(VARIANTS["pkm"])
    assert retrieval_flops(pkm) == 1 * 2 * 16


def test_expected_distinct_matches_simulation():
    rng = random.Random(0)
    for n_items, draws, per_draw in [(32, 8, 2), (34, 64, 2), (1000, 300, 1)]:
        sim = sum(len({i for _ in range(draws) for i in rng.sample(range(n_items), per_draw)})
                  for _ in range(500)) / 500
        assert expected_distinct(n_items, draws, per_draw) == pytest.approx(sim, rel=0.03)


def test_decode_bytes_moe_and_memory_traffic():
    moe = BASE.override(VARIANTS["moe"])  # 2 of 5 experts of 2 * 32 * 24 params
    one = decode_bytes(moe, batch_size=1, kv_len=10, bytes_per_param=2)
    assert one.experts_touched == pytest.approx(2.0)  # one token touches exactly its top-2
    many = decode_bytes(moe, batch_size=1000, kv_len=10, bytes_per_param=2)
    assert many.experts_touched == pytest.approx(5.0)  # every expert
    dense_part = count_params(moe).non_embedding - count_params(moe).sparse + 61 * 32
    assert one.params == 2 * (dense_part + 3 * 2.0 * 1536)
    assert one.kv_cache == 2 * (2 * 3 * 1 * 10 * 32)
    assert many.kv_cache == 1000 * one.kv_cache
    um = BASE.override(VARIANTS["ultramem"])
    small_batch = decode_bytes(um, batch_size=1, kv_len=0)
    assert small_batch.value_rows_touched <= 2 * 4 and small_batch.value_rows_touched > 6  # ~H*m of N=25 rows
    assert decode_bytes(um, batch_size=10_000, kv_len=0).value_rows_touched == pytest.approx(25.0)


def test_meta_build_matches_for_a_large_config_without_allocating():
    cfg = ModelConfig(family="ultramem", vocab_size=50304, seq_len=2048, n_layers=12, d_model=1024, n_heads=16,
                      memory=None).override({"memory": {"layers": "1:4/5:8/9:11", "num_keys": 1100,
                                                        "key_dim": 256, "value_dim": 512, "top_m": 32}})
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg).total
    assert not torch.is_tensor(model.memories[0].calibration_rms)


def test_hand_count_memory_plus():
    # Meta's variant: blocks 0 and 2 hold a memory layer INSTEAD of their MLP; one table of 5^2 rows x 16 for both.
    # per memory layer: query Linear(32, 2 heads * 8) + bias = 512 + 16; keys [2*2*5, 8/2] = 80; q/k norms 2 * 4;
    # swilu Linear(32, 16) + bias = 528; output Linear(16, 32) + bias = 544  ->  1688
    cfg = BASE.override(VARIANTS["memory_plus"])
    backbone = 3 * (4096 + 64) + 32  # attention + 2 norms per block, final norm
    pc = count_params(cfg)
    assert 528 + 80 + 8 + 528 + 544 == 1688
    assert pc.non_embedding == backbone + 1 * 4096 + 2 * 1688 + 25 * 16  # one MLP left (block 1), table once
    assert pc.active_non_embedding == backbone + 4096 + 2 * 1688 + 2 * (2 * 3 * 16)  # H m rows per layer
    assert pc.sparse == 400
    # parameter-free FLOPs: per layer and head the m x m candidate sums
    assert retrieval_flops(cfg) == 2 * 2 * 3 * 3
    assert flops_per_token(cfg) == 2 * pc.active_non_embedding + 2 * 61 * 32 + 36
    # decode: the shared table is read once per step: distinct rows among both layers' B * H * m draws
    one = decode_bytes(cfg, batch_size=1, kv_len=0, bytes_per_param=1)
    rows = 25 * (1 - (1 - 1 / 25) ** 12)
    assert one.params == pytest.approx(pc.non_embedding - 400 + 61 * 32 + rows * 16)
    assert one.value_rows_touched == pytest.approx(25 * (1 - (1 - 1 / 25) ** 6))  # per layer
    assert decode_bytes(cfg, batch_size=10_000, kv_len=0, bytes_per_param=1).params == pytest.approx(
        pc.non_embedding + 61 * 32)  # every row once

    # ByteDance's port with private tables and no gate: every block keeps its MLP, each layer has its own table
    # per layer: query 528, keys 80, output Linear(32 = d_model, 32) + bias = 1056  ->  1664; table 25 x 32
    beside = BASE.override(VARIANTS["memory_plus-beside-private"])
    pc = count_params(beside)
    assert pc.non_embedding == backbone + 3 * 4096 + 2 * (528 + 80 + 1056) + 2 * 25 * 32
    assert pc.sparse == 2 * 800
    one = decode_bytes(beside, batch_size=1, kv_len=0, bytes_per_param=1)
    assert one.params == pytest.approx(pc.non_embedding - 1600 + 61 * 32 + 2 * 25 * (1 - (1 - 1 / 25) ** 6) * 32)


def test_hand_count_ultramem_v2():
    from ultramem.families.ultramem_v2 import window_coverage

    # every block: MLP 4096 + one UltraMemV2 layer; global table Nall = 4^2 * 3 = 48 rows of Dv 12 + Dp 4;
    # share_ratio 0.75: n = floor(sqrt(48 * 0.75)) = 6 keys per side, windows of 36 rows from 0, 16, 32 (wrapping)
    cfg = BASE.override(VARIANTS["ultramem_v2"])
    assert cfg.memory_v2.keys_per_side(3) == 6
    # per layer: query 32 x (2 heads * 2 sides * 2 ranks * 8) = 2048; q/k norms 16; keys 2*2*6*8*2 = 384;
    # cores 2*2*2*2 = 16; pre_values_proj 32*4 = 128; values_proj 12*32 = 384  ->  2976
    backbone = 3 * (4096 + 64) + 32
    pc = count_params(cfg)
    assert pc.non_embedding == backbone + 3 * (4096 + 2976) + 48 * 16
    assert pc.active_non_embedding == backbone + 3 * (4096 + 2976) + 3 * (2 * 3) * 16  # H m rows of both tables
    assert pc.sparse == 768
    # parameter-free FLOPs per layer and head: 4 n r = 48, 2 m r^2 = 24, 2 m^2 r = 36, C m (2 r^2 + 2 r) = 72, C m = 6
    assert retrieval_flops(cfg) == 3 * 2 * (48 + 24 + 36 + 72 + 6)
    # ring windows against an explicit table of which layer covers which row
    covered = [0] * 48
    for layer in range(3):
        for slot in range(36):
            covered[(slot + 16 * layer) % 48] += 1
    assert window_coverage(cfg.memory_v2, 3) == {c: covered.count(c) for c in set(covered)} == {3: 12, 2: 36}
    one = decode_bytes(cfg, batch_size=1, kv_len=0, bytes_per_param=1)
    rows = 12 * (1 - (1 - 1 / 36) ** 18) + 36 * (1 - (1 - 1 / 36) ** 12)  # 6 draws per layer, c layers per row
    assert one.params == pytest.approx(pc.non_embedding - 768 + 61 * 32 + rows * 16)
    assert one.value_rows_touched == pytest.approx(36 * (1 - (1 - 1 / 36) ** 6))
    assert decode_bytes(cfg, batch_size=10_000, kv_len=0, bytes_per_param=1).params == pytest.approx(
        pc.non_embedding + 61 * 32)

    # private windows, one query per side: query 32 x (1 * 2 * 6) = 384, norms 12, keys 1*2*3*6*2 = 72, cores 8,
    # pre_values_proj 32*8 = 256, values_proj 8*32 = 256  ->  988; table 9 * 3 rows of 16
    private = BASE.override(VARIANTS["ultramem_v2-private-one-query"])
    assert count_params(private).non_embedding == backbone + 3 * (4096 + 988) + 27 * 16
    assert window_coverage(private.memory_v2, 3) == {1: 27}
