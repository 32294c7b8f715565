"""TDQKR (UltraMem §2.2): two-stage selection vs the exact top-m over the full grid, rank-1 cache, Tucker penalty.

The exact reference builds the whole [tokens, heads, n', n'] grid sum_c S_row^T C_c S_col, which the layer never does.
"""

from __future__ import annotations

import pytest
import torch

from ultramem.config import MemoryConfig
from ultramem.memory.tdqkr import TDQKR, singular_values


def make(**kw) -> TDQKR:
    base = dict(layers="every", num_keys=6, key_dim=8, value_dim=8, heads=2, query_share=2, top_m=4,
                tucker_rank=2, num_cores=2, value_expansion=4, qk_norm=True)
    base.update(kw)
    cfg = MemoryConfig(**base)
    cfg.validate()
    mod = TDQKR(16, cfg).double()
    torch.nn.init.normal_(mod.query.proj.weight, std=0.3)
    torch.nn.init.normal_(mod.keys)
    torch.nn.init.uniform_(mod.cores, 0.0, 1.0)
    mod.refresh_rank1()
    return mod


def full_grid(mod: TDQKR, x: torch.Tensor) -> torch.Tensor:
    """Exact per-core grid scores [h, BT, H, n', n'] from explicit per-head products (independent of the layout)."""
    cfg = mod.cfg
    q = mod.query(x)  # [BT, Hq, 2, Dk]
    keys = mod.keys
    if mod.key_norm is not None:
        keys = keys / keys.pow(2).mean(-2, keepdim=True).add(1e-6).sqrt() * mod.key_norm.weight[:, None]
    grids = []
    for c in range(cfg.num_cores):
        per_head = []
        for i in range(cfg.heads):
            qi = q[:, i // cfg.query_share]  # [BT, 2, Dk]
            s_row = torch.einsum("bd,ndr->brn", qi[:, 0], keys[i, 0])  # [BT, r, n']
            s_col = torch.einsum("bd,ndr->brn", qi[:, 1], keys[i, 1])
            per_head.append(torch.einsum("bra,rq,bqc->bac", s_row, mod.cores[c, i], s_col))
        grids.append(torch.stack(per_head, 1))
    return torch.stack(grids)  # [h, BT, H, n', n']


def selected_sets(virtual: torch.Tensor, heads: int) -> list[set[int]]:
    BT = virtual.shape[0]
    v = virtual.view(BT, heads, -1)
    return [set(v[b, i].tolist()) for b in range(BT) for i in range(heads)]


def test_equals_exact_top_m_when_m_covers_every_key():
    torch.manual_seed(0)
    mod = make(top_m=12)  # n' = 6 * 2 = 12: stage 1 keeps every row and column
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    virtual, scores = mod(x)
    grid = full_grid(mod, x)  # [h, BT, H, n', n']
    exact = grid.sum(0).flatten(-2).topk(12, dim=-1)  # [BT, H, m]
    assert selected_sets(virtual, 2) == [set(row.tolist()) for row in exact.indices.view(-1, 12)]
    # per-core scores of each winner equal the per-core grid entries
    per_core = grid.flatten(-2).permute(1, 2, 3, 0)  # [BT, H, n'^2, h]
    expected = per_core.gather(2, virtual.view(10, 2, 12, 1).expand(-1, -1, -1, 2)).reshape(10, 24, 2)
    torch.testing.assert_close(scores, expected)


def test_equals_exact_top_m_for_rank1_core_and_nonnegative_scores():
    torch.manual_seed(1)
    mod = make(top_m=3, qk_norm=False, num_keys=8)  # n' = 16, m = 3: stage 1 drops most rows/columns
    with torch.no_grad():
        mod.query.proj.weight.abs_()
        mod.keys.abs_()
        a, b = torch.rand(2, 2, 2, 1, dtype=torch.float64), torch.rand(2, 1, 2, dtype=torch.float64)
        mod.cores.copy_(a @ b.expand(2, 1, 2).unsqueeze(0))  # C_c = a_c b^T per head: the sum is rank 1
    mod.refresh_rank1()
    assert bool((mod.u >= 0).all()) and bool((mod.t >= 0).all())
    x = torch.rand(3, 7, 16, dtype=torch.float64)  # x, W, keys >= 0 -> every per-rank score >= 0
    virtual, _ = mod(x)
    exact = full_grid(mod, x).sum(0).flatten(-2).topk(3, dim=-1).indices
    assert selected_sets(virtual, 2) == [set(row.tolist()) for row in exact.view(-1, 3)]


def recall(mod: TDQKR, x: torch.Tensor) -> tuple[float, float]:
    """(recall of the exact top-m, recall of the exact winners whose rank-1 row and column projections are >= 0).

    Stage 1 keeps the largest u^T S_row and t^T S_col, so a winner made of two negative projections (a large
    positive product) is out of its reach by construction; the second number isolates the approximation error.
    """
    virtual, _ = mod(x)
    cfg, m, n = mod.cfg, mod.cfg.top_m, mod.n_side
    exact = full_grid(mod, x).sum(0).flatten(-2).topk(m, dim=-1).indices  # [BT, H, m]
    S = mod.rank_scores(x)  # [Hq, 2, BT, s, r, n']
    u = mod.u.view(-1, cfg.query_share, cfg.tucker_rank, 1)
    t = mod.t.view(-1, cfg.query_share, cfg.tucker_rank, 1)
    proj_row = (S[:, 0] * u[:, None]).sum(3).permute(1, 0, 2, 3).reshape(-1, cfg.heads, n)  # [BT, H, n']
    proj_col = (S[:, 1] * t[:, None]).sum(3).permute(1, 0, 2, 3).reshape(-1, cfg.heads, n)
    reachable = (proj_row.gather(2, exact // n) >= 0) & (proj_col.gather(2, exact % n) >= 0)
    got = virtual.view(-1, cfg.heads, m)
    hit = (exact.unsqueeze(-1) == got.unsqueeze(-2)).any(-1)  # [BT, H, m]
    return hit.double().mean().item(), hit[reachable].double().mean().item()


def test_two_stage_recall_of_exact_top_m_is_measured(record_property):
    """Recall of the exact top-m at the paper's init (cores U(0,1)) and for cores far from rank 1 (n' = 32).

    Not exact in general, and measured here: at init about half of the exact winners pair two negative rank-1
    projections, which stage 1 (top-m of u^T S_row, as in the official code) cannot reach, so overall recall is
    ~0.5 while the reachable winners are found almost always. The numbers are printed and recorded (junit
    properties); the bounds catch a broken selection.
    """
    torch.manual_seed(2)
    x = torch.randn(4, 64, 16, dtype=torch.float64)
    results = {}
    for label, cores in [("paper_init", None), ("near_identity", 0.5 * torch.eye(2).repeat(2, 2, 1, 1))]:
        for m in (4, 8, 16):
            mod = make(num_keys=16, top_m=m, key_dim=16)
            if cores is not None:
                with torch.no_grad():
                    mod.cores.copy_(cores + 0.05 * torch.rand_like(mod.cores))
                mod.refresh_rank1()
            results[f"{label}_m{m}"] = recall(mod, x)
    print("\nTDQKR recall of exact top-m, n'=32 (overall, reachable):",
          {k: (round(a, 3), round(b, 3)) for k, (a, b) in results.items()})
    for key, (overall, reachable) in results.items():
        record_property(f"recall_{key}", round(overall, 4))
        record_property(f"recall_reachable_{key}", round(reachable, 4))
    for key, (overall, reachable) in results.items():
        if key.startswith("paper_init"):
            assert 0.35 <= overall <= 1.0 and reachable >= 0.9, (key, overall, reachable)
        else:
            assert overall > 0.15 and reachable > 0.3, (key, overall, reachable)


def test_rank1_vectors_are_the_leading_singular_vectors_of_the_summed_cores():
    torch.manual_seed(3)
    mod = make()
    C = mod.cores.detach().sum(0)
    U, S, Vh = torch.linalg.svd(C)
    for i in range(2):
        # same vectors up to one shared sign, and u^T C t = sigma_1 (the sign keeps the product positive)
        assert abs(float(mod.u[i] @ U[i, :, 0])) == pytest.approx(1.0)
        assert float(mod.u[i] @ C[i] @ mod.t[i]) == pytest.approx(float(S[i, 0]))
    # U(0,1) cores have positive Perron vectors; the first refresh picks that sign
    assert bool((mod.u >= 0).all()) and bool((mod.t >= 0).all())


def test_refresh_keeps_sign_aligned_with_previous_vectors():
    torch.manual_seed(4)
    mod = make()
    with torch.no_grad():
        mod.u.neg_()  # pretend the previous step had chosen the negative pair
        mod.t.neg_()
        mod.cores.add_(0.01 * torch.randn_like(mod.cores))
    before_u = mod.u.clone()
    mod.refresh_rank1()
    assert bool(((mod.u - before_u).abs().sum(-1) < 0.2).all())  # stayed on the negative side
    assert bool((mod.u <= 0).all())


def test_singular_values_closed_form_matches_lapack():
    torch.manual_seed(5)
    C = torch.randn(50, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(singular_values(C), torch.linalg.svdvals(C))
    C3 = torch.randn(5, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(singular_values(C3), torch.linalg.svdvals(C3))


def test_tucker_penalty_closed_form_and_weight():
    mod = make(tucker_penalty=1e-3, tucker_margin=0.15)
    with torch.no_grad():  # sum of the two cores = diag(1.0, 0.5) and diag(0.6, 0.1) for the two heads
        mod.cores.zero_()
        mod.cores[0, 0] = torch.diag(torch.tensor([0.6, 0.3]))
        mod.cores[1, 0] = torch.diag(torch.tensor([0.4, 0.2]))
        mod.cores[0, 1] = torch.diag(torch.tensor([0.6, 0.1]))
    # lambda_2 = 0.5 -> relu(0.35)^2 = 0.1225; lambda_2 = 0.1 < tau -> 0; mean over heads, r - 1 = 1
    aux = mod.aux()
    assert float(aux["tucker_penalty"]) == pytest.approx(0.1225 / 2)
    assert float(aux["aux_loss"].detach()) == pytest.approx(1e-3 * 0.1225 / 2)
    aux["aux_loss"].backward()
    assert mod.cores.grad is not None and float(mod.cores.grad.abs().sum()) > 0
    off = make(tucker_penalty=0.0)
    assert float(off.aux()["aux_loss"]) == 0.0 and not off.aux()["aux_loss"].requires_grad


def test_key_balance_loss_matches_a_plain_loop():
    # beta > 0 adds UltraMemV2's key-balance loss on the stage-1 scores: per side, n' * sum_j f_j p_j with p_j the
    # mean softmax probability of key j and f_j its share of the top-m hits, pooled over heads and tokens
    torch.manual_seed(1)
    mod = make(balance_loss_weight=0.01)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    mod(x)
    aux = mod.aux()
    cfg, n = mod.cfg, mod.n_side
    q = mod.query(x).detach()  # [BT, Hq, 2, Dk]
    keys = mod.keys.detach()
    keys = keys / keys.pow(2).mean(-2, keepdim=True).add(1e-6).sqrt() * mod.key_norm.weight.detach()[:, None]
    want = 0.0
    for side, vec in ((0, mod.u), (1, mod.t)):
        probs, hits = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        rows = 0
        for i in range(cfg.heads):
            s = torch.einsum("bd,ndr->bnr", q[:, i // cfg.query_share, side], keys[i, side]) @ vec[i]  # [BT, n']
            probs += s.softmax(-1).sum(0)
            for b in range(s.shape[0]):
                hits[s[b].topk(cfg.top_m).indices] += 1
            rows += s.shape[0]
        want += n * float((hits / hits.sum() * probs / rows).sum())
    assert float(aux["balance_loss"]) == pytest.approx(want, rel=1e-5)
    assert float(aux["aux_loss"].detach()) == pytest.approx(0.01 * want, rel=1e-5)
    aux["aux_loss"].backward()  # it trains the queries and keys
    assert mod.keys.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert "balance_loss" not in make().aux()  # off by default (the v1 paper has no such loss)
