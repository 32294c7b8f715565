"""Read the records of an offline W&B run file (`offline-run-*/run-<id>.wandb`) for tests.

wandb >= 0.2x writes it from its Go core and ships no Python reader any more. The file is W&B's 7-byte header
(":W&B", a magic and a version) followed by LevelDB's log format (32 KiB blocks of records, each with a 7-byte
header: CRC32C, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4); every assembled payload is one
`wandb.proto.wandb_internal_pb2.Record`, parsed with wandb's own protobuf classes.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> Iterator[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, payload = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            yield record


def wait_for_exit(path: Path, timeout_s: float = 60.0) -> list[pb.Record]:
    """All records, once the run's `exit` record is written (wandb-core may flush after finish() returns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        recs = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def of_type(recs: list[pb.Record], kind: str) -> list:
    return [getattr(r, kind) for r in recs if r.WhichOneof("record_type") == kind]
