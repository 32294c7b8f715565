"""Prepare token shards, and write or describe the embedded corpus (docs/data.md).

  ultramem data prepare CONFIG.yaml                     the data block of a run config
  ultramem data prepare SOURCE [--set tokenizer=bpe]    a file/folder/glob, 'embedded' or 'hf:<dataset>'
  ultramem data corpus --out corpus.txt                 the embedded corpus as text (+ corpus.facts.json)
  ultramem data corpus --stats [--set people=5000]      its size, token count and entropy

--set keys are fields of the data block (docs/data.md), e.g. tokenizer=bpe, vocab_size=2048, embedded.people=500
for `prepare`, and corpus options (people, attributes, repetitions, stories, seed) for `corpus`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ultramem.config import ConfigError, deep_merge

HELP = "prepare token shards; write or describe the embedded corpus"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="{prepare,corpus}")
    prep = sub.add_parser("prepare", help="tokenise a source once into the shard cache (reused by training)",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_argument("target", metavar="CONFIG_OR_SOURCE",
                      help="a run YAML (its data block is used) or a data source ('embedded', a path, 'hf:NAME')")
    prep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a data field, e.g. --set tokenizer=bpe --set vocab_size=2048 (repeatable)")
    prep.add_argument("--json", action="store_true", help="print meta.json instead of a summary")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    corpus = sub.add_parser("corpus", help="write or describe the embedded corpus",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus.add_argument("--out", help="write the corpus here: .jsonl (one {'text': ...} per line) or text "
                                      "(documents separated by blank lines); facts go to <stem>.facts.json")
    corpus.add_argument("--stats", action="store_true", help="print size, token count and entropy")
    corpus.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="corpus option, e.g. --set people=5000 --set seed=1 (repeatable)")


def run(args: argparse.Namespace) -> int:
    return _prepare(args) if args.data_command == "prepare" else _corpus(args)


def _data_config(target: str, overrides: list[str]):
    # lazy: pydantic and the run config stay out of `ultramem --help` (cli/__init__.py)
    from pydantic import ValidationError

    from experiments.config import DataConfig, format_validation_error, load_yaml, parse_set

    is_yaml = target.endswith((".yaml", ".yml"))
    base = load_yaml(target).get("data", {}) if is_yaml else {"source": target}
    where = f"{target} (data)" if is_yaml else "command line"
    if not isinstance(base, dict):
        raise ConfigError(f"{target}: 'data' must be a mapping")
    try:
        return DataConfig.model_validate(deep_merge(base, parse_set(overrides)))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where).replace("\n  ", "\n  data.")) from None


def _prepare(args: argparse.Namespace) -> int:
    # lazy: tokenizers, datasets and numpy load only when preparing
    from experiments.data import prepare_data
    from experiments.data.shards import describe

    cfg = _data_config(args.target, args.overrides)
    prepared = prepare_data(cfg, progress=False if args.quiet else None)
    print(json.dumps(prepared.meta, indent=2) if args.json else describe(prepared))
    return 0


def _corpus(args: argparse.Namespace) -> int:
    # lazy: pydantic and yaml stay out of `ultramem --help` (cli/__init__.py)
    from experiments.config import parse_set
    from experiments.data.corpus import corpus_options, corpus_stats, generate_corpus
    from runfolder import atomic_write_text

    texts, facts = generate_corpus(corpus_options(parse_set(args.overrides)))
    if args.out:
        out = Path(args.out)
        body = ("".join(json.dumps({"text": t}) + "\n" for t in texts) if out.suffix == ".jsonl"
                else "\n\n".join(texts) + "\n")
        atomic_write_text(out, body)
        atomic_write_text(out.with_name(out.stem + ".facts.json"), json.dumps(facts, separators=(",", ":")))
        print(f"wrote {out} ({len(texts):,} documents) and {out.with_name(out.stem + '.facts.json')}",
              file=sys.stderr)
    if args.stats:
        for key, value in corpus_stats(texts, facts).items():
            shown = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
            print(f"{key:26s} {shown}")
    if not args.out and not args.stats:
        sys.stdout.write("\n\n".join(texts) + "\n")
    return 0
