"""Text documents from any source, always through Hugging Face `datasets`.

`data.source` is one of
  embedded          the generated knowledge corpus (experiments.data.corpus), written once to a jsonl file in the
                    cache and read back with load_dataset("json")
  a path            a file, a folder (every .txt/.md/.json/.jsonl/.parquet file in it) or a glob; text files give one
                    document per paragraph (blank-line separated; tinyshakespeare: one speech per document),
                    json/jsonl/parquet one document per row (column data.text_field)
  hf:<name>         a hub dataset (data.hf_config, data.hf_split)
data.streaming reads documents lazily (hub: without downloading the dataset; local: without converting it to
Arrow first); tokenisation is then single-process. The tokens are the same either way.

`resolve_source` is fast and says what the data is (its fingerprint keys the token cache); `load_documents`
reads it.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.data.corpus import corpus_fingerprint, corpus_options, ensure_corpus_file
from runfolder import atomic_write_json
from ultramem.config import ConfigError

if TYPE_CHECKING:
    from experiments.config import DataConfig

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".ndjson": "json",
           ".parquet": "parquet"}
CONTENT_HASH_MAX_BYTES = 512 << 20  # above this, local files are fingerprinted by (size, mtime) instead of content


@dataclass
class Source:
    kind: str  # embedded | local | hub
    name: str  # short human-readable name for the cache folder
    description: str  # what meta.json records as `source`
    fingerprint: dict[str, Any]  # everything about the source that changes its documents
    builder: str | None = None  # text | json | parquet for local files
    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    sha256: str | None = None  # local sources: the file's SHA-256 (several files: of their sorted "sha256  name"
    #                            lines, as `sha256sum` prints them); None above CONTENT_HASH_MAX_BYTES and elsewhere


def resolve_source(cfg: DataConfig, cache: Path) -> Source:
    src = cfg.source.strip()
    if src == "embedded":
        opts = corpus_options(cfg.embedded)
        fp = corpus_fingerprint(opts)
        return Source("embedded", "embedded", f"embedded corpus {opts.describe()}", fp, "json",
                      [str(cache / "corpus" / f"embedded-{_short(fp)}" / "corpus.jsonl")])
    if src.startswith("hf:"):
        name = src[3:]
        if not name:
            raise ConfigError("data.source='hf:': give a hub dataset name, e.g. hf:roneneldan/TinyStories")
        fp = {"hub": name, "config": cfg.hf_config, "split": cfg.hf_split}
        return Source("hub", name.replace("/", "--"), src, fp, text_field=cfg.text_field)
    files = _expand_local(src)
    builder = _builder(files, cfg.format)
    hashes = _file_fingerprints(files, cache)
    fp = {"files": [h if isinstance(h, list) else h["blake2b"] for h in hashes], "builder": builder,
          "sample_by": "paragraph" if builder == "text" else None}
    stem = Path(files[0]).stem if len(files) == 1 else Path(src.rstrip("/*")).name or "files"
    return Source("local", stem, os.path.abspath(src), fp, builder, files, cfg.text_field,
                  _sources_sha256(files, hashes))


def _expand_local(src: str) -> list[str]:
    path = Path(src).expanduser()
    if path.is_file():
        return [str(path.resolve())]
    if path.is_dir():
        found = sorted(str(p.resolve()) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        if not found:
            raise ConfigError(f"data.source={src!r}: the folder has no {'/'.join(sorted(FORMATS))} files")
        return found
    matches = sorted(str(Path(p).resolve()) for p in glob.glob(os.path.expanduser(src), recursive=True)
                     if Path(p).is_file())
    if matches:
        return matches
    hubby = src.count("/") == 1 and not src.startswith((".", "/", "~")) and not Path(src).suffix
    hint = f" (for a hub dataset write 'hf:{src}')" if hubby else ""
    raise ConfigError(f"data.source={src!r}: no such file, folder or glob match{hint}; allowed: 'embedded', a path "
                      "to .txt/.md/.json/.jsonl/.parquet files, or 'hf:<dataset>'")


def _builder(files: list[str], fmt: str) -> str:
    if fmt != "auto":
        return "json" if fmt == "jsonl" else fmt
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix.lower() not in FORMATS)
        raise ConfigError(f"data.format='auto' cannot tell the format of {bad}; set data.format: text | json | "
                          "jsonl | parquet")
    if len(kinds) > 1:
        raise ConfigError(f"data.source mixes formats ({', '.join(sorted(kinds))}); point it at one kind of file "
                          "or set data.format")
    return kinds.pop()


def _file_fingerprints(files: list[str], cache: Path) -> list[Any]:
    """Per file {blake2b, sha256} of its content (so a copied or touched file reuses its tokens), remembered in
    `<cache>/fingerprints/` by (path, size, mtime) so that a later run does not re-read a large corpus; for sources
    above CONTENT_HASH_MAX_BYTES, [path, size, mtime] instead (never read)."""
    if sum(os.path.getsize(f) for f in files) > CONTENT_HASH_MAX_BYTES:
        return [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    return [_content_hashes(f, cache) for f in files]


def _content_hashes(path: str, cache: Path) -> dict[str, str]:
    """{blake2b (16 bytes), sha256} of one file, from its memo when size and mtime still match, else read once."""
    st = os.stat(path)
    stamp = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = cache / "fingerprints" / f"{hashlib.sha256(path.encode()).hexdigest()[:24]}.json"
    try:
        with open(memo) as fh:
            known = json.load(fh)
        if {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("blake2b"), str):
            return {"blake2b": known["blake2b"], "sha256": known["sha256"]}
    except (OSError, ValueError):
        pass  # no memo yet, or an unreadable one: hash the file and write it again
    b2, sha = hashlib.blake2b(digest_size=16), hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda fh=fh: fh.read(8 << 20), b""):
            b2.update(chunk)
            sha.update(chunk)
    out = {"blake2b": b2.hexdigest(), "sha256": sha.hexdigest()}
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo, {**stamp, **out})
    except OSError:
        pass  # a read-only cache only costs the re-read next time
    return out


def _sources_sha256(files: list[str], hashes: list[Any]) -> str | None:
    """The SHA-256 a result records for its corpus: the file's own, or (several files) that of the `sha256sum`
    listing of their sorted names; None for sources fingerprinted by size and mtime."""
    if any(isinstance(h, list) for h in hashes):
        return None
    if len(files) == 1:
        return hashes[0]["sha256"]
    listing = "".join(f"{h['sha256']}  {os.path.basename(f)}\n" for f, h in sorted(zip(files, hashes, strict=True)))
    return hashlib.sha256(listing.encode()).hexdigest()


def _short(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


# ---- reading ------------------------------------------------------------------------------------------------


def check_local_files(src: Source, cfg: DataConfig) -> None:
    """Refuse what `datasets` would only report as "DatasetGenerationError: An error occurred while generating the
    dataset": a text file that is not UTF-8, and a source whose files are all empty (or, for text, blank)."""
    blank = []
    for f in src.files:
        if os.path.getsize(f) == 0:
            blank.append(f"{f} is empty")
        elif src.builder == "text" and not _has_text(f, cfg):
            blank.append(f"{f} has no text lines (only blanks)")
    if blank and len(blank) == len(src.files):
        what = blank[0] if len(blank) == 1 else f"all {len(blank)} files are empty or blank ({blank[0]}, ...)"
        raise ConfigError(f"data.source={cfg.source!r}: {what}; point data.source at a file with text (a .txt "
                          "file gives one document per blank-line separated paragraph)")


def _has_text(path: str, cfg: DataConfig) -> bool:
    """Whether a text file holds a non-blank line; ConfigError naming the file if it is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    found, offset = False, 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ConfigError(
                    f"data.source={cfg.source!r}: {path} is not UTF-8 text (byte {offset - pending + err.start:,} "
                    f"cannot be decoded: {err.reason}); convert it (e.g. `iconv -f latin1 -t utf-8`) or point "
                    "data.source at a text file (json/jsonl/parquet need data.format or their extension)") from None
            found = found or bool(text.strip())
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ConfigError(f"data.source={cfg.source!r}: {path} is not UTF-8 text (it ends inside a multi-byte "
                              "character: a truncated file?); convert or repair it") from None
    return found


def load_documents(src: Source, cfg: DataConfig, cache: Path) -> Any:
    """A `datasets.Dataset` (or `IterableDataset` when streaming) with the documents in column `src.text_field`."""
    import datasets  # lazy: ~1 s; `experiments.data` stays cheap until documents are loaded

    hf_cache = str(cache / "hf")
    if src.kind == "embedded":
        ensure_corpus_file(cfg.embedded, Path(src.files[0]))
    if src.kind == "hub":
        try:
            ds = datasets.load_dataset(src.fingerprint["hub"], src.fingerprint["config"], split=cfg.hf_split,
                                       streaming=cfg.streaming, cache_dir=hf_cache)
        except Exception as err:  # offline, unknown name, wrong config/split: the user fixes all in data.*
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            hint = "HF_HUB_OFFLINE=1 is set, so the hub cannot be reached; " if offline else ""
            raise ConfigError(f"data.source={cfg.source!r}: could not load the hub dataset "
                              f"(config {cfg.hf_config!r}, split {cfg.hf_split!r}): {type(err).__name__}: {err}. "
                              f"{hint}check data.source / data.hf_config / data.hf_split, or use a local file or "
                              "source: embedded") from None
    else:
        if src.kind == "local":
            check_local_files(src, cfg)
        kwargs = {"sample_by": "paragraph"} if src.builder == "text" else {}
        try:
            ds = datasets.load_dataset(src.builder, data_files={"train": src.files}, split="train",
                                       streaming=cfg.streaming, cache_dir=hf_cache, **kwargs)
        except Exception as err:
            raise ConfigError(f"data.source={cfg.source!r}: could not read {len(src.files)} file(s) as "
                              f"{src.builder}: {type(err).__name__}: {err}") from None
    columns = ds.column_names
    if columns is not None and src.text_field not in columns:
        raise ConfigError(f"data.text_field={src.text_field!r}: no such column in {cfg.source!r}; columns: "
                          f"{', '.join(columns)}")
    if columns is not None and len(columns) > 1:
        ds = ds.select_columns([src.text_field])
    if cfg.max_documents is not None:
        if isinstance(ds, datasets.IterableDataset):
            ds = ds.take(cfg.max_documents)
        else:
            ds = ds.select(range(min(cfg.max_documents, len(ds))))
    return ds
