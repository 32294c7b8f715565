"""Tokenizers: byte-level (no files), a BPE trained on the corpus itself, and a hub tokenizer by name.

Every tokenizer has the same small interface, which is all the data pipeline, the trainer and the probe use:
  encode(str) -> list[int]        no special tokens added
  decode(list[int]) -> str        the end-of-document token is rendered as EOT_TEXT
  eot_id: int                     end-of-document token appended after every document
  vocab_size: int                 the model's embedding size (>= every id the tokenizer can produce)

`tokenizer_vocab_size(data_cfg)` answers the vocabulary size from the config alone (no data is read), so that
`experiments.resolve` can size the model before any data exists:
  byte    256 byte values + 1 end-of-document token = 257 (data.vocab_size, if set, pads it further)
  bpe     data.vocab_size (default 4096); the trained BPE never has more tokens than that
  hf:NAME the hub tokenizer's size (data.vocab_size, if set, must be >= it and pads it)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ultramem.config import ConfigError

if TYPE_CHECKING:
    from experiments.config import DataConfig

EOT_TEXT = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 byte values + the end-of-document token
DEFAULT_BPE_VOCAB = 4096
MIN_BPE_VOCAB = 257  # the 256-byte initial alphabet + the end-of-document token
BPE_TRAIN_MAX_CHARS = 200_000_000  # BPE merges are learned from at most this much training text
_HF_EOT_CANDIDATES = (EOT_TEXT, "<|end_of_text|>", "</s>", "<eos>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; id 256 ends a document."""

    name = "byte"
    eot_id = 256

    def __init__(self, vocab_size: int = BYTE_VOCAB):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(EOT_TEXT if i == self.eot_id else "")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A `tokenizers.Tokenizer` (a BPE trained here, or a hub tokenizer.json) behind the common interface."""

    def __init__(self, tok: Any, name: str, vocab_size: int, eot_id: int):
        self.tok, self.name, self.vocab_size, self.eot_id = tok, name, vocab_size, eot_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))


# ---- vocabulary size from the config alone ------------------------------------------------------------------


def tokenizer_kind(spec: str) -> str:
    """'byte' | 'bpe' | 'hf'; anything else is an error naming data.tokenizer."""
    if spec in ("byte", "bpe"):
        return spec
    if spec.startswith("hf:") and len(spec) > 3:
        return "hf"
    raise ConfigError(f"data.tokenizer: unknown tokenizer {spec!r}; allowed: byte | bpe | hf:<hub name> (e.g. hf:gpt2)")


def tokenizer_vocab_size(data_cfg: DataConfig) -> int:
    """The model's vocabulary size for this data config, without reading any data."""
    kind, requested = tokenizer_kind(data_cfg.tokenizer), data_cfg.vocab_size
    if kind == "byte":
        if requested is not None and requested < BYTE_VOCAB:
            raise ConfigError(f"data.vocab_size: {requested} is smaller than the byte tokenizer's {BYTE_VOCAB} ids "
                              f"(256 bytes + end-of-document); remove it or set it >= {BYTE_VOCAB}")
        return requested or BYTE_VOCAB
    if kind == "bpe":
        size = requested or DEFAULT_BPE_VOCAB
        if size < MIN_BPE_VOCAB:
            raise ConfigError(f"data.vocab_size: {size} is too small for a byte-level BPE (its alphabet is 256 "
                              f"bytes + the end-of-document token); use >= {MIN_BPE_VOCAB}")
        return size
    hub_size = load_hub_tokenizer(data_cfg.tokenizer[3:]).get_vocab_size(with_added_tokens=True)
    if requested is not None and requested < hub_size:
        raise ConfigError(f"data.vocab_size: {requested} is smaller than {data_cfg.tokenizer}'s vocabulary "
                          f"({hub_size}); remove it or set it >= {hub_size}")
    return requested or hub_size


# ---- construction -------------------------------------------------------------------------------------------


def load_hub_tokenizer(name: str) -> Any:
    """`tokenizer.json` of a hub model (cached by huggingface_hub; works offline once cached)."""
    # lazy: planning (`tokenizer_vocab_size` for byte/bpe) never loads the tokenizer libraries
    from huggingface_hub import hf_hub_download
    from tokenizers import Tokenizer

    try:
        path = hf_hub_download(name, "tokenizer.json")
    except Exception as err:  # offline, unknown repo, or no tokenizer.json: all fixable the same way
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise ConfigError(f"data.tokenizer='hf:{name}': could not get tokenizer.json from the Hugging Face hub"
                          f"{hint}: {type(err).__name__}: {err}. Use a reachable hub, a repo that has tokenizer.json, "
                          "or tokenizer: byte | bpe") from None
    return Tokenizer.from_file(path)


def hub_tokenizer(spec: str, vocab_size: int) -> HFTokenizer:
    tok = load_hub_tokenizer(spec[3:])
    return HFTokenizer(tok, spec, vocab_size, _find_eot(tok, spec))


def _find_eot(tok: Any, spec: str) -> int:
    for text in _HF_EOT_CANDIDATES:
        i = tok.token_to_id(text)
        if i is not None:
            return i
    raise ConfigError(f"data.tokenizer={spec!r}: the tokenizer has none of the end-of-document tokens "
                      f"{', '.join(_HF_EOT_CANDIDATES)}; use tokenizer: bpe or byte")


def train_bpe(texts: Iterator[str], vocab_size: int) -> HFTokenizer:
    """A GPT-2-style byte-level BPE learned from `texts`, with at most `vocab_size` tokens (EOT included).

    The 256-byte initial alphabet makes every string encodable; on a small corpus the trainer may stop with fewer
    merges than asked, so the tokenizer can be smaller than `vocab_size` but never larger.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # lazy: kept out of planning

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_capped(texts, BPE_TRAIN_MAX_CHARS), trainer=trainer)
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise RuntimeError(f"trained BPE has {tok.get_vocab_size()} tokens, more than data.vocab_size={vocab_size}")
    return HFTokenizer(tok, "bpe", vocab_size, tok.token_to_id(EOT_TEXT))


def _capped(texts: Iterator[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for t in texts:
        yield t
        seen += len(t)
        if seen >= max_chars:
            return


def load_tokenizer(meta: dict[str, Any], root: Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a prepared dataset was tokenised with (from its meta.json and tokenizer.json)."""
    spec, vocab = meta["tokenizer"], meta["vocab_size"]
    if spec == "byte":
        return ByteTokenizer(vocab)
    from tokenizers import Tokenizer  # lazy: kept out of planning and of byte-tokenised runs

    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    return HFTokenizer(tok, spec, vocab, meta["eot_id"])
