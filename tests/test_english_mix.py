"""english_mix as a data source (issue 26 item 1), on a ~300 KB slice (never the whole 49 MB file): the token cache
records the corpus's SHA-256, later preparations take the content hashes from their memo instead of re-reading the
file, a run's final.json carries the SHA-256, and a missing corpus path is exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.config import DataConfig
from experiments.data import prepare_data
from experiments.data.shards import prepared_dir

REPO = Path(__file__).resolve().parents[1]
SLICE_BYTES = 300_000


@pytest.fixture(scope="module")
def mix_slice(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ~300 KB of english_mix.txt, cut at a document boundary (a blank line)."""
    with open(shared / "data" / "english_mix.txt", "rb") as f:
        head = f.read(SLICE_BYTES)
    head = head[: head.rindex(b"\n\n") + 1]
    path = tmp_path_factory.mktemp("mix") / "english_mix_slice.txt"
    path.write_bytes(head)
    return path


def test_the_cache_records_the_sha256_and_splits_documents(mix_slice, tmp_path):
    prepared = prepare_data(DataConfig(source=str(mix_slice), cache_dir=str(tmp_path)), progress=False)
    want = hashlib.sha256(mix_slice.read_bytes()).hexdigest()
    assert prepared.source_sha256 == want and prepared.meta["source_sha256"] == want
    text = mix_slice.read_text()
    docs = [d for d in text.split("\n\n") if d.strip()]
    assert sum(prepared.meta["documents"].values()) == len(docs)
    # byte tokens: every byte of every document (the last keeps the file's final newline) plus one end-of-document
    # token each
    assert sum(prepared.meta["tokens"].values()) == sum(len(d.encode()) for d in docs) + len(docs)
    assert 0.02 < prepared.meta["documents"]["val"] / len(docs) < 0.09  # val_fraction 0.05 of ~1,000 documents


def test_a_later_preparation_takes_the_hashes_from_the_memo(mix_slice, tmp_path):
    """The memo (path, size, mtime -> hashes) is what a second preparation uses: a memo altered by hand moves the
    cache key, which re-reading the file would not; touching the file makes it hash the file again."""
    cfg = DataConfig(source=str(mix_slice), cache_dir=str(tmp_path))
    first = prepare_data(cfg, progress=False)
    (memo,) = (tmp_path / "fingerprints").glob("*.json")
    record = json.loads(memo.read_text())
    st = mix_slice.stat()
    assert (record["path"], record["size"], record["mtime_ns"]) == (str(mix_slice), st.st_size, st.st_mtime_ns)
    assert record["blake2b"] == hashlib.blake2b(mix_slice.read_bytes(), digest_size=16).hexdigest()
    assert prepare_data(cfg, progress=False).root == first.root
    memo.write_text(json.dumps({**record, "blake2b": "0" * 32}))
    assert prepared_dir(cfg)[0] != first.root  # the memo, not the file, keyed the lookup
    os.utime(mix_slice, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert prepared_dir(cfg)[0] == first.root  # a changed mtime: hashed again, memo rewritten
    assert json.loads(memo.read_text())["blake2b"] == record["blake2b"]


def ultramem(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "ULTRAMEM_CACHE": str(cwd / "cache")})


@pytest.mark.slow
def test_a_run_records_the_corpus_sha256(mix_slice, tmp_path):
    out = ultramem("train", "--preset", "dense-s1", "--data", str(mix_slice), "--steps", "3", "--set",
                   "train.batch_size=2", "--set", "train.seq_len=32", "--set", "train.eval_batches=1",
                   "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["data_sha256"] == hashlib.sha256(mix_slice.read_bytes()).hexdigest()
    assert final["data_source"] == str(mix_slice)
    assert "sha256" not in (tmp_path / "run" / "config.yaml").read_text()  # not in the config: run ids unchanged


def test_a_missing_corpus_is_exit_2(tmp_path):
    out = ultramem("data", "prepare", str(tmp_path / "english_mix.txt"), cwd=tmp_path)
    assert out.returncode == 2
    assert "english_mix.txt': no such file, folder or glob match" in out.stderr
