"""TokenLoader: windows come from the data, determinism, rank-disjoint batches, exact resume, fixed eval batches.

The prepared data here is written by the test itself: token i of a split is i (mod 65000 never wraps at these
sizes), so every window names its own start and the checks need no knowledge of the loader's internals.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from experiments.data import TokenLoader
from experiments.data.shards import PreparedData

N_TRAIN, N_VAL = 5000, 700


@pytest.fixture
def prepared(tmp_path) -> PreparedData:
    meta = {"key": "synthetic", "tokenizer": "byte", "vocab_size": 65000, "eot_id": 0, "dtype": "uint16",
            "tokens": {"train": N_TRAIN, "val": N_VAL}, "documents": {"train": 1, "val": 1}}
    np.arange(N_TRAIN, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(N_VAL, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return PreparedData(tmp_path, meta)


def starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_batches_are_contiguous_windows_with_shifted_targets(prepared):
    loader = TokenLoader(prepared, "train", seq_len=16, batch_size=4, seed=0)
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
        ramp = torch.arange(16)
        assert torch.equal(x, x[:, :1] + ramp) and torch.equal(y, x + 1)


def test_same_seed_same_batches_other_seed_other_batches(prepared):
    a, b, c = (TokenLoader(prepared, "train", 16, 4, seed=s) for s in (3, 3, 4))
    seq_a = [starts(a.next_batch()[0]) for _ in range(20)]
    assert seq_a == [starts(b.next_batch()[0]) for _ in range(20)]
    assert seq_a != [starts(c.next_batch()[0]) for _ in range(20)]


def test_an_epoch_visits_disjoint_windows(prepared):
    T, B = 16, 4
    loader = TokenLoader(prepared, "train", T, B, seed=0)
    seen = [s for _ in range((N_TRAIN - T) // T // B) for s in starts(loader.next_batch()[0])]
    assert len(set(seen)) == len(seen)
    assert len({s % T for s in seen}) == 1  # one offset per epoch: windows tile the array without overlap


def test_ranks_get_disjoint_batches_that_cover_the_global_batch(prepared):
    T, B, W = 16, 3, 4
    ranks = [TokenLoader(prepared, "train", T, B, seed=7, rank=r, world_size=W) for r in range(W)]
    single = TokenLoader(prepared, "train", T, B * W, seed=7)
    for _ in range(25):  # crosses an epoch boundary: 5000 tokens / 16 = 312 windows = 26 steps of 12
        per_rank = [starts(r.next_batch()[0]) for r in ranks]
        flat = [s for rank in per_rank for s in rank]
        assert len(set(flat)) == len(flat)
        assert flat == starts(single.next_batch()[0])  # rank r holds block r of the global batch


def test_resume_from_state_dict_replays_the_same_batches(prepared):
    T, B = 16, 8
    straight = TokenLoader(prepared, "train", T, B, seed=1)
    reference = [straight.next_batch() for _ in range(60)]  # 39 steps per epoch: crosses into epoch 2
    first = TokenLoader(prepared, "train", T, B, seed=1)
    for _ in range(37):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint's serialisation
    resumed = TokenLoader(prepared, "train", T, B, seed=1)
    resumed.load_state_dict(state)
    for x_ref, y_ref in reference[37:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    other = TokenLoader(prepared, "train", 32, B, seed=1)
    with pytest.raises(ValueError, match="seq_len"):
        other.load_state_dict(state)


def test_eval_batches_are_fixed_and_rank_disjoint(prepared):
    T, B = 16, 4
    val = TokenLoader(prepared, "val", T, B, seed=0)
    first = val.eval_batches(5)
    assert len(first) == 5
    for _ in range(3):
        val.next_batch()
    again = TokenLoader(prepared, "val", T, B, seed=99).eval_batches(5)
    for (x1, y1), (x2, y2), (x3, y3) in zip(first, val.eval_batches(5), again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(x1, x3) and torch.equal(y1, y2) and torch.equal(y1, y3)
    assert len(val.eval_batches(1000)) == (N_VAL - 1) // T // B  # capped at the distinct windows available
    shards = [TokenLoader(prepared, "val", T, 2, rank=r, world_size=2).eval_batches(3) for r in range(2)]
    flat = [s for rank in shards for x, _ in rank for s in starts(x)]
    assert len(set(flat)) == len(flat)


def test_too_little_data_is_a_clear_error(prepared):
    with pytest.raises(ValueError, match=r"'val' split .* fewer than one global batch"):
        TokenLoader(prepared, "val", seq_len=256, batch_size=4)
