"""Knowledge probe against independent references: an oracle that knows the facts, a uniform model, closed forms.

The oracle is a torch module that reads the text it is given (byte tokens after the last end-of-document token)
and puts all its mass on the next byte of the true sentence "<template up to the value> <value>", for every
template of every fact; it knows nothing about how the probe builds its prompts.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from experiments.config import DataConfig
from experiments.data import knowledge_probe, prepare_data
from experiments.data.probe import fano_bits

EMBEDDED = {"people": 40, "stories": 10, "repetitions": 3}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("probe-cache")
    return prepare_data(DataConfig(source="embedded", embedded=EMBEDDED, cache_dir=str(cache), num_proc=1),
                        progress=False)


class Oracle(torch.nn.Module):
    def __init__(self, facts: dict, attributes: set[str] | None = None, vocab: int = 257, eot: int = 256):
        super().__init__()
        self.vocab, self.eot, self.next = vocab, eot, {}
        for person in facts["people"]:
            for a, fact in person["facts"].items():
                if attributes is not None and a not in attributes:
                    continue
                for template in facts["attributes"][a]["templates"]:
                    head = template.split("{value}")[0].replace("{name}", person["name"]).rstrip().encode()
                    cont = (" " + fact["value"]).encode()
                    for k in range(len(cont)):
                        key = head + cont[:k]
                        assert self.next.get(key, cont[k]) == cont[k]
                        self.next[key] = cont[k]

    def forward(self, idx: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*idx.shape, self.vocab)
        for b, row in enumerate(idx.tolist()):
            text = bytearray()
            for t, token in enumerate(row):
                text = bytearray() if token == self.eot else text + bytes([token])
                nxt = self.next.get(bytes(text))
                if nxt is not None:
                    logits[b, t, nxt] = 50.0
        return SimpleNamespace(logits=logits)


class Uniform(torch.nn.Module):
    def forward(self, idx: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*idx.shape, 257))


def total_bits(facts: dict, attributes) -> float:
    return len(facts["people"]) * sum(math.log2(facts["attributes"][a]["num_values"]) for a in attributes)


def test_oracle_recalls_everything(prepared):
    facts = prepared.facts
    result = knowledge_probe(Oracle(facts), prepared, "cpu", max_facts=None)
    assert result["recall"] == 1.0 and result["heldout_recall"] == 1.0
    assert result["facts"] == pytest.approx(len(facts["people"]) * len(facts["attributes"]), abs=3)
    assert result["bits_stored"] == pytest.approx(total_bits(facts, facts["attributes"]))
    assert result["bits_ce"] == pytest.approx(result["fact_bits"], rel=1e-6)
    assert result["fact_bits"] == pytest.approx(total_bits(facts, facts["attributes"]))


def test_uniform_model_recalls_nothing(prepared):
    result = knowledge_probe(Uniform(), prepared, "cpu", max_facts=60)
    assert result["recall"] == 0.0 and result["heldout_recall"] == 0.0
    assert result["bits_stored"] == 0.0 and result["bits_ce"] == 0.0
    # uniform over 257 byte ids: the value loss is (value bytes) * ln 257 nats
    assert result["value_loss"] > 5 * math.log(257)


def test_partial_oracle_gives_the_closed_form(prepared):
    facts = prepared.facts
    known = {"birth_city", "employer"}
    result = knowledge_probe(Oracle(facts, known), prepared, "cpu", max_facts=None)
    assert result["recall"] == pytest.approx(len(known) / len(facts["attributes"]), abs=0.02)
    assert result["bits_stored"] == pytest.approx(total_bits(facts, known))
    for a, row in result["per_attribute"].items():
        assert row["recall"] == (1.0 if a in known else 0.0)


def test_fano_bound_closed_forms():
    assert fano_bits(1.0, 50) == pytest.approx(math.log2(50))
    assert fano_bits(1 / 50, 50) == 0.0 and fano_bits(0.0, 50) == 0.0
    assert fano_bits(0.5, 2) == 0.0
    assert fano_bits(0.5, 4) == pytest.approx(2 - 1 - 0.5 * math.log2(3))


def test_probe_is_none_without_facts(tmp_path):
    (tmp_path / "t.txt").write_text("\n\n".join(f"paragraph {i}" for i in range(50)))
    plain = prepare_data(DataConfig(source=str(tmp_path / "t.txt"), cache_dir=str(tmp_path / "c"), num_proc=1,
                                    val_fraction=0.2), progress=False)
    assert knowledge_probe(Uniform(), plain, "cpu") is None


def test_probe_restores_training_mode(prepared):
    model = Oracle(prepared.facts)
    model.train()
    knowledge_probe(model, prepared, "cpu", max_facts=12)
    assert model.training


def test_bpe_probe_targets_match_the_corpus_tokenisation(tmp_path):
    """With a BPE, the value tokens the probe scores are the ones the model sees in the training sentences."""
    from experiments.data.probe import _encode, probe_items

    bpe = prepare_data(DataConfig(source="embedded", embedded=EMBEDDED, tokenizer="bpe", vocab_size=600,
                                  cache_dir=str(tmp_path), num_proc=1), progress=False)
    tok, facts = bpe.tokenizer, bpe.facts
    templates = {a: info["templates"] for a, info in facts["attributes"].items()}
    sentences = {}
    for person in facts["people"]:
        for a, fact in person["facts"].items():
            for t in templates[a]:
                head, tail = t.replace("{name}", person["name"]).split("{value}")
                sentences[(head.rstrip(), fact["value"])] = head + fact["value"] + tail
    items = probe_items(facts, bpe.meta, None)
    assert items
    for item in items:
        for prefix in (item.seen, item.heldout):
            prompt, target = _encode(tok, prefix, item.value)
            assert tok.decode(target) == " " + item.value
            in_context = tok.encode(sentences[(prefix, item.value)])
            assert in_context[:len(prompt) - 1 + len(target)] == prompt[1:] + target
