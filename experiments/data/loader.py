"""Batches of token windows from a prepared split: deterministic, rank-disjoint and exactly resumable.

Train split: each epoch cuts the flat token array into non-overlapping windows of seq_len + 1 tokens, starting
at an offset in [0, seq_len) drawn for that epoch, and permutes them; both draws are seeded by (seed, epoch).
Optimizer step k consumes windows [k*B*W, (k+1)*B*W) of the permutation (B = batch_size per rank, W =
world_size) and rank r takes the r-th block of B, so ranks never share a window and no window repeats within
an epoch. The position in the stream, (epoch, cursor), is the whole state: saving it and loading it into a new
loader replays the same batches.

Val split: windows in order from offset 0, never shuffled, so `eval_batches(n)` is the same list on every call
and eval losses are comparable across steps and runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from experiments.data.shards import SPLITS, PreparedData
from ultramem.config import ConfigError


class TokenLoader:
    def __init__(self, prepared: PreparedData, split: str = "train", seq_len: int = 256, batch_size: int = 8,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        self.prepared, self.split, self.seq_len, self.batch_size = prepared, split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_tokens = prepared.num_tokens(split)
        fewest = (self.num_tokens - seq_len) // seq_len  # windows at the largest offset, seq_len - 1
        if fewest < batch_size * world_size:  # a ConfigError (exit 2: retrying cannot help), naming the data
            source = prepared.meta.get("source", prepared.root)
            raise ConfigError(
                f"data.source {source}: the {split!r} split has {self.num_tokens:,} tokens, fewer than one global "
                f"batch of {batch_size * world_size} x (seq_len {seq_len} + 1) (token cache {prepared.root}); lower "
                "train.seq_len or train.batch_size, or use more data"
                + (" (or a larger data.val_fraction)" if split == "val" else ""))
        self.epoch, self.cursor = 0, 0
        self._plan()
        self._eval: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def shuffle(self) -> bool:
        return self.split == "train"

    def _plan(self) -> None:
        """This epoch's window offset and order."""
        T = self.seq_len
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            self.offset = int(rng.integers(T))
            n = (self.num_tokens - 1 - self.offset) // T
            self.order = rng.permutation(n)
        else:
            self.offset = 0
            self.order = np.arange((self.num_tokens - 1) // T)

    def _read(self, windows: np.ndarray, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        data = self.prepared.tokens(self.split)  # re-mapped per batch, as nanoGPT, so pages are not held forever
        starts = offset + windows.astype(np.int64) * T
        buf = torch.from_numpy(np.stack([data[s:s + T + 1] for s in starts]).astype(np.int64))  # [B, T+1]
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # x, y: [B, T]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each [batch_size, seq_len] int64 on CPU; y is x shifted left by one token."""
        B, W = self.batch_size, self.world_size
        if self.cursor + B * W > len(self.order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._plan()
        lo = self.cursor + self.rank * B
        self.cursor += B * W
        return self._read(self.order[lo:lo + B], self.offset)

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first min(n, available) fixed batches of this split, in order, sharded by rank; the same each call."""
        B, W = self.batch_size, self.world_size
        windows = (self.num_tokens - 1) // self.seq_len
        count = min(n, windows // (B * W))
        if self._eval is None or len(self._eval) < count:
            self._eval = [self._read(np.arange((k * W + self.rank) * B, (k * W + self.rank + 1) * B), 0)
                          for k in range(count)]
        return self._eval[:count]

    def state_dict(self) -> dict[str, Any]:
        return {"split": self.split, "seed": self.seed, "seq_len": self.seq_len, "epoch": self.epoch,
                "cursor": self.cursor, "num_tokens": self.num_tokens, "data_key": self.prepared.meta["key"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for k in ("split", "seed", "seq_len", "num_tokens", "data_key"):
            if state[k] != mine[k]:
                raise ValueError(f"cannot resume the data loader: the checkpoint has {k}={state[k]!r}, this loader "
                                 f"{k}={mine[k]!r} (the data, seed or sequence length changed since the checkpoint)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._plan()
