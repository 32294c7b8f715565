"""Memory parallelism for the families whose value tables are shared by the memory layers of several blocks:
UltraMemV2 (values and pre-values split by columns, `ColumnParallelPeerRead`) and Memory+ (its one table split by
columns or rows, `DimParallelPool` / `RowParallelPool`).

One spawn of 2 gloo ranks runs every distributed case, each against the unsharded model built from the same seed:
  - the memory layers alone, chained (several layers reading the shared table: UltraMemV2 through overlapping ring
    windows, with and without glu_act, one and two MCS cores per rank; Memory+ dim and row, shared and private
    tables), in float64, with 5 and 6 tokens on the two ranks (the padding path): outputs, the gradient of every
    parameter (table shards gathered back) and the bytes `CommStats` recorded against
    `ultramem.layout.memory_parallel_traffic`;
  - a few optimizer steps of a whole tiny model with the trainer's `train_step`, against one process training on
    the whole batch (as tests/test_parallel_train.py), then a sharded checkpoint (DCP) of each run, which the test
    process loads into an unsharded model; and an unsharded model's DCP checkpoint loaded into the sharded one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from parallel_harness import full, spawn

from ultramem.config import ConfigError
from ultramem.layout import (
    ParallelLayout,
    check_layout,
    memory_parallel_bytes,
    memory_parallel_traffic,
    memory_tables,
)
from ultramem.presets import get_preset

STEPS, B, T = 3, 2, 16  # optimizer steps, sequences per rank, tokens per sequence
SMALL = {"n_layers": 3, "d_model": 16, "n_heads": 2, "ffn_hidden": 32, "vocab_size": 64, "seq_len": 16}


def v2_config(glu_act: bool, cores: int):
    """3 layers over one 108-row table; n = 7 keys per side, so neighbouring ring windows of 49 rows overlap."""
    return get_preset("ultramem_v2-t1-x6").override({**SMALL, "memory_v2": {
        "num_keys": 6, "key_dim": 8, "value_dim": 8, "pre_value_dim": 4, "heads": 2, "top_m": 4, "num_cores": cores,
        "share_ratio": 0.5, "init": "official", "glu_act": glu_act}})


def mplus_config(shared: bool):
    return get_preset("memory_plus-t1-x6").override({**SMALL, "memory_plus": {
        "layers": "0,1,2", "replace_ffn": False, "num_keys": 6, "key_dim": 8, "heads": 2, "top_m": 3,
        "shared_values": shared}})


# ---- layouts and byte counts (no processes) -------------------------------------------------------------------


def test_layouts_the_shared_table_families_accept():
    for cfg in (get_preset("ultramem_v2-t1-x6"), get_preset("memory_plus-t1-x6")):
        check_layout(cfg, ParallelLayout(2, memory_parallel="dim", memory_parallel_size=2))
        check_layout(cfg, ParallelLayout(8, memory_parallel="dim", memory_parallel_size=4))  # 2 groups of 4
    check_layout(get_preset("memory_plus-t1-x6"), ParallelLayout(2, memory_parallel="row", memory_parallel_size=2))


@pytest.mark.parametrize("cfg, layout, needle", [
    (get_preset("ultramem_v2-t1-x6"), ParallelLayout(2, memory_parallel="row", memory_parallel_size=2),
     r"memory_parallel.mode: 'row' is not implemented for UltraMemV2 .*set mode: dim"),
    (get_preset("ultramem_v2-t1-x6"), ParallelLayout(2, fsdp=True, memory_parallel="dim", memory_parallel_size=2),
     r"parallel.fsdp: .*'ultramem_v2'.*FSDP's per-block units.*set parallel.fsdp: false, parallel.expert_parallel: 1"),
    (get_preset("memory_plus-t1-x6"), ParallelLayout(2, fsdp=True),
     r"parallel.fsdp: .*'memory_plus'.*shared by the memory layers"),
    (get_preset("memory_plus-t1-x6"), ParallelLayout(2, expert_parallel=2), r"parallel.expert_parallel: "),
    (get_preset("memory_plus-t1-x6"),
     ParallelLayout(2, activation_checkpointing=True, memory_parallel="dim", memory_parallel_size=2),
     r"parallel.activation_checkpointing: .*repeat the layer's communication"),
    # a column split must divide both tables' widths and nest with the cores
    (get_preset("ultramem_v2-t1-x6").override({"memory_v2": {"pre_value_dim": 12}}),
     ParallelLayout(8, memory_parallel="dim", memory_parallel_size=8),
     r"memory_parallel.size: 8 must divide model.memory_v2.pre_value_dim \(12\)"),
    (get_preset("ultramem_v2-t1-x6").override({"memory_v2": {"value_dim": 12, "num_cores": 2}}),
     ParallelLayout(8, memory_parallel="dim", memory_parallel_size=8),
     r"memory_parallel.size: 8 must divide model.memory_v2.value_dim \(12\)"),
    (get_preset("ultramem_v2-t1-x6").override({"memory_v2": {"value_dim": 48, "num_cores": 3}}),
     ParallelLayout(2, memory_parallel="dim", memory_parallel_size=2),
     r"memory_parallel.size: 2 must be a multiple or a divisor of model.memory_v2.num_cores \(3\)"),
    (get_preset("memory_plus-t1-x6"), ParallelLayout(3, memory_parallel="dim", memory_parallel_size=3),
     r"memory_parallel.size: 3 must divide model.memory_plus.value_dim \(0: d_model\) \(64\)"),
])
def test_layouts_refused_with_the_field_and_the_fix(cfg, layout, needle):
    with pytest.raises(ConfigError, match=needle):
        check_layout(cfg, layout)


def test_traffic_formulas_at_227m_scale():
    """Per optimizer step and rank at the authors' 227M shapes, 8 GPUs, 8192 tokens per rank, bf16."""
    v2 = get_preset("ultramem_v2-227m")
    m, T, P = v2.memory_v2, 8192, 8
    K, L, s = m.heads * m.top_m, v2.n_layers, 2
    layer = memory_parallel_bytes("dim", T, memory_tables(v2), P)
    assert "paper" not in layer  # Huang et al.'s formula has no pre-values
    assert layer["ours"] == {"index": 4 * T * K * 7, "pre_input": s * T * m.pre_value_dim * 7 / 8,
                             "pre_score": s * T * K * 7, "score": s * T * K * 1 * 7,
                             "pooled": s * T * m.value_dim * 7 / 8, "total": pytest.approx(sum(
                                 [4 * T * K * 7, s * T * m.pre_value_dim * 7 / 8, s * T * K * 7, s * T * K * 7,
                                  s * T * m.value_dim * 7 / 8]))}
    step = memory_parallel_traffic(v2, "dim", T, P)
    assert step["index"] == L * 4 * T * K * 7 and step["pre_score_grad"] == step["pre_score"]
    assert "index_grad" not in step and step["meta"] == 8 * 7 * L
    mp = get_preset("memory_plus-227m")
    tables = memory_tables(mp)
    assert (tables.rows, tables.value_dim, tables.slots, tables.num_cores) == (
        mp.memory_plus.num_values, mp.d_model if not mp.memory_plus.value_dim else mp.memory_plus.value_dim,
        mp.memory_plus.heads * mp.memory_plus.top_m, 1)
    dim = memory_parallel_bytes("dim", T, tables, P)
    assert dim["ours"] == dim["paper"]  # one weight per slot: UltraMem's formula with h = 1


# ---- the distributed cases ---------------------------------------------------------------------------------------


def _memory_layers(model):
    return [b.ffn.memory for b in model.blocks if b.ffn.memory is not None]


def _chain(layers, x):
    """h <- h + layer(h) through every memory layer (each reads the shared table)."""
    for layer in layers:
        x = x + layer(x)[0]
    return x


def _layers_case(rank: int, W: int, cfg, mode: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from ultramem import build_model
    from ultramem.parallel.comm import CommStats
    from ultramem.parallel.memory_parallel import shard_value_tables

    tokens, d = [5, 6], cfg.d_model
    torch.manual_seed(0)
    ref = build_model(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    mesh = init_device_mesh("cpu", (1, W), mesh_dim_names=("mdp", "mp"))
    stats = CommStats()
    shard_value_tables(model, mode, mesh, stats)

    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, t, d, generator=gen) for t in tokens]
    gs = [torch.randn(1, t, d, generator=gen) for t in tokens]
    out = _chain(_memory_layers(model), xs[rank])
    (out * gs[rank]).sum().backward()
    want = _chain(_memory_layers(ref), torch.cat(xs, 1))  # the layers are token-wise: all ranks' tokens at once
    (want * torch.cat(gs, 1)).sum().backward()
    first = sum(tokens[:rank])
    torch.testing.assert_close(out, want[:, first:first + tokens[rank]].detach())

    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want_grad = ref_params[name].grad
        if p.grad is None:
            assert want_grad is None, name
            continue
        if hasattr(p.grad, "full_tensor"):  # a table shard already holds the gradient of every token of its group
            got = p.grad.full_tensor()
        else:  # a replicated parameter: the gradients of the ranks' own tokens add up
            got = p.grad.clone()
            dist.all_reduce(got)
        torch.testing.assert_close(got, want_grad, msg=lambda m, name=name: f"grad of {name}: {m}")

    sent = stats.take()
    expect = memory_parallel_traffic(cfg, mode, max(tokens), W, float_bytes=8)  # padded to the longest rank
    if mode == "dim":
        assert sent == expect
    else:  # which owner a slot goes to depends on the rows chosen: count the slots this rank sent away
        for kind in ("meta", "token_counts", "pooled", "pooled_grad"):
            assert sent[kind] == expect[kind], kind
        per, away, h = -(-memory_tables(cfg).rows // W), 0, xs[rank]
        with torch.no_grad():
            for layer in _memory_layers(ref):
                away += int((layer.value_rows(h) // per != rank).sum())
                h = h + layer(h)[0]
        total = torch.tensor(away)
        dist.all_reduce(total)  # the backward returns the score gradients of the slots the other rank sent here
        assert sent["index"] == 4 * away and sent["score"] == 8 * away, (sent, away)
        assert sent["score_grad"] == 8 * (total.item() - away), (sent, total)


def _train_config(batch: int, micro: int | None = None):
    from experiments.config import TrainConfig

    return TrainConfig(steps=STEPS, batch_size=batch, micro_batch_size=micro or batch, seq_len=T, lr=3e-3, warmup=1,
                       grad_clip=0.5, weight_decay=0.1)


def _train_case(rank: int, W: int, cfg, parallel: dict, micro: int | None, out_dir: str) -> None:
    """Train sharded and alone; then checkpoint the sharded run (DCP) and load an unsharded DCP checkpoint into it."""
    from experiments.config import ParallelConfig
    from experiments.distributed import Parallel, load_sharded, save_sharded
    from experiments.trainer import Env, build_optimizer, set_lr, train_step
    from runfolder import RunDir
    from ultramem import build_model
    from ultramem.layout import train_memory

    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, cfg.vocab_size, (W * B, T + 1), generator=gen) for _ in range(STEPS)]
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    ref = build_model(cfg)
    t_ref = _train_config(W * B)
    opt_ref, mult_ref = build_optimizer(ref, t_ref)
    par = Parallel.from_config(ParallelConfig(nproc=W, **parallel), cfg, cpu, rank, W)
    torch.manual_seed(0)
    raw = par.prepare(build_model(cfg))
    model = par.wrap(raw)
    t = _train_config(B, micro)
    opt, mult = build_optimizer(raw, t)
    env = Env(rank, W, cpu, None)
    lay = par.layout
    traffic = memory_parallel_traffic(cfg, lay.memory_parallel, (micro or B) * T, lay.memory_parallel_size,
                                      float_bytes=torch.get_default_dtype().itemsize)
    peak_lr: dict[int, float] = {}  # per reference parameter: the largest LR it was stepped with
    for step, batch in enumerate(data):
        set_lr(opt_ref, mult_ref, step, t_ref)
        peak_lr.update({id(p): max(g["lr"], peak_lr.get(id(p), 0.0)) for g in opt_ref.param_groups for p in g["params"]})
        want = train_step(ref, ref, opt_ref, batch[:, :-1], batch[:, 1:], t_ref, Env(0, 1, cpu, None))
        set_lr(opt, mult, step, t)
        mine = batch[rank * B:(rank + 1) * B]
        got = train_step(model, raw, opt, mine[:, :-1], mine[:, 1:], t, env, par)
        loss = (got["loss"] + got["aux_loss"]).detach().clone()
        dist.all_reduce(loss)
        assert loss.item() / W == pytest.approx((want["loss"] + want["aux_loss"]).item(), rel=1e-5)
        assert got["grad_norm"].item() == pytest.approx(want["grad_norm"].item(), rel=1e-4), (step, got, want)
        comm = {k.split("/", 1)[1]: v.item() for k, v in got.items() if k.startswith("comm/")}
        n_micro = B // (micro or B)
        if lay.memory_parallel == "dim":
            assert comm == {k: n_micro * v for k, v in traffic.items()}, (comm, traffic)
        else:
            for kind in ("meta", "token_counts", "pooled", "pooled_grad"):
                assert comm[kind] == n_micro * traffic[kind], kind

    # AdamW divides by sqrt(v): see tests/test_parallel_train.py for the tolerance, 10% of the LR per element (here
    # of the parameter's own peak LR: UltraMemV2's tables step at up to 4x)
    ref_params = dict(ref.named_parameters())
    for name, p in raw.named_parameters():
        got, want = full(p.detach()), ref_params[name].detach()
        atol = peak_lr[id(ref_params[name])] / 10
        torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
        assert ((got - want).abs() > 1e-5 + 1e-4 * want.abs()).float().mean() < 1e-3, name
    ref_buffers = dict(ref.named_buffers())
    for name, b in raw.named_buffers():
        torch.testing.assert_close(b, ref_buffers[name], rtol=1e-4, atol=1e-6, msg=name)
    # the state this rank holds (the table / P, the rest replicated) is what the planner counts
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in raw.parameters())
    assert 16 * held == train_memory(cfg, lay, B, T, compute_bytes=4).state

    # sharded -> unsharded: rank 0 keeps the whole weights and AdamW moments the test process must read back
    save_sharded(RunDir(f"{out_dir}/sharded"), STEPS, raw, opt, {}, 1, rank, W)
    whole = {name: [full(p.detach())] + [full(opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq")]
             for name, p in raw.named_parameters()}
    if rank == 0:
        torch.save(whole, f"{out_dir}/sharded_whole.pt")
    # unsharded -> sharded: the DCP checkpoint the test process wrote from one unsharded process
    from experiments import checkpoint

    load_sharded(checkpoint.sharded_path(RunDir(f"{out_dir}/unsharded"), 1), raw, opt)
    want = torch.load(f"{out_dir}/unsharded_whole.pt", weights_only=True)
    for name, p in raw.named_parameters():
        got = [full(p.detach())] + [full(opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq")]
        for g, w in zip(got, want[name], strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)


def _train_configs():
    """(name, model, parallel, micro-batch, dtype). Row mode sums each token's pooled rows in another order than
    one process (per owner, then over owners), and AdamW turns fp32 round-off in a nearly cancelling gradient into
    up to 2 LR in that element (measured: 26 elements of Memory+'s table after 3 steps): it trains in float64.
    Dim mode pools in the single process's token order and trains in float32, as the trainer does."""
    v2 = get_preset("ultramem_v2-t1-x6").override({"seq_len": T, "memory_v2": {"init": "official"}})
    mplus = get_preset("memory_plus-t1-x6").override({"seq_len": T, "memory_plus": {"layers": "0,1"}})
    return [("v2", v2, {"memory_parallel": {"mode": "dim", "size": 2}}, None, torch.float32),
            ("mplus", mplus, {"memory_parallel": {"mode": "dim", "size": 2}}, 1, torch.float32),
            ("mplus-row", mplus, {"memory_parallel": {"mode": "row", "size": 2}}, None, torch.float64)]


def _cases(rank: int, W: int, root: str) -> None:
    torch.set_default_dtype(torch.float64)
    try:
        for name, cfg, mode in [("v2", v2_config(False, 2), "dim"), ("v2-glu-2cores", v2_config(True, 4), "dim"),
                                ("mplus", mplus_config(True), "dim"), ("mplus-row", mplus_config(True), "row"),
                                ("mplus-private", mplus_config(False), "dim")]:
            try:
                _layers_case(rank, W, cfg, mode)
            except AssertionError as err:
                raise AssertionError(f"memory layers of {name} ({mode}): {err}") from err
    finally:
        torch.set_default_dtype(torch.float32)
    for name, cfg, parallel, micro, dtype in _train_configs():
        torch.set_default_dtype(dtype)
        try:
            _train_case(rank, W, cfg, parallel, micro, f"{root}/{name}")
        except AssertionError as err:
            raise AssertionError(f"training {name} with parallel {parallel}: {err}") from err
        finally:
            torch.set_default_dtype(torch.float32)


def _unsharded_checkpoint(cfg, out_dir) -> None:
    """One process, nothing sharded: a DCP checkpoint of a model after one optimizer step, and its whole state."""
    from experiments.distributed import save_sharded
    from experiments.trainer import Env, build_optimizer, train_step
    from runfolder import RunDir
    from ultramem import build_model

    torch.manual_seed(7)
    model = build_model(cfg)
    t = _train_config(B)
    opt, _ = build_optimizer(model, t)
    batch = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(2))
    train_step(model, model, opt, batch[:, :-1], batch[:, 1:], t, Env(0, 1, torch.device("cpu"), None))
    save_sharded(RunDir(out_dir / "unsharded"), 1, model, opt, {}, 1, 0, 1)
    torch.save({name: [p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]]
                for name, p in model.named_parameters()}, out_dir / "unsharded_whole.pt")


def _load_sharded_into_one_process(cfg, out_dir) -> None:
    from experiments import checkpoint
    from experiments.distributed import load_sharded
    from experiments.trainer import build_optimizer
    from runfolder import RunDir
    from ultramem import build_model

    model = build_model(cfg)
    opt, _ = build_optimizer(model, _train_config(B))
    extras = load_sharded(checkpoint.sharded_path(RunDir(out_dir / "sharded"), STEPS), model, opt)
    assert extras["step"] == STEPS
    want = torch.load(out_dir / "sharded_whole.pt", weights_only=True)
    for name, p in model.named_parameters():
        for got, w in zip([p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]], want[name], strict=True):
            torch.testing.assert_close(got, w, rtol=0, atol=0, msg=name)
    # a shared table is one tensor however many layers hold it
    tables = {id(layer.table.values) for block in model.blocks if block.ffn.memory is not None
              for layer in [block.ffn.memory]}
    assert tables == {id(model.shared.values)}


@pytest.mark.dist
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the one-process DCP save
def test_sharded_shared_tables_match_one_process(tmp_path):
    for name, cfg, _, _, dtype in _train_configs():
        (tmp_path / name).mkdir()
        with _default_dtype(dtype):
            _unsharded_checkpoint(cfg, tmp_path / name)
    spawn(_cases, 2, tmp_path, str(tmp_path))
    for name, cfg, _, _, dtype in _train_configs():
        with _default_dtype(dtype):
            _load_sharded_into_one_process(cfg, tmp_path / name)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)
