"""Memory parallelism: sharded value-table pooling equals the naive single-process pooling, and sends exactly the
bytes of the paper's communication formulas (Huang et al. §5; ultramem.accounting.memory_parallel_bytes).

One spawn of 4 gloo ranks runs every case: dimension-wise over groups of 2 (two groups: the value gradients are
also summed across groups by `reduce_gradients`) and of 4, number-wise over 2 and 4, with a different number of
tokens on odd and even ranks (the padding path). The reference is `gather_pool_reference` on the whole table.
"""

from __future__ import annotations

import pytest
import torch
from parallel_harness import spawn

from ultramem.config import ConfigError, MemoryConfig
from ultramem.layout import memory_parallel_bytes

# K = heads * top_m = 6 slots per token, N = 36 rows, D_v = 16 split between h = 2 MCS cores, E = 4 IVE groups
MEM = MemoryConfig(num_keys=6, value_dim=16, heads=2, top_m=3, num_cores=2, value_expansion=4, key_dim=4)


def _case(rank: int, W: int, mode: str, P: int, tokens: list[int]) -> dict[str, int]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from ultramem.kernels.reference import gather_pool_reference
    from ultramem.parallel.comm import CommStats, reduce_gradients
    from ultramem.parallel.memory_parallel import DimParallelPool, RowParallelPool

    N, Dv, C, E, K = MEM.num_values, MEM.value_dim, MEM.num_cores, MEM.value_expansion, MEM.heads * MEM.top_m
    gen = torch.Generator().manual_seed(P)
    V = torch.randn(N, Dv, generator=gen)
    rows = [torch.randint(0, N, (t, K), generator=gen) for t in tokens]
    groups = [torch.randint(0, E, (t, K), generator=gen) for t in tokens]
    scores = [torch.randn(t, K, C, generator=gen) for t in tokens]
    grad_out = [torch.randn(t, E * Dv, generator=gen) for t in tokens]

    mesh = init_device_mesh("cpu", (W // P, P), mesh_dim_names=("mdp", "mp"))
    shard = Shard(1) if mode == "dim" else Shard(0)
    values = torch.nn.Parameter(distribute_tensor(V, mesh, (Replicate(), shard), src_data_rank=None))
    stats = CommStats()
    group = mesh.get_group("mp")
    pool = DimParallelPool(group, N, Dv, C, stats) if mode == "dim" else RowParallelPool(group, N, stats)
    s = scores[rank].clone().requires_grad_()
    out = pool(values, rows[rank], s, groups[rank], E)
    (out * grad_out[rank]).sum().backward()
    reduce_gradients([values], mesh.get_group("mdp"), W)

    table = V.clone().requires_grad_()
    s_ref = scores[rank].clone().requires_grad_()
    ref = gather_pool_reference(table, rows[rank], s_ref, groups[rank], E)
    (ref * grad_out[rank]).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-5, atol=1e-5)
    # the table gradient, as data parallelism defines it: the mean over ranks of each rank's own gradient
    table = V.clone().requires_grad_()
    total = sum((gather_pool_reference(table, rows[j], scores[j], groups[j], E) * grad_out[j]).sum() for j in range(W))
    (total / W).backward()
    want = table.grad.chunk(P, dim=1 if mode == "dim" else 0)[rank % P]
    torch.testing.assert_close(values.grad.to_local(), want, rtol=1e-5, atol=1e-6)
    return stats.take()


def _bytes_case(rank: int, W: int, mode: str, bf16: bool) -> dict[str, int]:
    """Equal token counts; under bf16 autocast scores and pooled vectors travel in 2 bytes as in the paper. Row
    mode: every token's slots are spread evenly over the owners, the paper's uniform assumption."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from ultramem.parallel.comm import CommStats
    from ultramem.parallel.memory_parallel import DimParallelPool, RowParallelPool

    N, Dv, C, E, K, T = MEM.num_values, MEM.value_dim, MEM.num_cores, MEM.value_expansion, MEM.heads * MEM.top_m, 5
    gen = torch.Generator().manual_seed(rank)
    per = N // W
    owner = torch.arange(K) % W  # K = 6 slots over 2 owners: 3 each
    rows = (owner * per + torch.randint(0, per, (T, K), generator=gen))
    mesh = init_device_mesh("cpu", (1, W), mesh_dim_names=("mdp", "mp"))
    values = torch.nn.Parameter(distribute_tensor(torch.randn(N, Dv, generator=gen), mesh,
                                                  (Replicate(), Shard(1) if mode == "dim" else Shard(0)),
                                                  src_data_rank=None))
    stats = CommStats()
    group = mesh.get_group("mp")
    pool = DimParallelPool(group, N, Dv, C, stats) if mode == "dim" else RowParallelPool(group, N, stats)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pool(values, rows, torch.randn(T, K, C, generator=gen), torch.randint(0, E, (T, K), generator=gen), E)
    return stats.take()


def _worker(rank: int, W: int) -> None:
    tokens = [5 + (r % 2) for r in range(W)]  # 5, 6, 5, 6
    K = MEM.heads * MEM.top_m
    for mode, P in [(m, P) for m in ("dim", "row") for P in (2, 4) if P <= W]:
        sent = _case(rank, W, mode, P, tokens)
        # pooled vectors and indices travel padded to the longest rank of the group: 6 tokens
        expect = memory_parallel_bytes(mode, 6, MEM, P, float_bytes=4)["ours"]
        assert sent["pooled"] == sent["pooled_grad"] == expect["pooled"], (mode, P, sent)
        if mode == "dim":
            assert sent["index"] == expect["index"] and sent["score"] == sent["score_grad"] == expect["score"]
        else:
            assert sent["token_counts"] == expect["token_counts"]
            # the slots this rank sent away, counted naively from the same draws
            gen = torch.Generator().manual_seed(P)
            torch.randn(MEM.num_values, MEM.value_dim, generator=gen)
            rows = [torch.randint(0, MEM.num_values, (t, K), generator=gen) for t in tokens]
            per = -(-MEM.num_values // P)
            away = int((rows[rank] // per != rank % P).sum())
            assert sent["index"] == 4 * away and sent["score"] == 4 * MEM.num_cores * away

    if W == 2:
        T = 5
        for mode in ("dim", "row"):
            paper = memory_parallel_bytes(mode, T, MEM, W)["paper"]
            sent = _bytes_case(rank, W, mode, bf16=True)
            assert sent["index"] == paper["index"]  # dim: 4 T K (P-1); row: 4 T K (P-1)/P
            if mode == "dim":
                assert sent["score"] == paper["score"] == 2 * T * K * (W - 1)
                assert sent["pooled"] == paper["pooled"] == 2 * T * MEM.value_expansion * MEM.value_dim * (W - 1) / W
            else:  # pooled before sending: E D_v per token and owner instead of the paper's K unpooled rows
                assert sent["pooled"] == 2 * T * MEM.value_expansion * MEM.value_dim * (W - 1)
                assert paper["values"] == 2 * T * K * MEM.value_dim * (W - 1) / W


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("world", [4, 2])
def test_sharded_pooling_matches_reference_and_paper_bytes(tmp_path, world):
    spawn(_worker, world, tmp_path)


def test_paper_formulas_at_paper_scale():
    """Literal §5 numbers for UltraMem-1.6B-x12's shapes (K = 2 x 42 slots, E D_v = 4 x 1024), 8192 tokens, P = 8."""
    mem = MemoryConfig(num_keys=1789, key_dim=512, value_dim=1024, heads=2, top_m=42, num_cores=2, value_expansion=4)
    dim = memory_parallel_bytes("dim", 8192, mem, 8)
    assert dim["paper"] == {"index": 19_267_584, "score": 9_633_792, "pooled": 58_720_256,
                            "total": 87_621_632}  # 4*8192*84*7, 2*8192*84*7, 2*8192*4096*7/8
    assert dim["ours"] == dim["paper"]  # P = 8 is a multiple of h = 2: one core's scores per rank
    row = memory_parallel_bytes("row", 8192, mem, 8)
    assert row["paper"] == {"index": 2_408_448, "values": 1_233_125_376, "total": 1_235_533_824}
    assert row["ours"]["pooled"] == 2 * 8192 * 4096 * 7  # 469,762,048: pooling first sends 2.6x fewer bytes
    assert row["ours"]["total"] < row["paper"]["total"]
    # fewer ranks than cores: each rank needs h / P = 2 scores per slot
    two = memory_parallel_bytes("dim", 10, MemoryConfig(value_dim=64, num_cores=4, heads=2, top_m=8), 2)["ours"]
    assert two["score"] == 2 * 10 * 16 * 2 * 1


@pytest.mark.parametrize("value_dim, cores, size, needle", [
    (64, 2, 3, "must divide model.memory.value_dim"),
    (96, 4, 6, "multiple or a divisor of model.memory.num_cores"),
])
def test_dimension_split_must_nest_with_the_cores(value_dim, cores, size, needle):
    with pytest.raises(ConfigError, match=needle):
        memory_parallel_bytes("dim", 1, MemoryConfig(value_dim=value_dim, num_cores=cores), size)
