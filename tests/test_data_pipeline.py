"""Data pipeline: sources through `datasets`, tokenizers, the token-shard cache (experiments/data)."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments.config import DataConfig
from experiments.data import ByteTokenizer, prepare_data, tokenizer_vocab_size
from experiments.data.shards import is_val, prepared_dir
from experiments.data.tokenizers import EOT_TEXT
from ultramem.config import ConfigError


def paragraphs(text: str) -> list[str]:
    """Independent reference for the text builder's documents: the non-empty pieces between blank lines."""
    return [p for p in text.split("\n\n") if p]


def split_docs(prepared, split: str) -> list[str]:
    """Decode a split's flat token array back into documents (split at every end-of-document token)."""
    ids = np.asarray(prepared.tokens(split))
    eot = prepared.meta["eot_id"]
    ends = np.flatnonzero(ids == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [prepared.tokenizer.decode(ids[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def interleave(prepared, n: int) -> list[str]:
    """Documents in source order, rebuilt from the two splits with the documented split rule."""
    train, val = iter(split_docs(prepared, "train")), iter(split_docs(prepared, "val"))
    return [next(val) if is_val(i, prepared.meta["val_fraction"]) else next(train) for i in range(n)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def shakespeare_byte(shakespeare_path, cache):
    return prepare_data(DataConfig(source=str(shakespeare_path), cache_dir=str(cache), num_proc=2), progress=False)


def test_byte_tokenizer_round_trip_and_vocab():
    tok = ByteTokenizer()
    text = "naïve café, 東京 — ok\n"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([104, 105, tok.eot_id, 104]) == "hi" + EOT_TEXT + "h"
    assert tokenizer_vocab_size(DataConfig()) == 257
    assert tokenizer_vocab_size(DataConfig(tokenizer="bpe", vocab_size=3000)) == 3000
    with pytest.raises(ConfigError, match="data.vocab_size"):
        tokenizer_vocab_size(DataConfig(tokenizer="bpe", vocab_size=100))
    with pytest.raises(ConfigError, match="data.tokenizer"):
        tokenizer_vocab_size(DataConfig(tokenizer="sentencepiece"))


def test_shakespeare_byte_shards_hold_every_paragraph(shakespeare_byte, shakespeare_path):
    docs = paragraphs(shakespeare_path.read_text())
    meta = shakespeare_byte.meta
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 257 and meta["dtype"] == "uint16"
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(docs)
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(len(d.encode()) + 1 for d in docs)
    assert 0.03 < meta["documents"]["val"] / len(docs) < 0.07  # val_fraction 0.05
    assert interleave(shakespeare_byte, len(docs)) == docs


def test_shakespeare_bpe_respects_vocab_and_round_trips(shakespeare_path, cache):
    cfg = DataConfig(source=str(shakespeare_path), tokenizer="bpe", vocab_size=512, cache_dir=str(cache), num_proc=1)
    prepared = prepare_data(cfg, progress=False)
    assert (prepared.root / "tokenizer.json").exists()
    assert prepared.meta["vocab_size"] == 512 and prepared.meta["tokenizer_vocab_size"] <= 512
    assert int(np.asarray(prepared.tokens("train")).max()) < 512
    docs = paragraphs(shakespeare_path.read_text())
    # BPE compresses English: fewer tokens than bytes
    assert prepared.meta["tokens"]["train"] + prepared.meta["tokens"]["val"] < 0.6 * sum(len(d) for d in docs)
    assert interleave(prepared, len(docs)) == docs
    tok = prepared.tokenizer
    for text in ("ROMEO:\nBut soft, what light through yonder window breaks?", "naïve café 東京"):
        assert tok.decode(tok.encode(text)) == text


def test_second_prepare_reuses_the_cache(shakespeare_byte, shakespeare_path, cache, tmp_path):
    before = (shakespeare_byte.root / "train.bin").stat().st_mtime_ns
    again = prepare_data(DataConfig(source=str(shakespeare_path), cache_dir=str(cache)), progress=False)
    assert again.root == shakespeare_byte.root
    assert again.meta["created_at"] == shakespeare_byte.meta["created_at"]
    assert (again.root / "train.bin").stat().st_mtime_ns == before
    # the key is the content: a copy elsewhere reuses the shards, an edited copy does not
    copy = tmp_path / "copy.txt"
    shutil.copyfile(shakespeare_path, copy)
    assert prepared_dir(DataConfig(source=str(copy), cache_dir=str(cache)))[0] == shakespeare_byte.root
    copy.write_text(shakespeare_path.read_text() + "\n\nEPILOGUE:\nA new speech.\n")
    assert prepared_dir(DataConfig(source=str(copy), cache_dir=str(cache)))[0] != shakespeare_byte.root
    # so does a resolved config that spells out the byte vocabulary
    resolved = DataConfig(source=str(shakespeare_path), cache_dir=str(cache), vocab_size=257)
    assert prepared_dir(resolved)[0] == shakespeare_byte.root


def test_num_proc_does_not_change_the_tokens(shakespeare_byte, shakespeare_path, tmp_path):
    single = prepare_data(DataConfig(source=str(shakespeare_path), cache_dir=str(tmp_path), num_proc=1),
                          progress=False)
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(single.tokens(split)), np.asarray(shakespeare_byte.tokens(split)))


def test_failed_preparation_leaves_no_cache(tmp_path, monkeypatch):
    from experiments.data import shards

    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(f"document number {i} with some words" for i in range(60)))
    cfg = DataConfig(source=str(src), cache_dir=str(tmp_path / "cache"), num_proc=1, val_fraction=0.2)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_write_splits", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, progress=False)
    folder = prepared_dir(cfg)[0]
    assert not folder.exists()
    assert not list(folder.parent.glob(f"{folder.name}.tmp-*"))
    monkeypatch.undo()
    # a stale temporary folder from a SIGKILLed run is cleaned up and does not confuse the next preparation
    (folder.parent / f"{folder.name}.tmp-999999").mkdir()
    prepared = prepare_data(cfg, progress=False)
    assert prepared.meta["documents"]["train"] + prepared.meta["documents"]["val"] == 60
    assert not list(folder.parent.glob(f"{folder.name}.tmp-*"))


def _prepare_in_child(args):
    source, cache = args
    prepared = prepare_data(DataConfig(source=source, cache_dir=cache, num_proc=1), progress=False)
    return str(prepared.root), prepared.meta["created_at"]


def test_concurrent_preparations_share_one_result(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"row {i}: " + "lorem ipsum " * 20}) + "\n" for i in range(400)))
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_prepare_in_child, [(str(src), str(tmp_path / "cache"))] * 2)
    assert results[0] == results[1]  # same folder, built once (same creation time)


def test_json_jsonl_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document {i}: the quick brown fox number {i}." for i in range(80)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in docs]))
    pq.write_table(pa.table({"body": docs, "n": list(range(80))}), tmp_path / "c.parquet")
    for name in ("a.jsonl", "b.json", "c.parquet"):
        cfg = DataConfig(source=str(tmp_path / name), text_field="body", cache_dir=str(tmp_path / "cache"),
                         num_proc=1, val_fraction=0.2)
        prepared = prepare_data(cfg, progress=False)
        assert interleave(prepared, len(docs)) == docs, name
    with pytest.raises(ConfigError, match="data.text_field='text'.*columns: body"):
        prepare_data(DataConfig(source=str(tmp_path / "c.parquet"), cache_dir=str(tmp_path / "cache")))


def test_max_documents_caps_the_source(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(100)))
    prepared = prepare_data(DataConfig(source=str(tmp_path / "d.jsonl"), max_documents=40, val_fraction=0.25,
                                       cache_dir=str(tmp_path / "cache"), num_proc=1), progress=False)
    assert interleave(prepared, 40) == [f"doc {i}" for i in range(40)]


def test_errors_name_the_field(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"data.source='missing.txt': no such file"):
        prepare_data(DataConfig(source="missing.txt", cache_dir=cache))
    with pytest.raises(ConfigError, match=r"write 'hf:roneneldan/TinyStories'"):
        prepare_data(DataConfig(source="roneneldan/TinyStories", cache_dir=cache))
    (tmp_path / "one.txt").write_text("a single paragraph")
    with pytest.raises(ConfigError, match="no document landed"):
        prepare_data(DataConfig(source=str(tmp_path / "one.txt"), cache_dir=cache, num_proc=1), progress=False)


def test_hub_sources_fail_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "cache")
    for streaming in (False, True):
        with pytest.raises(ConfigError, match=r"data.source='hf:roneneldan/TinyStories'.*HF_HUB_OFFLINE=1"):
            prepare_data(DataConfig(source="hf:roneneldan/TinyStories", streaming=streaming, cache_dir=cache))
    with pytest.raises(ConfigError, match=r"data.tokenizer='hf:gpt2'.*HF_HUB_OFFLINE=1"):
        tokenizer_vocab_size(DataConfig(tokenizer="hf:gpt2"))


def test_default_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    from experiments.data.shards import cache_root

    monkeypatch.setenv("ULTRAMEM_CACHE", str(tmp_path / "envcache"))
    assert cache_root(DataConfig()) == (tmp_path / "envcache").resolve()
    assert cache_root(DataConfig(cache_dir=str(tmp_path / "x"))) == (tmp_path / "x").resolve()


def test_streaming_gives_the_same_tokens(shakespeare_byte, shakespeare_path, tmp_path):
    """The streaming path (IterableDataset: lazy map, take, BPE from an iterator) on local files, offline."""
    streamed = prepare_data(DataConfig(source=str(shakespeare_path), streaming=True, cache_dir=str(tmp_path)),
                            progress=False)
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(streamed.tokens(split)), np.asarray(shakespeare_byte.tokens(split)))
    capped = dict(source=str(shakespeare_path), tokenizer="bpe", vocab_size=300, max_documents=500)
    lazy = prepare_data(DataConfig(**capped, streaming=True, cache_dir=str(tmp_path / "a")), progress=False)
    eager = prepare_data(DataConfig(**capped, cache_dir=str(tmp_path / "b"), num_proc=1), progress=False)
    assert lazy.meta["documents"] == eager.meta["documents"]
    assert sum(lazy.meta["documents"].values()) == 500
    assert np.array_equal(np.asarray(lazy.tokens("train")), np.asarray(eager.tokens("train")))
