"""The one-shape ladder (issue 26 item 4, ultramem/presets.py ONE_SHAPE_*): one shape rule (4 blocks, 2 heads, the
memory spanning blocks 1:3) from ~10k to >1M activated params, width growing in steps, MoE and UltraMem matched to
dense as on the study ladder; counts checked against the closed form of a dense block."""

from __future__ import annotations

import pytest

from ultramem.accounting import count_params
from ultramem.presets import PRESETS, get_preset, preset_source

RUNGS = sorted((name for name in PRESETS if name.startswith("dense-o") and not name.endswith("-wide")),
               key=lambda n: int(n.split("-o")[1]))
VOCAB = 256


def family_preset(family: str, rung: str) -> str:
    (name,) = [n for n in PRESETS if (n.startswith(f"{family}-{rung}-") or n == f"{family}-{rung}")
               and not n.endswith("-wide")]
    return name


def dense_closed_form(d: int, layers: int) -> int:
    """Tied 256-token embedding, per block attention 4 d^2 + MLP 8 d^2 + two norms, a final norm."""
    return VOCAB * d + layers * (12 * d * d + 2 * d) + d


def test_one_shape_rule_from_10k_to_1m():
    assert len(RUNGS) >= 10
    widths = []
    for name in RUNGS:
        cfg = get_preset(name)
        assert (cfg.n_layers, cfg.n_heads, cfg.vocab_size) == (4, 2, VOCAB), name
        assert count_params(cfg).active == dense_closed_form(cfg.d_model, 4), name
        assert preset_source(name) == "ours (one-shape ladder)"
        widths.append(cfg.d_model)
    steps = [b / a for a, b in zip(widths, widths[1:], strict=False)]
    assert steps[0] == 1.5 and all(1.1 <= s <= 1.34 for s in steps[1:]), steps  # width only: ~1.15-1.33x per rung
    #                                                                            above o0 (d 8, a 1.5x step to o1)
    active = [count_params(get_preset(n)).active for n in RUNGS]
    assert active[0] <= 11_000 and active[-1] >= 1_000_000


@pytest.mark.parametrize("family", ["dense", "moe", "ultramem"])
def test_every_family_climbs_in_small_steps(family):
    rungs = [n.split("-")[1] for n in RUNGS]
    active = [count_params(get_preset(family_preset(family, r))).active for r in rungs]
    steps = [b / a for a, b in zip(active, active[1:], strict=False)]
    assert all(1.2 <= s <= 1.65 for s in steps[1:]), (family, steps)
    assert 1.5 <= steps[0] <= (2.0 if family == "dense" else 1.65), (family, steps)  # o0 -> o1: 1.5x in width


def test_moe_and_ultramem_are_matched_as_on_the_study_ladder():
    for rung in (n.split("-")[1] for n in RUNGS):
        dense, um, moe = (count_params(get_preset(family_preset(f, rung))) for f in ("dense", "ultramem", "moe"))
        assert um.non_embedding == pytest.approx(6 * dense.non_embedding, rel=0.03), rung
        assert moe.non_embedding == pytest.approx(um.non_embedding, rel=0.05), rung
        cfg = get_preset(family_preset("ultramem", rung))
        # MoE's expert width is a multiple of 8 (aligned rows): its activated params land within one such step,
        # 8 x 4 blocks x top-2 x 2 d, of UltraMem's (4-6% at d = 12-16, under 1% from d = 48)
        step = 8 * 4 * 2 * 2 * cfg.d_model
        assert abs(moe.active_non_embedding - um.active_non_embedding) <= step, rung
        assert cfg.memory.layers == "1:3" and cfg.n_layers == 4


def test_the_wide_dense_control_has_moes_activated_ffn():
    """dense-oK-wide: dense with an FFN as wide as MoE's two active experts together (closed form: the MLP of a
    block is 2 d f), so it matches MoE in activated params up to the router (d x experts per block)."""
    for rung in (n.split("-")[1] for n in RUNGS):
        wide, moe, dense = (get_preset(n) for n in (f"dense-{rung}-wide", family_preset("moe", rung),
                                                    f"dense-{rung}"))
        assert wide.ffn_inner == moe.moe.top_k * moe.moe.expert_hidden
        d, layers = dense.d_model, dense.n_layers
        assert count_params(wide).active - count_params(dense).active == layers * 2 * d * (wide.ffn_inner - 4 * d)
        router = layers * d * moe.moe.num_experts
        assert count_params(moe).active - count_params(wide).active == router, rung
