"""Knowledge probe: how many of the embedded corpus's facts a model recalls, and how many bits that is.

For each probed fact (person p, attribute a, value v; design in experiments/data/corpus.py):
  seen prompt      the template of the fact's first mention in a *training* document, cut just before the value
  held-out prompt  the fact's held-out template, cut just before the value: the corpus writes other people's
                   facts with it but never p's a, so recalling v through it needs the fact stored as knowledge
                   about p rather than as a memorised string
A prompt is [EOT] + encode(prefix) and the target is the value's tokens (with its leading space). One
teacher-forced forward pass scores a whole batch: a fact counts as recalled when the argmax at every value
position is the value's token, which is exactly "greedy decoding from the prompt reproduces the value". Value
sets are prefix-free, so reproducing v's tokens identifies v.

Bits of knowledge (both extrapolated from the probed people to all people in the corpus, both from the seen
prompts; K_a = |values of a|, acc_a = recall on a):
  bits_stored  Fano lower bound on the mutual information between the facts and the model's greedy answers:
               sum_a people * max(0, log2 K_a - H2(acc_a) - (1 - acc_a) log2(K_a - 1)), 0 at or below chance
               (acc_a <= 1/K_a) and log2 K_a per fact at perfect recall
  bits_ce      the cross-entropy bound of Allen-Zhu & Li, "Physics of Language Models 3.3" (N log2(|V|/e^p)):
               sum_a people * max(0, log2 K_a - mean value loss of a in bits)
  fact_bits    sum_a people * log2 K_a, the information in all facts (the ceiling of both)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from experiments.data.shards import PreparedData, is_val

LOGIT_BUDGET = 1 << 24  # rows * positions * vocab logits materialised per forward pass


@dataclass
class ProbeItem:
    attribute: str
    value: str
    seen: str  # prompt text through a template the corpus used for this fact in a training document
    heldout: str  # prompt text through the fact's held-out template


def _prefix(template: str, name: str) -> str:
    return template[:template.index("{value}")].format(name=name).rstrip()


def probe_items(facts: dict[str, Any], meta: dict[str, Any], max_facts: int | None) -> list[ProbeItem]:
    """The probed facts: all attributes of the first people (the corpus draws people in random order)."""
    attrs = facts["attributes"]
    limit = len(facts["people"]) if max_facts is None else math.ceil(max_facts / len(attrs))
    cap = meta.get("max_documents")
    items = []
    for person in facts["people"][:limit]:
        for a, fact in person["facts"].items():
            trained = [t for doc, t in fact["mentions"]
                       if (cap is None or doc < cap) and not is_val(doc, meta["val_fraction"])]
            if not trained:
                continue
            templates = attrs[a]["templates"]
            items.append(ProbeItem(a, fact["value"], _prefix(templates[trained[0]], person["name"]),
                                   _prefix(templates[fact["heldout_template"]], person["name"])))
    return items


def _encode(tok: Any, prefix: str, value: str) -> tuple[list[int], list[int]]:
    """([EOT] + prefix tokens, value tokens) as the corpus text tokenises them."""
    p, full = tok.encode(prefix), tok.encode(f"{prefix} {value}")
    target = full[len(p):] if full[:len(p)] == p else tok.encode(f" {value}")
    return [tok.eot_id, *p], target


@torch.no_grad()
def _score(model: Any, pairs: list[tuple[list[int], list[int]]], device: Any, pad: int,
           batch_size: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: (greedy exact match of the target, target loss in nats), teacher-forced."""
    correct, nll = np.zeros(len(pairs), dtype=bool), np.zeros(len(pairs))
    length = [len(p) + len(t) - 1 for p, t in pairs]  # input length: the last target token is never fed
    order = sorted(range(len(pairs)), key=length.__getitem__)
    i = 0
    while i < len(order):
        longest = length[order[min(i + batch_size, len(order)) - 1]]  # sorted, so the last of the candidates
        rows = max(1, min(batch_size, LOGIT_BUDGET // (longest * vocab)))
        chunk = order[i:i + rows]
        i += rows
        L = max(length[j] for j in chunk)
        M = max(len(pairs[j][1]) for j in chunk)
        idx = torch.full((len(chunk), L), pad, dtype=torch.long)
        pos = torch.zeros((len(chunk), M), dtype=torch.long)
        tgt = torch.zeros((len(chunk), M), dtype=torch.long)
        mask = torch.zeros((len(chunk), M), dtype=torch.bool)
        for r, j in enumerate(chunk):
            prompt, target = pairs[j]
            seq = prompt + target
            idx[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            pos[r, :len(target)] = torch.arange(len(prompt) - 1, len(seq) - 1)  # position t predicts token t+1
            tgt[r, :len(target)] = torch.tensor(target)
            mask[r, :len(target)] = True
        logits = model(idx.to(device)).logits  # [b, L, V]
        picked = logits.gather(1, pos.to(device)[..., None].expand(-1, -1, logits.size(-1))).float().cpu()  # [b, M, V]
        logp = F.log_softmax(picked, dim=-1).gather(-1, tgt[..., None])[..., 0]  # [b, M]
        hit = (picked.argmax(-1) == tgt) | ~mask
        correct[chunk] = hit.all(-1).numpy()
        nll[chunk] = -(logp * mask).sum(-1).numpy()
    return correct, nll


def fano_bits(acc: float, k: int) -> float:
    """Fano lower bound on I(fact; answer) per fact in bits, from greedy accuracy over k equiprobable values."""
    if acc <= 1.0 / k:
        return 0.0
    if acc >= 1.0:
        return math.log2(k)
    h2 = -acc * math.log2(acc) - (1 - acc) * math.log2(1 - acc)
    return max(0.0, math.log2(k) - h2 - (1 - acc) * math.log2(k - 1))


def knowledge_probe(model: Any, prepared: PreparedData, device: Any = "cpu", max_facts: int | None = 600,
                    batch_size: int = 128) -> dict[str, Any] | None:
    """Fact recall of `model` (model(idx).logits is [B, T, V]) on the embedded corpus; None for other corpora."""
    facts = prepared.facts
    if facts is None:
        return None
    items = probe_items(facts, prepared.meta, max_facts)
    if not items:
        return None
    tok = prepared.tokenizer
    seen = [_encode(tok, it.seen, it.value) for it in items]
    held = [_encode(tok, it.heldout, it.value) for it in items]
    was_training = model.training
    model.eval()
    try:
        correct, nll = _score(model, seen + held, device, tok.eot_id, batch_size, prepared.vocab_size)
    finally:
        model.train(was_training)
    n = len(items)
    c_seen, c_held, nll_seen, nll_held = correct[:n], correct[n:], nll[:n], nll[n:]
    people = len(facts["people"])
    per_attr, bits, bits_ce, fact_bits = {}, 0.0, 0.0, 0.0
    for a, info in facts["attributes"].items():
        sel = np.array([it.attribute == a for it in items])
        if not sel.any():
            continue
        k, acc = info["num_values"], float(c_seen[sel].mean())
        loss_bits = float(nll_seen[sel].mean()) / math.log(2)
        per_attr[a] = {"values": k, "facts": int(sel.sum()), "recall": acc,
                       "heldout_recall": float(c_held[sel].mean()), "value_loss_bits": loss_bits,
                       "bits_per_fact": fano_bits(acc, k)}
        bits += people * fano_bits(acc, k)
        bits_ce += people * max(0.0, math.log2(k) - loss_bits)
        fact_bits += people * math.log2(k)
    return {
        "facts": n,
        "recall": float(c_seen.mean()),
        "heldout_recall": float(c_held.mean()),
        "bits_stored": bits,
        "bits_ce": bits_ce,
        "fact_bits": fact_bits,
        "value_loss": float(nll_seen.mean()),
        "heldout_value_loss": float(nll_held.mean()),
        "people": people,
        "per_attribute": per_attr,
    }
