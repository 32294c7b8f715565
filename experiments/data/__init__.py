"""Data: documents through Hugging Face `datasets`, tokenizers, the token-shard cache, the embedded knowledge
corpus and its probe. Contract (docs/architecture.md, docs/data.md):

    tokenizer_vocab_size(data_cfg) -> int              # from the config alone; no data, no torch
    prepared = prepare_data(data_cfg)                  # tokenise once into a content-addressed shard cache
    prepared.meta, prepared.root, prepared.tokenizer   # meta.json, cache folder, encode/decode
    loader = TokenLoader(prepared, split="train", seq_len=T, batch_size=B, seed=s, rank=r, world_size=W)
    x, y = loader.next_batch()                         # [B, T] int64 each, y = x shifted by one
    loader.eval_batches(n)                             # fixed list of (x, y), identical on every call
    loader.state_dict() / loader.load_state_dict(sd)   # exact resume
    knowledge_probe(model, prepared, device)           # fact recall on the embedded corpus, else None

Names are imported on first use, so `import experiments.data` stays cheap (resolve must not pull in torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "tokenizer_vocab_size": "experiments.data.tokenizers",
    "ByteTokenizer": "experiments.data.tokenizers",
    "prepare_data": "experiments.data.shards",
    "PreparedData": "experiments.data.shards",
    "TokenLoader": "experiments.data.loader",
    "knowledge_probe": "experiments.data.probe",
    "CorpusOptions": "experiments.data.corpus",
    "corpus_options": "experiments.data.corpus",
    "generate_corpus": "experiments.data.corpus",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'experiments.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
