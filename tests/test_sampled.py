"""ultramem.kernels.sampled (the winners' scores with a sparse backward) and Memory+'s reduced candidate set, against
independent references: the dense matmul + gather, torch's gradcheck, and the full m x m grid's top-m."""

from __future__ import annotations

import torch

from ultramem.kernels.sampled import csr_transpose_sum, sampled_dot
from ultramem.memory.memory_plus import product_candidates


def dense_reference(q: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return (q @ table.T).gather(1, idx)  # [B, M] scores, then the selected ones


def test_sampled_dot_passes_gradcheck_with_repeated_rows():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 7, (12, 4), generator=gen)
    idx[0] = 3  # one row selected four times by the same query
    assert torch.autograd.gradcheck(lambda a, b: sampled_dot(a, b, idx), (q, table))


def test_sampled_dot_equals_dense_matmul_and_gather_values_and_gradients():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(64, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(40, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 40, (64, 6), generator=gen, dtype=torch.int32)  # int32 indices as the layers pass
    g = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    want = dense_reference(q, table, idx.long())
    want_grads = torch.autograd.grad(want, (q, table), g)
    for values in (None, want.detach()):  # computed here, or taken from the dense matmul (bitwise the dense path)
        got = sampled_dot(q, table, idx, values)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, (q, table), g), want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(sampled_dot(q, table, idx, want.detach()), want.detach())


def test_sampled_dot_never_selected_rows_get_zero_gradient():
    q = torch.randn(3, 4, requires_grad=True)
    table = torch.randn(10, 4, requires_grad=True)
    idx = torch.tensor([[1, 2], [2, 2], [9, 1]])
    sampled_dot(q, table, idx).sum().backward()
    unused = [r for r in range(10) if r not in (1, 2, 9)]
    assert torch.equal(table.grad[unused], torch.zeros(len(unused), 4))
    torch.testing.assert_close(table.grad[2], q[0].detach() + 2 * q[1].detach())


def test_csr_transpose_sum_equals_index_add():
    gen = torch.Generator().manual_seed(2)
    idx, bag = torch.randint(0, 9, (50,), generator=gen), torch.randint(0, 6, (50,), generator=gen)
    w, src = torch.randn(50, generator=gen), torch.randn(6, 3, generator=gen)
    want = torch.zeros(9, 3).index_add_(0, idx, w[:, None] * src[bag])
    torch.testing.assert_close(csr_transpose_sum(idx, bag, w, src, 9), want)


def test_product_candidates_hold_the_full_grid_top_m():
    """Top-m of s1[i] + s2[j] over the candidates == over the whole m x m grid (values, in order), for sorted lists
    with ties-free random values, and the candidate count is sum_i floor(m / (i + 1))."""
    gen = torch.Generator().manual_seed(3)
    for m in (1, 2, 5, 16, 40):
        s1 = torch.randn(200, m, generator=gen, dtype=torch.float64).sort(-1, descending=True).values
        s2 = torch.randn(200, m, generator=gen, dtype=torch.float64).sort(-1, descending=True).values
        full = (s1[:, :, None] + s2[:, None, :]).flatten(1).topk(m).values
        ii, jj = product_candidates(m, torch.device("cpu"))
        assert len(ii) == sum(m // (i + 1) for i in range(m))
        got = (s1[:, ii] + s2[:, jj]).topk(m).values
        assert torch.equal(got, full)
