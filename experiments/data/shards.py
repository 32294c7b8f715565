"""Tokenise once into memory-mapped token shards, cached by content.

A prepared dataset is a folder `<cache>/tokens/<source name>-<tokenizer>-<key[:16]>/`:
  meta.json        tokenizer, vocab_size, eot_id, dtype, token and document counts per split, source, key, ...
  train.bin        every training document's tokens followed by the end-of-document token, one flat array
  val.bin          the same for the held-out documents (np.uint16 when vocab_size < 65536, else np.uint32)
  tokenizer.json   the trained BPE or the hub tokenizer (absent for the byte tokenizer)
  facts.json       the embedded corpus's facts (absent for other sources), read by the knowledge probe

`key` hashes everything that changes the tokens: the source's content (or, for local sources larger than
512 MiB, file sizes and mtimes; for hub datasets name/config/split), the tokenizer and its vocabulary size, the
split settings and CACHE_VERSION. A folder is built under a temporary name and renamed into place with
meta.json already inside, so a killed preparation never leaves a folder that looks complete; a file lock makes
concurrent preparations of the same data (e.g. the ranks of one DDP run) wait for one another and reuse it.

Documents are split by a hash of their index (is_val), so the split is the same for a streamed dataset of
unknown length and for any later reader (the probe uses it to know which fact mentions were trained on).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from experiments.data.loading import Source, load_documents, resolve_source
from experiments.data.tokenizers import (
    BYTE_VOCAB,
    ByteTokenizer,
    HFTokenizer,
    hub_tokenizer,
    load_tokenizer,
    tokenizer_kind,
    tokenizer_vocab_size,
    train_bpe,
)
from runfolder import atomic_write_json
from ultramem.config import ConfigError

if TYPE_CHECKING:
    from experiments.config import DataConfig

CACHE_VERSION = 1  # bump when the shard layout or the tokenisation rules change
SPLITS = ("train", "val")
_MAP_BATCH = 1000


@dataclass
class PreparedData:
    """A tokenised dataset on disk. `tokens(split)` is a read-only memmap of the split's flat token array."""

    root: Path
    meta: dict[str, Any] = field(repr=False)
    source_sha256: str | None = None  # the local source's SHA-256 (experiments.data.loading.Source.sha256)

    @cached_property
    def tokenizer(self) -> ByteTokenizer | HFTokenizer:
        return load_tokenizer(self.meta, self.root)

    @cached_property
    def facts(self) -> dict[str, Any] | None:
        """The embedded corpus's facts (experiments.data.corpus), or None for other sources."""
        if not self.meta.get("facts"):
            return None
        with open(self.root / self.meta["facts"]) as f:
            return json.load(f)

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def num_tokens(self, split: str) -> int:
        return self.meta["tokens"][split]

    def tokens(self, split: str) -> np.memmap:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return np.memmap(self.root / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r",
                         shape=(self.meta["tokens"][split],))


# ---- the split ----------------------------------------------------------------------------------------------


def is_val(index: np.ndarray | int, val_fraction: float) -> np.ndarray:
    """Whether document `index` is held out: splitmix64(index) / 2**64 < val_fraction (stable everywhere)."""
    z = np.asarray(index, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction


# ---- cache location and key ---------------------------------------------------------------------------------


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("ULTRAMEM_CACHE") or Path.home() / ".cache" / "ultramem"
    return Path(root).expanduser().resolve()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def cache_key(cfg: DataConfig, src: Source) -> str:
    spec = {
        "version": CACHE_VERSION,
        "source": src.fingerprint,
        "text_field": src.text_field,
        "max_documents": cfg.max_documents,
        "tokenizer": cfg.tokenizer,
        "vocab_size": tokenizer_vocab_size(cfg),
        "val_fraction": cfg.val_fraction,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def prepared_dir(cfg: DataConfig) -> tuple[Path, Source, str]:
    root = cache_root(cfg)
    src = resolve_source(cfg, root)
    key = cache_key(cfg, src)
    tok = cfg.tokenizer.replace("hf:", "hf-").replace("/", "--")
    tokens = root / "tokens"
    # content-addressed: the same data under another name (a copied file) finds the existing folder
    existing = [p for p in tokens.glob(f"*-{key[:16]}") if (p / "meta.json").exists()]
    return existing[0] if existing else tokens / f"{src.name}-{tok}-{key[:16]}", src, key


# ---- preparation --------------------------------------------------------------------------------------------


def prepare_data(data_cfg: DataConfig, progress: bool | None = None) -> PreparedData:
    """Tokenise `data_cfg`'s documents once into the shard cache and return them; later calls reuse the cache.

    progress: show progress bars (None: only when stderr is a terminal).
    """
    folder, src, key = prepared_dir(data_cfg)
    if (folder / "meta.json").exists():
        return _open(folder, src)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.parent / f".{key[:16]}.lock"))
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process preparing {folder}", file=sys.stderr)
        lock.acquire()
    try:
        if (folder / "meta.json").exists():
            return _open(folder, src)
        for stale in folder.parent.glob(f"{folder.name}.tmp-*"):  # left by a killed preparation
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            meta = _build(data_cfg, src, key, tmp, progress)
            atomic_write_json(tmp / "meta.json", meta)
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return _open(folder, src)


def _open(folder: Path, src: Source) -> PreparedData:
    with open(folder / "meta.json") as f:
        return PreparedData(folder, json.load(f), src.sha256)


def _build(cfg: DataConfig, src: Source, key: str, tmp: Path, progress: bool) -> dict[str, Any]:
    import datasets  # lazy: ~1 s, only when a cache is built (a cache hit never loads it)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork workers; each tokenises single-threaded
    started = time.time()
    vocab = tokenizer_vocab_size(cfg)
    with _progress_bars(progress):
        docs = load_documents(src, cfg, cache_root(cfg))
        streaming = isinstance(docs, datasets.IterableDataset)
        tokenizer = _make_tokenizer(cfg, vocab, docs, src.text_field)
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.save(tmp / "tokenizer.json")
        dtype = token_dtype(vocab)
        fn_kwargs = {"tokenizer": tokenizer, "text_field": src.text_field, "dtype": dtype.name,
                     "val_fraction": cfg.val_fraction}
        if streaming:  # one process, tokenised as the documents arrive
            chunks = _streamed_chunks(docs, fn_kwargs)
        else:
            (tmp / "map").mkdir()
            workers = min(cfg.num_proc, max(1, len(docs) // _MAP_BATCH))
            tokens = docs.map(_tokenize_batch, batched=True, batch_size=_MAP_BATCH, with_indices=True,
                              remove_columns=[src.text_field], fn_kwargs=fn_kwargs, desc="tokenizing",
                              num_proc=workers if workers > 1 else None,
                              cache_file_name=str(tmp / "map" / "tokens.arrow"))
            chunks = _mapped_chunks(tokens)
        counts = _write_splits(chunks, tmp, dtype, progress)
    shutil.rmtree(tmp / "map", ignore_errors=True)
    for split in SPLITS:
        if counts["documents"][split] == 0:
            raise ConfigError(f"data.source={cfg.source!r}: no document landed in the {split!r} split "
                              f"({sum(counts['documents'].values())} documents, data.val_fraction="
                              f"{cfg.val_fraction}); use more documents (a text file gives one per blank-line "
                              "separated paragraph) or change data.val_fraction")
    meta = {
        "version": CACHE_VERSION,
        "key": key,
        "source": src.description,
        "source_kind": src.kind,
        "source_sha256": src.sha256,
        "text_field": src.text_field,
        "tokenizer": cfg.tokenizer,
        "vocab_size": vocab,
        "tokenizer_vocab_size": _actual_vocab(tokenizer),
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
        "val_fraction": cfg.val_fraction,
        "max_documents": cfg.max_documents,
        **counts,
        "data_config": cfg.model_dump(mode="json"),
        "created_at": time.time(),
        "prepare_s": round(time.time() - started, 3),
        "facts": None,
    }
    if src.kind == "embedded":
        shutil.copyfile(Path(src.files[0]).parent / "facts.json", tmp / "facts.json")
        meta["facts"] = "facts.json"
        meta["embedded"] = json.loads(json.dumps(src.fingerprint))
    return meta


def _make_tokenizer(cfg: DataConfig, vocab: int, docs: Any, text_field: str) -> ByteTokenizer | HFTokenizer:
    kind = tokenizer_kind(cfg.tokenizer)
    if kind == "byte":
        return ByteTokenizer(vocab)
    if kind == "hf":
        return hub_tokenizer(cfg.tokenizer, vocab)
    return train_bpe(_train_texts(docs, text_field, cfg.val_fraction), vocab)


def _train_texts(docs: Any, text_field: str, val_fraction: float) -> Iterator[str]:
    """The training split's documents (BPE merges are learned without looking at validation text)."""
    index = 0
    for batch in docs.iter(batch_size=_MAP_BATCH):
        texts = batch[text_field]
        held = is_val(np.arange(index, index + len(texts)), val_fraction)
        index += len(texts)
        yield from (t for t, h in zip(texts, held, strict=True) if not h and t)


def _tokenize_batch(batch: dict[str, list], indices: list[int], tokenizer: Any, text_field: str, dtype: str,
                    val_fraction: float) -> dict[str, list]:
    """datasets.map worker: text -> token ids + end-of-document token; empty documents produce no tokens."""
    texts = [t or "" for t in batch[text_field]]
    encoded = tokenizer.encode_batch(texts)
    ids = [np.asarray(e + [tokenizer.eot_id], dtype=dtype) if t.strip() else np.zeros(0, dtype=dtype)
           for t, e in zip(texts, encoded, strict=True)]
    return {"ids": ids, "val": is_val(np.asarray(indices), val_fraction).tolist()}


Chunk = dict[str, tuple[np.ndarray, int]]  # split -> (its documents' tokens, one flat array; document count)


def _mapped_chunks(tokens: Any) -> Iterator[Chunk]:
    """Chunks of a tokenised `datasets.Dataset`, split without leaving Arrow."""
    import pyarrow.compute as pc  # lazy: only when a cache is built (with `datasets`)

    for table in tokens.with_format("arrow").iter(batch_size=_MAP_BATCH * 10):
        ids, held = table.column("ids").combine_chunks(), table.column("val").combine_chunks()
        nonempty = pc.greater(pc.list_value_length(ids), 0)
        chunk = {}
        for split, mask in (("val", held), ("train", pc.invert(held))):
            flat = pc.filter(ids, mask).flatten().to_numpy(zero_copy_only=False)
            chunk[split] = (flat, int(pc.sum(pc.filter(nonempty, mask)).as_py() or 0))
        yield chunk


def _streamed_chunks(docs: Any, fn_kwargs: dict[str, Any]) -> Iterator[Chunk]:
    """Chunks of a streamed `datasets.IterableDataset`, tokenised here."""
    index = 0
    for batch in docs.iter(batch_size=_MAP_BATCH):
        n = len(batch[fn_kwargs["text_field"]])
        out = _tokenize_batch(batch, list(range(index, index + n)), **fn_kwargs)
        index += n
        chunk = {}
        for split, held in (("val", True), ("train", False)):
            chosen = [ids for ids, v in zip(out["ids"], out["val"], strict=True) if v == held]
            flat = np.concatenate(chosen) if chosen else np.zeros(0, dtype=fn_kwargs["dtype"])
            chunk[split] = (flat, sum(len(c) > 0 for c in chosen))
        yield chunk


def _write_splits(chunks: Iterator[Chunk], tmp: Path, dtype: np.dtype, progress: bool) -> dict[str, Any]:
    """Append each chunk to train.bin / val.bin; returns token and document counts per split."""
    counts = {"tokens": dict.fromkeys(SPLITS, 0), "documents": dict.fromkeys(SPLITS, 0)}
    files = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}  # noqa: SIM115 (closed below)
    try:
        bar = tqdm(desc="writing shards", unit=" tok", unit_scale=True, disable=not progress)
        for chunk in chunks:
            for split, (flat, docs) in chunk.items():
                files[split].write(flat.astype(dtype, copy=False).tobytes())
                counts["tokens"][split] += len(flat)
                counts["documents"][split] += docs
                bar.update(len(flat))
        bar.close()
    finally:
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
    return counts


def _actual_vocab(tokenizer: ByteTokenizer | HFTokenizer) -> int:
    if isinstance(tokenizer, ByteTokenizer):
        return BYTE_VOCAB
    return tokenizer.tok.get_vocab_size(with_added_tokens=True)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from datasets.utils import logging as ds_logging  # lazy: only when a cache is built

    was = ds_logging.is_progress_bar_enabled()
    (ds_logging.enable_progress_bar if enabled else ds_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (ds_logging.enable_progress_bar if was else ds_logging.disable_progress_bar)()


def describe(prepared: PreparedData) -> str:
    m = prepared.meta
    return (f"{prepared.root}\n  source     {m['source']}\n  tokenizer  {m['tokenizer']} (vocab {m['vocab_size']}, "
            f"eot {m['eot_id']}, {m['dtype']})\n  tokens     train {m['tokens']['train']:,}  val "
            f"{m['tokens']['val']:,}\n  documents  train {m['documents']['train']:,}  val {m['documents']['val']:,}"
            + (f"\n  sha256     {prepared.source_sha256}" if prepared.source_sha256 else "")
            + (f"\n  facts      {m['facts']}" if m.get("facts") else ""))

