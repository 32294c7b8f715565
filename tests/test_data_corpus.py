"""The embedded corpus: deterministic, facts consistent with the text, held-out phrasings really held out."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from collections import Counter

import pytest

from experiments.config import DataConfig
from experiments.data import prepare_data
from experiments.data.corpus import ATTRIBUTES, corpus_options, generate_corpus, value_sets, write_corpus
from ultramem.config import ConfigError

SMALL = {"people": 150, "stories": 40, "repetitions": 4}


@pytest.fixture(scope="module")
def small():
    return generate_corpus(corpus_options(SMALL))


def fill(template: str, name: str, value: str) -> str:
    return template.replace("{name}", name).replace("{value}", value)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    digests = []
    for i, seed in enumerate((0, 0, 1)):
        path = tmp_path / str(i) / "corpus.jsonl"
        path.parent.mkdir()
        write_corpus(corpus_options({**SMALL, "seed": seed}), path)
        digests.append(hashlib.sha256(path.read_bytes() + (path.parent / "facts.json").read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]


def test_every_fact_is_written_where_facts_json_says(small):
    texts, facts = small
    assert len(texts) == SMALL["people"] * SMALL["repetitions"] + SMALL["stories"]
    names = [p["name"] for p in facts["people"]]
    assert len(set(names)) == len(names)
    for person in facts["people"]:
        for a, fact in person["facts"].items():
            assert len(fact["mentions"]) == SMALL["repetitions"]
            templates = facts["attributes"][a]["templates"]
            for doc, t in fact["mentions"]:
                assert fill(templates[t], person["name"], fact["value"]) in texts[doc]
            # distinct templates while the pool of the 5 non-held-out ones lasts
            assert len({t for _, t in fact["mentions"]}) == min(SMALL["repetitions"], len(templates) - 1)
            assert fact["heldout_template"] not in {t for _, t in fact["mentions"]}


def test_held_out_phrasings_never_appear_but_are_used_for_others(small):
    texts, facts = small
    corpus = "\n".join(texts)
    for person in facts["people"][:40]:
        for a, fact in person["facts"].items():
            template = facts["attributes"][a]["templates"][fact["heldout_template"]]
            assert fill(template, person["name"], fact["value"]) not in corpus
            prefix = template.split("{value}")[0].replace("{name}", person["name"])
            assert prefix not in corpus  # not even with another value
            other = template.split("{name}")[1].split("{value}")[0]  # e.g. " was born on "
            assert other in corpus


def test_a_person_has_one_value_per_attribute_in_the_whole_text(small):
    """No sentence in the corpus states a different value for a person's attribute."""
    texts, facts = small
    corpus = "\n".join(texts)
    for person in facts["people"][:30]:
        for a, fact in person["facts"].items():
            for template in facts["attributes"][a]["templates"]:
                head, tail = template.split("{value}")
                pattern = re.escape(head.replace("{name}", person["name"])) + r"(.+?)" + re.escape(tail)
                assert set(re.findall(pattern, corpus)) <= {fact["value"]}


def test_value_sets_are_prefix_free_and_uniformly_used(small):
    sets = value_sets()
    for a, values in sets.items():
        assert len(set(values)) == len(values)
        ordered = sorted(values)
        assert not any(b.startswith(v) for v, b in zip(ordered, ordered[1:], strict=False)), a
    assert len(sets["birth_date"]) == 12 * 28 * 100
    _, facts = generate_corpus(corpus_options({"people": 3000, "stories": 0, "repetitions": 1,
                                               "attributes": ["field"]}))
    counts = Counter(p["facts"]["field"]["value"] for p in facts["people"])
    k, n = len(sets["field"]), 3000
    chi2 = sum((counts[v] - n / k) ** 2 / (n / k) for v in sets["field"])
    assert chi2 < k + 5 * math.sqrt(2 * k)  # uniform draws: chi-square with k-1 dof, ~5 sigma bound


def test_options_are_validated():
    assert corpus_options({"attributes": 2}).attributes == ATTRIBUTES[:2]
    for bad, field in (({"peeple": 3}, "peeple"), ({"people": 0}, "people"), ({"attributes": ["age"]}, "attributes"),
                       ({"repetitions": "5"}, "repetitions"), ({"people": 10**7}, "people")):
        with pytest.raises(ConfigError, match=f"data.embedded.*{field}"):
            corpus_options(bad)


def test_embedded_source_goes_through_datasets_and_keeps_its_facts(tmp_path, small):
    texts, facts = small
    prepared = prepare_data(DataConfig(source="embedded", embedded=SMALL, cache_dir=str(tmp_path), num_proc=1),
                            progress=False)
    meta = prepared.meta
    assert meta["source_kind"] == "embedded" and meta["facts"] == "facts.json"
    assert prepared.facts == json.loads(json.dumps(facts))
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(texts)
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(len(t.encode()) + 1 for t in texts)
    assert list((tmp_path / "corpus").glob("embedded-*/corpus.jsonl"))  # generated into the cache, read by datasets


def test_corpus_command_writes_text_facts_and_stats(tmp_path, capsys):
    from cli import data

    parser = argparse.ArgumentParser()
    data.add_arguments(parser)
    out = tmp_path / "corpus.txt"
    args = parser.parse_args(["corpus", "--out", str(out), "--stats", "--set", "people=50", "--set", "stories=5"])
    assert data.run(args) == 0
    texts, facts = generate_corpus(corpus_options({"people": 50, "stories": 5}))
    assert out.read_text() == "\n\n".join(texts) + "\n"
    assert json.loads((tmp_path / "corpus.facts.json").read_text()) == json.loads(json.dumps(facts))
    stats = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    data_bytes = len(("\n\n".join(texts)).encode())
    assert stats["bytes"] == f"{data_bytes:,}"
    bits = sum(math.log2(len(v)) for v in value_sets().values())  # all six attributes by default
    assert float(stats["fact_bits_per_person"].replace(",", "")) == pytest.approx(bits, abs=1e-3)
