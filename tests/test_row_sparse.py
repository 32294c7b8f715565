"""Row-sparse value updates (train.value_updates: rows_read): the sparse table gradient against the dense one, the
row-wise AdamW against a textbook reference written out per row in float64, the mixed clip against torch's clip on
densified gradients, and a real training run whose unread rows must not move."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.config import ConfigError, run_config_from_dict, run_id
from experiments.resolve import resolve_run_config
from experiments.trainer import build_optimizer, clip_gradients
from ultramem import build_model
from ultramem.kernels.retrieval import gather_pool
from ultramem.presets import get_preset
from ultramem.row_sparse import RowSparseAdamW, clip_grad_norm_, mark_row_sparse


def _pool_case(T: int, K: int, N: int, Dv: int, C: int, E: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(N, Dv, generator=g)
    rows = torch.randint(0, N, (T, K), generator=g)
    scores = torch.randn(T, K, C, generator=g, requires_grad=True)
    groups = torch.randint(0, E, (T, K), generator=g) if E > 1 else None
    return values, rows, scores, groups


@pytest.mark.parametrize("C,E", [(1, 1), (2, 4), (4, 2)])
def test_sparse_table_gradient_equals_the_dense_one(C: int, E: int) -> None:
    values, rows, scores, groups = _pool_case(T=40, K=12, N=300, Dv=16, C=C, E=E)
    out_w = torch.randn(40, E * 16, generator=torch.Generator().manual_seed(5))
    grads = {}
    for sparse in (False, True):
        v = values.clone().requires_grad_(True)
        s = scores.detach().clone().requires_grad_(True)
        if sparse:
            v.row_sparse_grad = True
        (gather_pool(v, rows, s, groups, E) * out_w).sum().backward()
        grads[sparse] = (v.grad, s.grad)
    dense, sparse = grads[False][0], grads[True][0]
    assert dense.layout == torch.strided and sparse.is_sparse
    # exactly the rows read, ascending
    assert torch.equal(sparse._indices()[0], torch.unique(rows))
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[True][1], grads[False][1])  # the score gradients are unchanged


def _reference_rows_adamw(p0, grads, lr, betas, eps, wd):
    """Textbook row-lazy AdamW in float64, one row at a time: a row with a gradient (a row of the step's sparse
    gradient, even if zero) gets m, v, decoupled decay and the bias-corrected step at the global step count t; a
    row without one is left exactly as it is."""
    p = p0.astype(np.float64).copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    b1, b2 = betas
    for t, (rows, g) in enumerate(grads, start=1):
        for r, gr in zip(rows, g.astype(np.float64), strict=True):
            m[r] = b1 * m[r] + (1 - b1) * gr
            v[r] = b2 * v[r] + (1 - b2) * gr * gr
            p[r] *= 1 - lr * wd
            p[r] -= lr * (m[r] / (1 - b1**t)) / (np.sqrt(v[r] / (1 - b2**t)) + eps)
    return p


@pytest.mark.parametrize("fused", [False, True])
def test_row_sparse_adamw_against_a_per_row_reference(fused: bool) -> None:
    gen = np.random.default_rng(0)
    N, D, lr, betas, eps, wd = 50, 6, 3e-2, (0.9, 0.95), 1e-8, 0.1
    p0 = gen.standard_normal((N, D)).astype(np.float32)
    dense0 = gen.standard_normal((4, 3)).astype(np.float32)
    table, other = torch.nn.Parameter(torch.tensor(p0)), torch.nn.Parameter(torch.tensor(dense0))
    ref_other = torch.nn.Parameter(torch.tensor(dense0))
    opt = RowSparseAdamW([table, other], lr=lr, betas=betas, eps=eps, weight_decay=wd, fused=fused)
    ref_opt = torch.optim.AdamW([ref_other], lr=lr, betas=betas, eps=eps, weight_decay=wd, fused=fused)
    steps = []
    for _ in range(6):
        rows = np.sort(gen.choice(N, size=gen.integers(1, 15), replace=False))
        g = gen.standard_normal((len(rows), D)).astype(np.float32)
        steps.append((rows, g))
        table.grad = torch.sparse_coo_tensor(torch.tensor(rows)[None], torch.tensor(g), (N, D), check_invariants=True).coalesce()
        dg = torch.tensor(gen.standard_normal((4, 3)).astype(np.float32))
        other.grad, ref_other.grad = dg.clone(), dg.clone()
        opt.step()
        ref_opt.step()
    expected = _reference_rows_adamw(p0, steps, lr, betas, eps, wd)
    np.testing.assert_allclose(table.detach().numpy(), expected, rtol=2e-5, atol=2e-6)
    never = sorted(set(range(N)) - {int(r) for rows, _ in steps for r in rows})
    assert never, "the case must leave some rows unread"
    assert np.array_equal(table.detach().numpy()[never], p0[never])  # untouched, bit for bit
    # the dense parameter is torch's AdamW, unchanged
    torch.testing.assert_close(other.detach(), ref_other.detach(), rtol=0, atol=0)


def test_every_row_read_is_dense_adamw() -> None:
    """With every row in every step's gradient the row-lazy update is AdamW itself (torch's, for-loop kernel)."""
    torch.manual_seed(0)
    p0 = torch.randn(20, 5)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    opt_a = RowSparseAdamW([a], lr=1e-2, weight_decay=0.1, foreach=False)
    opt_b = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(5):
        g = torch.randn(20, 5)
        a.grad, b.grad = g.to_sparse(1).coalesce(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    # same state layout as torch's AdamW: its state_dict loads into a plain AdamW
    torch.optim.AdamW([torch.nn.Parameter(p0.clone())], lr=1e-2).load_state_dict(opt_a.state_dict())


def test_mixed_clip_matches_torch_on_densified_gradients() -> None:
    torch.manual_seed(1)
    table, w = torch.nn.Parameter(torch.randn(30, 4)), torch.nn.Parameter(torch.randn(5, 5))
    sparse = torch.sparse_coo_tensor(torch.tensor([[3, 7, 3, 20]]), torch.randn(4, 4) * 5, (30, 4),
                                     check_invariants=True)  # uncoalesced
    table.grad, w.grad = sparse, torch.randn(5, 5)
    dt, dw = torch.nn.Parameter(table.detach().clone()), torch.nn.Parameter(w.detach().clone())
    dt.grad, dw.grad = sparse.to_dense(), w.grad.clone()
    norm = clip_grad_norm_([table, w], 1.0)
    ref = torch.nn.utils.clip_grad_norm_([dt, dw], 1.0)
    torch.testing.assert_close(norm, ref)
    assert table.grad.is_sparse and table.grad.is_coalesced()
    torch.testing.assert_close(table.grad.to_dense(), dt.grad)
    torch.testing.assert_close(w.grad, dw.grad)


def _run_config(**train):
    return resolve_run_config(run_config_from_dict({
        "model": {"preset": "ultramem-tiny"}, "data": {"source": "embedded"},
        "train": {"steps": 2, "batch_size": 4, "seq_len": 32, "lr": 1e-3, **train}}, "test"))


def _train_config(**train):
    return _run_config(**train).train


def test_value_updates_enters_the_run_id_only_when_set() -> None:
    base = _run_config().model_dump(mode="json")
    same = _run_config(value_updates="dense").model_dump(mode="json")
    other = _run_config(value_updates="rows_read").model_dump(mode="json")
    base["train"].pop("value_updates")  # a run folder written before the field existed
    assert run_id(base) == run_id(same) != run_id(other)


def test_training_step_moves_only_the_rows_read() -> None:
    """One optimizer step of a real UltraMem model: the value rows no token read are bitwise unchanged (dense AdamW
    would decay them), the rows read moved; the other parameters step as with dense updates."""
    cfg = get_preset("ultramem-tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    t = _train_config(value_updates="rows_read")
    opt, _ = build_optimizer(model, t)
    assert isinstance(opt, RowSparseAdamW)
    tables = [m.values for m in model.modules() if hasattr(m, "values") and isinstance(m.values, torch.nn.Parameter)]
    before = [v.detach().clone() for v in tables]
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    out = model(x, x)
    (out.loss + out.aux_loss).backward()
    assert all(v.grad.is_sparse for v in tables)
    read = [v.grad.coalesce()._indices()[0] for v in tables]
    clip_gradients(opt, model, 1.0)
    opt.step()
    for v, b, rows in zip(tables, before, read, strict=True):
        unread = torch.ones(v.shape[0], dtype=torch.bool)
        unread[rows] = False
        assert 0 < int(unread.sum()) < v.shape[0]
        assert torch.equal(v.detach()[unread], b[unread])
        assert not torch.equal(v.detach()[rows], b[rows])


def test_rows_read_is_refused_where_it_cannot_work() -> None:
    t = _train_config(value_updates="rows_read")
    with pytest.raises(ConfigError, match="value_updates"):
        build_optimizer(build_model(get_preset("dense-tiny")), t)
    with pytest.raises(ConfigError, match="one process"):
        build_optimizer(build_model(get_preset("ultramem-tiny")), t, distributed_run=True)


def test_mark_row_sparse_names_the_tables() -> None:
    names = mark_row_sparse(build_model(get_preset("ultramem-tiny")))
    assert names and all(n.endswith(".values") for n in names)


def test_micro_batches_sum_their_sparse_gradients() -> None:
    """Two micro-batches accumulate two sparse gradients (uncoalesced); after the clip (which coalesces them) every
    gradient equals the one-batch gradient up to fp32 summation order, and the step runs on them."""
    cfg = get_preset("ultramem-tiny")
    x = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(3))
    t = _train_config(value_updates="rows_read")
    grads = []
    for halves in (1, 2):
        torch.manual_seed(0)
        model = build_model(cfg)
        opt, _ = build_optimizer(model, t)
        for xb in x.chunk(halves):
            out = model(xb, xb)
            ((out.loss + out.aux_loss) / halves).backward()
        clip_gradients(opt, model, 1.0)
        assert any(p.grad.is_sparse and p.grad.is_coalesced() for p in model.parameters() if p.grad is not None)
        grads.append([None if p.grad is None else p.grad.to_dense() for p in model.parameters()])
        opt.step()
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("preset", ["ultramem-t1-x6", "memory_plus-t1-x6", "pkm-tiny"])
def test_dense_updates_assemble_the_dense_gradient_from_the_rows_read(preset: str) -> None:
    """value_updates dense (the default) in one CPU process: build_optimizer has the tables' backward produce the
    rows read and densify them once per backward. The gradients of two accumulated micro-batches and the weights
    after two AdamW steps must equal, bitwise, those of the same model trained on torch's dense table gradients
    (the plain path, unmarked) - Memory+'s table is read by two layers, so a row's gradient there sums two
    readers, and the second micro-batch adds a sparse gradient into the dense one."""
    cfg = get_preset(preset)
    batches = torch.randint(0, cfg.vocab_size, (2, 2, 2, 17), generator=torch.Generator().manual_seed(4))
    t = resolve_run_config(run_config_from_dict({"model": {"preset": preset},
                                                 "train": {"steps": 2, "lr": 3e-3, "warmup": 0}})).train
    models, seen = {}, {}
    for assembled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg)
        if assembled:
            opt, _ = build_optimizer(model, t)
            assert [n for n, p in model.named_parameters() if getattr(p, "row_sparse_grad", False)]
        else:
            opt = torch.optim.AdamW(model.param_groups(t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                    eps=t.eps, weight_decay=t.weight_decay, fused=True)
        for step in range(2):
            for micro in batches[step]:
                out = model(micro[:, :-1], micro[:, 1:])
                (out.loss + out.aux_loss).backward()
            assert all(not p.grad.is_sparse for p in model.parameters() if p.grad is not None)
            seen[assembled, step] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.on_optimizer_step()
        models[assembled] = model
    for step in range(2):
        assert seen[True, step].keys() == seen[False, step].keys()
        for name, want in seen[False, step].items():
            assert torch.equal(seen[True, step][name], want), (step, name)
    plain = dict(models[False].named_parameters())
    for name, p in models[True].named_parameters():
        assert torch.equal(p, plain[name]), name


def test_dense_gradients_from_rows_only_where_they_are_safe() -> None:
    t = resolve_run_config(run_config_from_dict({"model": {"preset": "ultramem-tiny"}})).train
    for kwargs, update, marked in [({}, {}, True), ({"distributed_run": True}, {}, False),
                                   ({}, {"compile": True}, False)]:
        model = build_model(get_preset("ultramem-tiny"))
        build_optimizer(model, t.model_copy(update=update), **kwargs)
        assert any(getattr(p, "row_sparse_grad", False) for p in model.parameters()) == marked, (kwargs, update)
