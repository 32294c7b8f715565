"""Damaged checkpoints: a truncated or altered newest checkpoint is recognised (checksum), moved aside with a warning
naming it, and the run resumes from the newest one that verifies, reaching the uninterrupted run's final state."""

from __future__ import annotations

import os

import pytest
import torch
from run_helpers import interrupted_after

from experiments import checkpoint
from experiments.config import ParallelConfig, run_config_from_dict
from experiments.distributed import Parallel, save_sharded
from experiments.resolve import model_config
from experiments.trainer import build_optimizer, train
from runfolder import RunDir
from ultramem import build_model

STEPS = 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


def _cfg(shakespeare_path, cache):
    return run_config_from_dict({
        "model": {"preset": "dense-t1"},
        "data": {"source": str(shakespeare_path), "cache_dir": str(cache)},
        "train": {"steps": STEPS, "batch_size": 4, "seq_len": 32, "log_every": 2, "eval_every": 4, "eval_batches": 2,
                  "ckpt_every": 2, "keep_checkpoints": 4, "threads": 1, "knowledge_probe": False},
    }, "test")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shakespeare_path, cache):
    rd = RunDir(tmp_path_factory.mktemp("ref") / "run")
    train(_cfg(shakespeare_path, cache), rd.path)
    return rd




def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _same_run(rd: RunDir, ref: RunDir) -> None:
    want, got = ref.final(), rd.final()
    for key in ("train_loss", "val_loss", "tokens", "flops", "steps"):
        assert got[key] == want[key], key
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in rd.metrics()] == \
           [(r["step"], r.get("loss"), r.get("val_loss")) for r in ref.metrics()]
    a, b = _weights(ref.checkpoint_path(STEPS)), _weights(rd.checkpoint_path(STEPS))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _flip_byte(path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
        tmp_path, shakespeare_path, cache, reference, capfd, damage):
    cfg = _cfg(shakespeare_path, cache)
    rd = RunDir(tmp_path / "run")
    train(cfg, rd.path)
    interrupted_after(rd, 6)
    newest = rd.checkpoint_path(6)
    if damage == "truncated":  # a full disk or a killed copy: torch.load fails ("failed reading zip archive")
        _truncate(newest, newest.stat().st_size // 3)
    else:  # a bad disk or a bad copy: torch.load reads it without complaint, only the checksum sees it
        _flip_byte(newest)
    capfd.readouterr()

    train(cfg, rd.path)

    err = capfd.readouterr().err
    assert "damaged checkpoint" in err and "step_00000006.pt" in err, err
    aside = rd.ckpt_dir / "step_00000006.pt.corrupt"
    assert aside.is_file() and aside.stat().st_size > 0  # moved aside, not deleted
    assert rd.status()["resumed_from"] == 4 and rd.status()["state"] == "done"
    assert [p.name for p in checkpoint.all_checkpoints(rd)] == [f"step_0000000{s}.pt" for s in (2, 4, 6, 8)]
    assert checkpoint.verify(rd.checkpoint_path(6))  # written again, from the resumed run
    _same_run(rd, reference)


def test_a_checkpoint_without_checksum_still_loads_and_the_damaged_ones_are_not_counted(
        tmp_path, shakespeare_path, cache, reference, capfd):
    cfg = _cfg(shakespeare_path, cache)
    rd = RunDir(tmp_path / "run")
    train(cfg, rd.path)
    interrupted_after(rd, 6)
    for path in rd.checkpoints():  # as written before checksums existed
        checkpoint.checksum_path(path).unlink()
    assert checkpoint.verify(rd.checkpoint_path(6)) is False
    _truncate(rd.checkpoint_path(4), 1000)
    aside = checkpoint.move_aside(rd.checkpoint_path(4))
    assert aside.name == "step_00000004.pt.corrupt"
    assert checkpoint.newest(rd) == rd.checkpoint_path(6)
    assert [p.name for p in checkpoint.all_checkpoints(rd)] == ["step_00000002.pt", "step_00000006.pt"]
    checkpoint.prune(rd, 1)
    assert sorted(p.name for p in rd.ckpt_dir.iterdir()) == ["step_00000004.pt.corrupt", "step_00000006.pt"]
    capfd.readouterr()

    train(cfg, rd.path)

    assert "damaged" not in capfd.readouterr().err
    assert rd.status()["resumed_from"] == 6
    _same_run(rd, reference)


def test_an_unchecked_unreadable_checkpoint_is_moved_aside_too(tmp_path, shakespeare_path, cache, reference):
    """The issue's case: a checkpoint without checksum (older trainer) truncated to 700 kB-like size."""
    cfg = _cfg(shakespeare_path, cache)
    rd = RunDir(tmp_path / "run")
    train(cfg, rd.path)
    interrupted_after(rd, 6)
    newest = rd.checkpoint_path(6)
    checkpoint.checksum_path(newest).unlink()
    _truncate(newest, newest.stat().st_size // 2)

    train(cfg, rd.path)

    assert (rd.ckpt_dir / "step_00000006.pt.corrupt").is_file()
    assert rd.status()["resumed_from"] == 4
    _same_run(rd, reference)


# ---- sharded (DCP) checkpoints, written and read by one process -----------------------------------------------


def _model_and_opt(shakespeare_path, cache, seed: int):
    cfg = _cfg(shakespeare_path, cache)
    from experiments.resolve import resolve_run_config

    resolved = resolve_run_config(cfg)
    torch.manual_seed(seed)
    model = build_model(model_config(resolved))
    opt, _ = build_optimizer(model, resolved.train)
    return resolved, model, opt


def _step(model, opt) -> None:
    x = torch.randint(0, 200, (2, 16))
    out = model(x, x)
    out.loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("checksums", [True, False])
def test_a_damaged_sharded_checkpoint_is_moved_aside_and_the_one_before_is_loaded(
        tmp_path, shakespeare_path, cache, capfd, checksums):
    resolved, model, opt = _model_and_opt(shakespeare_path, cache, 0)
    rd = RunDir(tmp_path / "run")
    _step(model, opt)
    save_sharded(rd, 2, model, opt, {"marker": "two"}, keep=3, rank=0, world_size=1)
    at_two = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt)
    save_sharded(rd, 4, model, opt, {"marker": "four"}, keep=3, rank=0, world_size=1)
    folder = checkpoint.sharded_path(rd, 4)
    assert checkpoint.verify(folder) is True
    if not checksums:  # written before checksums existed: DCP's own read error is the signal
        for f in (checkpoint.sharded_path(rd, 2), folder):
            checkpoint.checksum_path(f).unlink()
    data = max((p for p in folder.iterdir() if p.name.endswith(".distcp")), key=lambda p: p.stat().st_size)
    _truncate(data, data.stat().st_size // 2)

    _, fresh, fresh_opt = _model_and_opt(shakespeare_path, cache, 1)
    par = Parallel(ParallelConfig().layout(1), torch.device("cpu"))
    capfd.readouterr()
    extras = par.load_latest(rd, fresh, fresh_opt)

    assert extras["step"] == 2 and extras["marker"] == "two"
    err = capfd.readouterr().err
    assert "damaged checkpoint" in err and "step_00000004.dcp" in err, err
    assert (rd.ckpt_dir / "step_00000004.dcp.corrupt").is_dir()
    assert checkpoint.all_checkpoints(rd) == [checkpoint.sharded_path(rd, 2)]
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, at_two[name]), name


def _two_ranks(rank: int, folder: str, port: int, damage: bool) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rd = RunDir(folder)
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)
        opt = torch.optim.AdamW(model.parameters())
        par = Parallel(ParallelConfig(nproc=2).layout(2), torch.device("cpu"), rank)
        if not damage:
            for step in (2, 4):
                model(torch.randn(4, 64)).sum().backward()
                opt.step()
                save_sharded(rd, step, model, opt, {"marker": step}, keep=3, rank=rank, world_size=2)
                if step == 2:
                    torch.save(model.state_dict(), f"{folder}/at_two.{rank}")
            return
        torch.manual_seed(1)
        fresh = torch.nn.Linear(64, 64)
        fresh_opt = torch.optim.AdamW(fresh.parameters())
        extras = par.load_latest(rd, fresh, fresh_opt)
        assert extras["step"] == 2 and extras["marker"] == 2, extras
        want = torch.load(f"{folder}/at_two.{rank}")
        for name, value in fresh.state_dict().items():
            assert torch.equal(value, want[name]), name
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_agree_to_skip_a_damaged_sharded_checkpoint(tmp_path, capfd):
    import socket

    import torch.multiprocessing as mp

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    rd = RunDir(tmp_path / "run")
    mp.spawn(_two_ranks, args=(str(rd.path), port(), False), nprocs=2, join=True)
    folder = checkpoint.sharded_path(rd, 4)
    data = max((p for p in folder.iterdir() if p.name.endswith(".distcp")), key=lambda p: p.stat().st_size)
    _truncate(data, data.stat().st_size // 2)
    capfd.readouterr()
    mp.spawn(_two_ranks, args=(str(rd.path), port(), True), nprocs=2, join=True)
    assert capfd.readouterr().err.count("damaged checkpoint") == 1  # rank 0 moves it and says so, once
    assert (rd.ckpt_dir / "step_00000004.dcp.corrupt").is_dir()
    assert checkpoint.all_checkpoints(rd) == [checkpoint.sharded_path(rd, 2)]
