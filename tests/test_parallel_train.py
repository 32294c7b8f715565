"""Sharded training (FSDP, expert parallelism, memory parallelism) equals training in one process.

Each gloo rank trains a tiny model with the trainer's own `train_step` for a few AdamW steps on its share of a
fixed global batch, and also trains the same model (same seed) alone on the whole batch in the same process; the
global losses, gradient norms, every parameter and the TDQKR buffers must agree to round-off. On gloo both run in
float64: in float32 the layouts' different summation orders (~1e-7) could flip a near-tie in a top-m selection
(one value row chosen differently, a 2.8e-5 loss difference: seen on this machine in 4 of 4 runs of one layout),
so whether the test passed depended on the data, not on the layout being right; at ~1e-16 it does not. MoE runs
use one micro-batch per step, so the balance loss sees the same global micro-batch in both (expert parallelism
computes it over the global batch); two UltraMem layouts accumulate micro-batches. The per-rank state the layout
holds is checked against
`ultramem.accounting.train_memory`, and the memory-parallel traffic against `memory_parallel_bytes`.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from parallel_harness import full, spawn

STEPS, B, T = 3, 2, 16  # optimizer steps, sequences per rank, tokens per sequence


def _train_config(batch: int, micro: int | None = None):
    from experiments.config import TrainConfig

    return TrainConfig(steps=STEPS, batch_size=batch, micro_batch_size=micro or batch, seq_len=T, lr=3e-3, warmup=1,
                       grad_clip=0.5, weight_decay=0.1)


def _worker(rank: int, W: int, preset: str, parallel: dict, micro: int | None = None, nccl: bool = False) -> None:
    """micro: sequences per micro-batch on each rank (default all B; 1 accumulates B micro-batches, which does not
    change a dense or UltraMem objective). nccl: one GPU per rank, bf16 autocast and FSDP's bf16 policy; only
    losses and traffic are compared then (to bf16 precision), since bf16 rounding makes the weights drift apart."""
    from experiments.config import ParallelConfig
    from experiments.distributed import Parallel
    from experiments.trainer import Env, build_optimizer, set_lr, train_step
    from ultramem import build_model
    from ultramem.accounting import num_memory_layers
    from ultramem.layout import memory_parallel_bytes, train_memory
    from ultramem.presets import get_preset

    if not nccl:  # float64 (module docstring): round-off between the layouts ~1e-16, no top-m near-tie flips
        torch.set_default_dtype(torch.float64)
    mcfg = get_preset(preset).override({"seq_len": T})
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, mcfg.vocab_size, (W * B, T + 1), generator=gen) for _ in range(STEPS)]
    cpu = torch.device("cuda", rank) if nccl else torch.device("cpu")
    amp = torch.bfloat16 if nccl else None
    data = [d.to(cpu) for d in data]

    torch.manual_seed(0)
    ref = build_model(mcfg).to(cpu)
    t_ref = _train_config(W * B)
    opt_ref, mult_ref = build_optimizer(ref, t_ref)

    par = Parallel.from_config(ParallelConfig(nproc=W, **parallel), mcfg, cpu, rank, W, bf16=nccl)
    torch.manual_seed(0)
    raw = par.prepare(build_model(mcfg))
    model = par.wrap(raw)
    t = _train_config(B, micro)
    opt, mult = build_optimizer(raw, t)
    env = Env(rank, W, cpu, amp)

    if not nccl:
        _gradients_match(ref, model, raw, par, data[0], rank, W)
    for step, batch in enumerate(data):
        set_lr(opt_ref, mult_ref, step, t_ref)
        want = train_step(ref, ref, opt_ref, batch[:, :-1], batch[:, 1:], t_ref, Env(0, 1, cpu, amp))
        set_lr(opt, mult, step, t)
        mine = batch[rank * B:(rank + 1) * B]
        got = train_step(model, raw, opt, mine[:, :-1], mine[:, 1:], t, env, par)
        loss = (got["loss"] + got["aux_loss"]).detach().clone()
        dist.all_reduce(loss)
        ref_loss = (want["loss"] + want["aux_loss"]).item()
        assert loss.item() / W == pytest.approx(ref_loss, rel=2e-2 if nccl else 1e-12), \
            f"step {step}: loss {loss.item() / W!r} vs one process {ref_loss!r}"
        assert got["grad_norm"].item() == pytest.approx(want["grad_norm"].item(), rel=5e-2 if nccl else 1e-11), \
            f"step {step}: gradient norm {got['grad_norm'].item()!r} vs one process {want['grad_norm'].item()!r}"
        if par.layout.memory_parallel != "none":
            mem = mcfg.memory
            expect = memory_parallel_bytes(par.layout.memory_parallel, B * T, mem, par.layout.memory_parallel_size,
                                           float_bytes=2 if nccl else torch.get_default_dtype().itemsize)["ours"]
            M = num_memory_layers(mcfg)
            if par.layout.memory_parallel == "dim":
                for kind in ("index", "score", "pooled"):
                    assert got[f"comm/{kind}"].item() == M * expect[kind], kind
                assert got["comm/pooled_grad"].item() == M * expect["pooled"]
            else:  # per-token counts and pooled partial sums do not depend on which rows were chosen
                assert got["comm/token_counts"].item() == M * expect["token_counts"]
                assert got["comm/pooled"].item() == M * expect["pooled"]

    if nccl:
        return
    # AdamW divides by sqrt(v): where a gradient element nearly cancels, round-off in the order of the sums moves
    # it by a visible fraction of the LR (float32: up to 5% of the LR, one element of 4,096; float64, measured
    # 2026-12-07: at most 1.4e-11 of the LR), so the bound is 1e-8 of the LR per element and nearly all elements
    # must agree to 1e-12 + 1e-10 relative. Measured at the same time: losses within 3.2e-16 relative, gradient norms
    # 5.4e-16, step-0 gradients 5.8e-16 of their largest element.
    ref_params = dict(ref.named_parameters())
    lr = _train_config(B).lr
    for name, p in raw.named_parameters():
        got, want = full(p.detach()), ref_params[name].detach()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=lr * 1e-8, msg=lambda m, name=name: f"{name}: {m}")
        assert ((got - want).abs() > 1e-12 + 1e-10 * want.abs()).float().mean() < 1e-3, name
    ref_buffers = dict(ref.named_buffers())
    for name, b in raw.named_buffers():
        if not name.endswith(("last_load", "load_counts")):  # MoE load statistics are per process by design
            torch.testing.assert_close(b, ref_buffers[name], rtol=1e-10, atol=1e-12, msg=name)

    held = torch.tensor(float(sum(_local(p).numel() for p in raw.parameters())) * 16, dtype=torch.float64)
    dist.all_reduce(held)  # summed over ranks: uneven FSDP shards (dims not divisible by W) average out
    state = train_memory(mcfg, par.layout, B, T, compute_bytes=4).state
    assert held.item() == pytest.approx(W * state, rel=1e-9)


def _gradients_match(ref, model, raw, par, batch, rank: int, W: int) -> None:
    """One forward/backward on both: every finished gradient equals the single-process one."""
    out = ref(batch[:, :-1], batch[:, 1:])
    (out.loss + out.aux_loss).backward()
    mine = batch[rank * B:(rank + 1) * B]
    out = model(mine[:, :-1], mine[:, 1:])
    (out.loss + out.aux_loss).backward()
    par.finish_gradients(raw)
    ref_params = dict(ref.named_parameters())
    for name, p in raw.named_parameters():
        want = ref_params[name].grad
        got = full(p.grad) if p.grad is not None else torch.zeros_like(want)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"grad of {name}")
    ref.zero_grad(set_to_none=True)
    raw.zero_grad(set_to_none=True)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


# Layouts per world size, run one after the other in the same gloo processes (a spawn costs more than a case).
CASES = {  # (preset, parallel, micro-batch)
    2: [("dense-t1", {"fsdp": True}, None),
        ("moe-t1-2in12", {"expert_parallel": 2}, None),
        ("ultramem-t1-x6", {"memory_parallel": {"mode": "dim", "size": 2}}, 1),
        ("ultramem-t1-x6", {"memory_parallel": {"mode": "row", "size": 2}}, None)],
    # groups of 2 inside 4 ranks: shard gradients are also summed over the data-parallel pairs
    4: [("moe-t1-2in12", {"expert_parallel": 2, "fsdp": True, "activation_checkpointing": True}, None),
        ("ultramem-t1-x6", {"memory_parallel": {"mode": "dim", "size": 2}, "fsdp": True}, 1),
        ("ultramem-t1-x6", {"memory_parallel": {"mode": "row", "size": 4}, "fsdp": True}, None)],
}


def _cases(rank: int, W: int, nccl: bool = False) -> None:
    for preset, parallel, micro in CASES[W]:
        try:
            _worker(rank, W, preset, parallel, micro, nccl)
        except AssertionError as err:
            raise AssertionError(f"{preset} with parallel {parallel} on {W} ranks: {err}") from err


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_training_matches_one_process(tmp_path, world):
    spawn(_cases, world, tmp_path)


@pytest.mark.gpu
@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL path needs 2 GPUs (one per rank)")
def test_nccl_bf16_training_matches_one_gpu(tmp_path):
    spawn(_cases, 2, tmp_path, True, backend="nccl")
