"""`ultramem sweep refine` (analysis/refine.py, isoflop.extra in experiments/sweep): where the next runs of an IsoFLOP
study go. The rules run on synthetic studies drawn from a known law L(N, D) = E + A/N^a + B/D^b (C = 6ND, a ladder
1.5x apart in N, each budget's sizes laid around its known optimum N* = sqrt(C/6)), so the right additions are
known; the planner's `isoflop.extra` is checked against the main grid it must leave alone, and the command end to
end on a runs table drawn from the law and on a tiny study trained through the scheduler."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.refine import Addition, Rung, Study, named_like, refine, within_budget
from experiments.sweep import load_sweep, plan_sweep
from experiments.sweep.isoflop import add_extra_text, extra_entry_text, yaml_float
from ultramem.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
E, A, B, ALPHA = 1.5, 60.0, 60.0, 0.4  # a = b and A = B: N* = sqrt(C / 6) exactly
RATIO = 1.5  # the synthetic ladder's step in N


def law(n: float, d: float) -> float:
    return E + A * n**-ALPHA + B * d**-ALPHA


def rung_n(k: int) -> float:
    return 1e4 * RATIO**k


def synthetic(family: str, centres: list[int], seeds: list[int], noise: float | list[float], *, span: int = 3,
              sizes: dict[int, range] | None = None, offset: float | list[float] = 0.0, rng_seed: int = 0,
              rungs: int = 15) -> tuple[pd.DataFrame, pd.DataFrame, list[Rung]]:
    """(runs table, planned runs, rungs) of one family: budget j has its optimum at rung centres[j] (C = 6 N*^2)
    and trains rungs centres[j] +- span (or sizes[j]) for `seeds`; loss = law + offset[j] + N(0, noise[j])."""
    rng = np.random.default_rng(rng_seed)
    per = lambda x, j: x[j] if isinstance(x, list) else x
    runs, planned = [], []
    for j, kc in enumerate(centres):
        c = 6 * rung_n(kc) ** 2
        for k in (sizes or {}).get(j, range(kc - span, kc + span + 1)):
            n, d = rung_n(k), c / (6 * rung_n(k))
            for s in seeds:
                rid = f"{family}-{k}-{j}-{s}"
                planned.append({"run_id": rid, "family": family, "preset": f"{family}-r{k}", "budget": c, "seed": s})
                runs.append({"run_id": rid, "family": family, "seed": s, "flops": c, "tokens": d, "active_params": n,
                             "flops_per_token": 6 * n,
                             "val_loss": law(n, d) + per(offset, j) + rng.normal(0, per(noise, j))})
    ladder = [Rung(f"{family}-r{k}", family, rung_n(k), 6 * rung_n(k)) for k in range(rungs)]
    return pd.DataFrame(runs), pd.DataFrame(planned), ladder


def study_of(*parts: tuple[pd.DataFrame, pd.DataFrame, list[Rung]]) -> tuple[pd.DataFrame, Study]:
    runs = pd.concat([p[0] for p in parts], ignore_index=True)
    planned = pd.concat([p[1] for p in parts], ignore_index=True)
    budgets = sorted(planned["budget"].unique())
    return runs, Study(budgets, sorted(planned["seed"].unique()), {p[2][0].family: p[2] for p in parts}, planned)


def cells(additions: list[Addition]) -> set[tuple[str, str, float]]:
    return {(a.kind, a.preset, c) for a in additions for c in a.budgets}


CENTRES = [3, 5, 7, 9]


# ---- the rules ---------------------------------------------------------------------------------------------------


def test_a_minimum_at_the_largest_size_adds_the_next_larger_rung_there_only():
    """(a) At the top budget the sizes stop at its optimum's rung (9), so the lowest loss is at the largest size:
    the next rung (10) at that budget, with the study's seeds; the other budgets bracket theirs."""
    sizes = {3: range(3, 10)}  # rungs 3..9 at the top budget, whose optimum is rung 9
    runs, study = study_of(synthetic("dense", CENTRES, [0, 1, 2], 0.002, sizes=sizes))
    out = refine(runs, study, n_boot=300)
    top = study.budgets[-1]
    assert cells(out.additions) == {("edge", "dense-r10", top)}
    (a,) = out.additions
    assert a.seeds == [0, 1, 2] and a.priority > 3
    assert "minimum at the largest size served" in a.why and "dense-r9" in a.why and "not bracketed" in a.why
    means = runs[runs["flops"] == top].groupby("active_params")["val_loss"].mean()  # the reference: raw argmin
    assert means.idxmin() == means.index.max()


def test_a_minimum_at_the_smallest_size_adds_rungs_below_it():
    """The mirror image: the lowest budget's sizes start at its optimum's rung (3) -> rung 2 at that budget."""
    runs, study = study_of(synthetic("dense", CENTRES, [0, 1, 2], 0.002, sizes={0: range(3, 10)}))
    out = refine(runs, study, n_boot=300)
    assert cells(out.additions) == {("edge", "dense-r2", study.budgets[0])}


def test_an_edge_far_from_the_optimum_adds_two_rungs_and_the_ladders_end_is_a_note():
    """Sizes that stop two rungs short of the optimum: the parabola's vertex lies past the first rung beyond, so
    two rungs are added; where the family has no rung beyond, nothing is added and a note says so."""
    runs, study = study_of(synthetic("dense", CENTRES, [0, 1, 2], 0.002, sizes={3: range(1, 8)}, rungs=9))
    out = refine(runs, study, n_boot=300)
    top = study.budgets[-1]
    assert cells(out.additions) == {("edge", "dense-r8", top)}  # rung 9 would be the second: the ladder ends
    runs, study = study_of(synthetic("dense", CENTRES, [0, 1, 2], 0.002, sizes={3: range(1, 8)}))
    out = refine(runs, study, n_boot=300)
    assert cells(out.additions) == {("edge", "dense-r8", top), ("edge", "dense-r9", top)}
    assert [a.preset for a in out.additions] == ["dense-r8", "dense-r9"]  # the nearer rung first
    runs, study = study_of(synthetic("dense", CENTRES, [0, 1, 2], 0.002, sizes={3: range(3, 10)}, rungs=10))
    out = refine(runs, study, n_boot=300)
    assert out.additions == [] and any("no larger dense preset" in n for n in out.notes)


def test_one_noisy_seed_adds_seeds_at_the_three_sizes_around_each_minimum():
    """(b) One seed per size, noise 0.02 nats: the seed noise is not measured, so every budget gets seeds 1-4 (up
    to --min-seeds 5) at the three rungs nearest its vertex, which here are the optimum's rung and its neighbours."""
    runs, study = study_of(synthetic("dense", CENTRES, [0], 0.02))
    out = refine(runs, study, n_boot=300)
    want = {("seeds", f"dense-r{k}", c) for kc, c in zip(CENTRES, study.budgets, strict=True)
            for k in (kc - 1, kc, kc + 1)}
    assert cells(out.additions) == want
    assert all(a.seeds == [1, 2, 3, 4] and 2 <= a.priority < 3 for a in out.additions)
    assert all("one seed" in a.why for a in out.additions)
    out3 = refine(runs, study, n_boot=300, min_seeds=3)
    assert {tuple(a.seeds) for a in out3.additions} == {(1, 2)}


def test_measured_seed_noise_too_large_for_the_vertex_adds_seeds_at_that_budget_only():
    """Three seeds everywhere; at one budget (11 sizes) the seeds scatter by 0.3 nats, so that the vertex's
    bootstrap (each size's seeds redrawn) is not bounded (it leaves the sizes, turns the parabola over, or reaches
    past 2x in N): seeds 3 and 4 at the three sizes nearest its vertex, nowhere else. (At this noise 29 of 30 draws
    of the study flag that budget alone.)"""
    runs, study = study_of(synthetic("dense", CENTRES, [0, 1, 2], [0.002, 0.002, 0.3, 0.002],
                                     sizes={2: range(2, 13)}))
    out = refine(runs, study, n_boot=500)
    c = study.budgets[2]
    assert {(k, b) for k, _, b in cells(out.additions)} == {("seeds", c)}
    assert len(out.additions) == 3 and all(a.seeds == [3, 4] for a in out.additions)
    assert not any("one seed" in a.why for a in out.additions)
    row = out.vertices[out.vertices["budget"] == c].iloc[0]
    assert row["valid"] and {a.preset for a in out.additions} == pts_nearest(runs, c, row["ln_n_star"])


def pts_nearest(runs: pd.DataFrame, c: float, ln_n: float) -> set[str]:
    n = np.sort(runs.loc[runs["flops"] == c, "active_params"].unique())
    k = np.argsort(np.abs(np.log(n) - ln_n))[:3]
    return {f"dense-r{round(math.log(n[i] / 1e4) / math.log(RATIO))}" for i in k}


def test_a_well_resolved_study_adds_nothing():
    """(c) Two families, three seeds, 0.002 nats of noise, every optimum inside its sizes and MoE 0.03 nats
    better at every budget: nothing to add."""
    runs, study = study_of(synthetic("dense", CENTRES, [0, 1, 2], 0.002),
                           synthetic("moe", CENTRES, [0, 1, 2], 0.002, offset=-0.03, rng_seed=1))
    out = refine(runs, study, n_boot=300)
    assert out.additions == [] and out.notes == []
    assert len(out.vertices) == 8 and out.vertices["valid"].all()
    truth = np.log([rung_n(k) for k in CENTRES])
    for fam in ("dense", "moe"):
        v = out.vertices[out.vertices["family"] == fam]
        assert np.abs(v["ln_n_star"].to_numpy() - truth).max() < 0.1  # the vertices found the known optima


def test_an_unresolved_comparison_adds_seeds_at_both_minima_of_its_widest_budget():
    """Dense and MoE follow one law at budget 2 (their sampled minima differ by noise alone) and MoE is 0.03 nats
    better elsewhere: seeds 3-4 at both families' minimum size there (the optimum's rung), nowhere else."""
    offsets = [-0.03, -0.03, 0.0, -0.03]
    runs, study = study_of(synthetic("dense", CENTRES, [0, 1, 2], 0.004, rng_seed=2),
                           synthetic("moe", CENTRES, [0, 1, 2], 0.004, offset=offsets, rng_seed=3))
    out = refine(runs, study, n_boot=300)
    c = study.budgets[2]
    assert cells(out.additions) == {("frontier", "dense-r7", c), ("frontier", "moe-r7", c)}
    assert all(a.seeds == [3, 4] and 1 <= a.priority < 2 for a in out.additions)
    assert all("moe vs dense" in a.why and "includes 0" in a.why for a in out.additions)


def test_a_cell_two_rules_want_is_added_once_with_both_reasons():
    """One seed and two families of one law: every budget's vertex wants seeds (rule 2) and the comparison wants
    them at the minimum sizes too (rule 3); each cell is added once, at the higher priority, with both reasons."""
    runs, study = study_of(synthetic("dense", CENTRES, [0], 0.02, rng_seed=4),
                           synthetic("moe", CENTRES, [0], 0.02, rng_seed=5))
    out = refine(runs, study, n_boot=200)
    keys = [(a.preset, tuple(a.budgets)) for a in out.additions]
    assert len(keys) == len(set(keys))
    assert {a.kind for a in out.additions} == {"seeds"}
    assert any("; also " in a.why and "vs" in a.why for a in out.additions)


def test_seeds_laid_but_not_finished_count_and_a_pending_rung_is_not_added_twice():
    """A study refined once and not yet run again: the planned seeds count towards --min-seeds and the planned
    rung beyond the edge is waited for (a note), so a second refine adds nothing it already added."""
    runs, study = study_of(synthetic("dense", CENTRES, [0], 0.02, sizes={3: range(3, 10)}))
    first = refine(runs, study, n_boot=200)
    assert ("edge", "dense-r10", study.budgets[-1]) in cells(first.additions)
    rows = [{"run_id": f"new-{i}-{s}", "family": "dense", "preset": a.preset, "budget": c, "seed": s}
            for i, a in enumerate(first.additions) for c in a.budgets for s in a.seeds]
    again = Study(study.budgets, study.seeds, study.rungs, pd.concat([study.planned, pd.DataFrame(rows)]))
    second = refine(runs, again, n_boot=200)
    assert second.additions == []
    assert any("dense-r10 laid there already and not finished" in n for n in second.notes)


def test_max_flops_keeps_a_prefix_of_the_ranking():
    """(d) The kept additions are the highest-priority ones whose cumulative cost fits; the first that does not
    fit ends the list, even when a cheaper one after it would."""
    runs, study = study_of(synthetic("dense", CENTRES, [0], 0.02, sizes={3: range(3, 10)}))
    ranked = refine(runs, study, n_boot=200).additions
    assert [a.priority for a in ranked] == sorted((a.priority for a in ranked), reverse=True)
    assert ranked[0].kind == "edge"
    costs = [sum(c for _ in a.seeds for c in a.budgets) for a in ranked]  # C per run: a stand-alone run's FLOPs
    for k in range(len(ranked) + 1):
        budget = sum(costs[:k]) + 0.5 * (costs[k] if k < len(costs) else 0)
        assert within_budget(ranked, costs, budget) == ranked[:k]
    cheap_later = [1.0, 10.0, 1.0]
    assert len(within_budget(ranked[:3], cheap_later, 5.0)) == 1
    assert within_budget(ranked, costs, None) == ranked


def test_preset_names_of_a_ladder():
    ladder = ["dense-o3", "moe-o3-2in9", "ultramem-o3-x6"]
    assert all(named_like(n, ladder) for n in ("dense-o8", "moe-o10-2in14", "ultramem-o15-x6"))
    assert not any(named_like(n, ladder) for n in ("dense-o7-wide", "dense-tiny", "dense-t3", "pkm-o3-x6"))


# ---- isoflop.extra in the planner --------------------------------------------------------------------------------


def write_study(tmp_path: Path, extra: str = "", *, name: str = "study.yaml", seeds: str = "[0, 1, 2]",
                isoflop: str = "") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent("""\
        name: refine-test
        output_dir: runs
        method: isoflop
        isoflop:
          budgets: [1.0e+11, 3.0e+11, 9.0e+11]
          ladder: [dense-o3, dense-o4, dense-o5, dense-o6, dense-o7]
          tokens_per_param: [1, 1000]
          hparams: isoflop
          batch: steps
          target_steps: 200
        """) + textwrap.indent(textwrap.dedent(isoflop + extra), "  ") + textwrap.dedent(f"""\
        base:
          data: {{source: embedded, tokenizer: byte}}
          train: {{cooldown: 0.2, min_lr_ratio: 0.0, seq_len: 64}}
        seeds: {seeds}
        """))
    return path


def test_extra_leaves_the_main_grid_alone_and_lays_its_runs_as_the_grid_would(tmp_path):
    """(e) The main grid's runs are byte for byte the same with and without `extra`; an entry that repeats a size's
    whole grid for a new seed gives the very runs a `seeds` list with that seed gives; an entry beyond the ladder
    trains D = C / F at each budget; no extra run repeats a run id."""
    plain = plan_sweep(write_study(tmp_path))
    served = sorted({r.values["isoflop.budget"] for r in plain.runs if r.preset == "dense-o5"})
    extra = plan_sweep(write_study(tmp_path, f"""\
        extra:
          - {{preset: dense-o5, budgets: {[yaml_float(c) for c in served]}, seeds: [3], why: a fourth seed}}
          - {{preset: dense-o8, budgets: [3.0e+11, 9.0e+11], seeds: [0, 1]}}
        """.replace("'", ""), name="extra.yaml"))
    main = [r for r in extra.runs if "isoflop.extra" not in r.values]
    assert [(r.run_id, r.config, r.name) for r in main] == [(r.run_id, r.config, r.name) for r in plain.runs]
    assert extra.warnings == plain.warnings
    added = [r for r in extra.runs if "isoflop.extra" in r.values]
    assert not {r.run_id for r in added} & {r.run_id for r in plain.runs}
    assert len({r.run_id for r in extra.runs}) == len(extra.runs)
    four = plan_sweep(write_study(tmp_path, seeds="[0, 1, 2, 3]", name="four.yaml"))
    seed3 = {r.run_id for r in four.runs if r.preset == "dense-o5" and r.config["seed"] == 3}
    assert {r.run_id for r in added if r.values["isoflop.extra"] == 0} == seed3
    assert all(r.values["isoflop.why"] == "a fourth seed" for r in added if r.values["isoflop.extra"] == 0)
    beyond = [r for r in added if r.values["isoflop.extra"] == 1]
    assert {(r.config["seed"], r.values["isoflop.budget"]) for r in beyond} == {(s, c) for s in (0, 1)
                                                                             for c in (3e11, 9e11)}
    for r in beyond:  # C = F D, D rounded to whole steps (batch: steps, about 200 of them)
        step = r.config["train"]["batch_size"] * r.config["train"]["seq_len"]
        assert abs(r.flops - r.values["isoflop.budget"]) <= r.flops_per_token * step / 2 + 1
        assert r.family == "dense" and r.preset == "dense-o8"


def test_an_added_seed_at_one_budget_trains_with_the_grids_recipe(tmp_path):
    """Seeds added at one budget of a size form a trunk of that budget alone, but train with the recipe its grid
    seeds got there (warmup, batch, LR, beta2, tokens): the IsoFLOP rule's warmup is capped by the trunk's shortest
    run, so the entry takes the main-grid trunk's (a new seed must differ from the others in its seed only)."""
    def study(extra: str = "", name: str = "study.yaml") -> Path:  # ~20,000 steps: one batch, one trunk per size
        path = write_study(tmp_path, extra, name=name)
        path.write_text(path.read_text().replace("target_steps: 200", "target_steps: 20000"))
        return path

    plain = plan_sweep(study())
    trunk = next(r for r in plain.runs if r.preset == "dense-o5" and r.config["train"].get("branches"))
    top = trunk.values["isoflop.budget"]  # a trunk with a shorter branch, which caps its warmup
    plan = plan_sweep(study(f"extra:\n  - {{preset: dense-o5, budgets: [{yaml_float(top)}], seeds: [7]}}\n",
                            "extra.yaml"))
    (added,) = [r for r in plan.runs if "isoflop.extra" in r.values]
    grid = next(r for r in plain.runs if r.preset == "dense-o5" and r.values["isoflop.budget"] == top
                and r.config["seed"] == 0)
    keys = ("warmup", "batch_size", "lr", "beta2", "tokens")
    assert {k: added.config["train"][k] for k in keys} == {k: grid.config["train"][k] for k in keys}


def test_extra_for_a_size_with_a_finished_trunk_is_its_own_trunk(tmp_path):
    """New budgets of a (preset, seed) that the main grid trains are never branches of its trunk (a finished
    trunk holds no checkpoint at a new branch point): the entry's runs form their own WSD trunk(s), and the main
    grid's trunk of that size is unchanged."""
    window = "tokens_per_param: [1, 1000]"
    plain = write_study(tmp_path)
    plain.write_text(plain.read_text().replace(window, "tokens_per_param: [100, 1000]"))  # dense-o3: 9e11 only
    path = write_study(tmp_path, "extra:\n  - {preset: dense-o3, budgets: [1.0e+11, 3.0e+11], seeds: [0]}\n",
                       name="extra.yaml")
    path.write_text(path.read_text().replace(window, "tokens_per_param: [100, 1000]"))
    before, plan = plan_sweep(plain), plan_sweep(path)
    assert [r.run_id for r in before.runs] == [r.run_id for r in plan.runs if "isoflop.extra" not in r.values]
    added = [r for r in plan.runs if "isoflop.extra" in r.values]
    assert {r.values["isoflop.budget"] for r in added} == {1e11, 3e11}
    ids = {r.run_id for r in added}
    assert all(r.branch_of is None or r.branch_of in ids for r in added)
    assert all(r.config["train"]["schedule"] == "wsd" for r in added)


def test_extra_without_branches_is_one_run_per_budget(tmp_path):
    path = write_study(tmp_path, "extra:\n  - {preset: dense-o8, budgets: [3.0e+11, 9.0e+11], seeds: [0, 1]}\n",
                       isoflop="branches: false\n")
    plan = plan_sweep(path)
    added = [r for r in plan.runs if "isoflop.extra" in r.values]
    assert len(added) == 4 and not any(r.branch_of for r in added)
    assert {r.name for r in added} == {f"dense-o8-s{s}@C={c}@extra0" for s in (0, 1) for c in ("3e+11", "9e+11")}


def test_extra_in_a_sweep_with_parameter_axes_is_laid_per_combination(tmp_path):
    path = write_study(tmp_path, "extra:\n  - {preset: dense-o8, budgets: [3.0e+11], seeds: [0]}\n", seeds="[0]")
    path.write_text(path.read_text() + "parameters:\n  train.beta2: {values: [0.95, 0.99]}\n")
    added = [r for r in plan_sweep(path).runs if "isoflop.extra" in r.values]
    assert sorted(r.config["train"]["beta2"] for r in added) == [0.95, 0.99]


@pytest.mark.parametrize(("extra", "expected"), [
    ("- {preset: dense-o8, budgets: [2.0e+11], seeds: [0]}", ["isoflop.extra", "budget 2e+11 is not one of "
                                                               "isoflop.budgets"]),
    ("- {preset: dense-o8, budgets: [3.0e+11], seeds: [0, 0]}", ["isoflop.extra.0.seeds", "once"]),
    ("- {preset: dense-o8, budgets: [3.0e+11], seeds: [0], size: 3}", ["isoflop.extra.0.size", "unknown key"]),
])
def test_bad_extra_entries_name_the_file_and_field(tmp_path, extra, expected):
    path = write_study(tmp_path, "extra:\n  " + extra + "\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert str(path) in str(err.value)
    for part in expected:
        assert part in str(err.value), str(err.value)


@pytest.mark.parametrize(("extra", "expected"), [
    ("- {preset: dense-o5, budgets: [3.0e+11], seeds: [1]}",
     "isoflop.extra[0] (dense-o5): budget 3e+11, seed 1 is already a run of the main grid"),
    ("- {preset: dense-o8, budgets: [3.0e+11], seeds: [0]}\n- {preset: dense-o8, budgets: [3.0e+11], seeds: [0]}",
     "isoflop.extra[1] (dense-o8): budget 3e+11, seed 0 is already a run of isoflop.extra[0]"),
    ("- {preset: ultramem-o3-x6, budgets: [3.0e+11], seeds: [0]}", "family ultramem is not in isoflop.ladder"),
    ("- {preset: dense-o99, budgets: [3.0e+11], seeds: [0]}", "unknown preset 'dense-o99'"),
])
def test_extra_entries_the_planner_refuses(tmp_path, extra, expected):
    path = write_study(tmp_path, "extra:\n" + textwrap.indent(extra, "  ") + "\n")
    with pytest.raises(ConfigError) as err:
        plan_sweep(path)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_extra_beyond_max_tokens_is_refused(tmp_path):
    path = write_study(tmp_path, "extra:\n  - {preset: dense-o1, budgets: [9.0e+11], seeds: [0]}\n",
                       isoflop="max_tokens: 2.0e+6\n")
    with pytest.raises(ConfigError, match=r"isoflop.extra\[0\] \(dense-o1\): at budget 9e\+11 it trains .* more "
                                          r"than isoflop.max_tokens"):
        plan_sweep(path)


def test_extra_entries_are_appended_to_the_text_and_nothing_else_changes():
    """The file's own lines stay as they were; a new `extra:` goes at the end of the isoflop block, and a second
    round appends to it (a flow mapping block is refused with a fix)."""
    text = (REPO / "sweeps/isoflop_tiny.yaml").read_text()
    one = extra_entry_text({"preset": "dense-t4", "budgets": [1.9e13], "seeds": [0], "why": 'edge: "x": y'},
                           "edge: x; cost: 1e+13 FLOPs, 1 runs")
    two = extra_entry_text({"preset": "dense-t3", "budgets": [7.0e12, 1.15e13], "seeds": [3, 4], "why": ""}, "s")
    once = add_extra_text(text, [one], "f")
    twice = add_extra_text(once, [two], "f")
    inserted = [line for line in twice.splitlines() if line not in text.splitlines()]
    assert "\n".join(line for line in twice.splitlines() if line not in inserted) == text.rstrip("\n")
    assert inserted[0] == "  extra:" and inserted[1] == "    # edge: x; cost: 1e+13 FLOPs, 1 runs"
    data, base = yaml.safe_load(twice), yaml.safe_load(text)
    assert data["isoflop"].pop("extra") == [
        {"preset": "dense-t4", "budgets": [1.9e13], "seeds": [0], "why": 'edge: "x": y'},
        {"preset": "dense-t3", "budgets": [7.0e12, 1.15e13], "seeds": [3, 4], "why": ""}]
    assert data == base
    with pytest.raises(ConfigError, match="block mapping"):
        add_extra_text("name: x\nisoflop: {budgets: [1.0e+12]}\n", [one], "f")
    for x in (1e12, 6.9e10, 886735128021.2402, 2.2e12, 1.15e13):
        assert yaml.safe_load(yaml_float(x)) == x


# ---- the command -------------------------------------------------------------------------------------------------


def ultramem(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=timeout)


def law_table(plan, noise: float = 0.0, rng_seed: int = 0) -> pd.DataFrame:
    """The runs table `ultramem plots` would write if every run of `plan` had finished at the law's loss."""
    rng = np.random.default_rng(rng_seed)
    return pd.DataFrame([{"run_id": r.run_id, "family": r.family, "preset": r.preset, "seed": r.config["seed"],
                          "val_loss": 1.5 + 60 * r.active_params**-0.4 + 170 * r.tokens**-0.4 + rng.normal(0, noise),
                          "flops": r.flops, "tokens": r.tokens, "active_params": r.active_params,
                          "flops_per_token": r.flops_per_token} for r in plan.runs])


def test_refine_writes_the_study_plus_priced_entries_and_keeps_its_runs(tmp_path):
    """On a runs table drawn from a law whose top-budget optimum lies past the ladder: one entry, the next
    one-shape rung (dense-o8, not the dense-o7-wide control) at that budget with the study's seeds, under a comment
    with the cost `sweep plan` gives its runs; the study's run ids and runs folder are the refined file's too."""
    study = write_study(tmp_path)
    plan = plan_sweep(study)
    table = law_table(plan)
    table.to_csv(tmp_path / "runs.csv", index=False)
    top = table[np.isclose(table["flops"], 9e11, rtol=0.05)].groupby("active_params")["val_loss"].mean()
    assert top.idxmin() == top.index.max()  # the reference: the law's minimum is the largest size there
    out = ultramem("sweep", "refine", "study.yaml", "--runs", "runs.csv", "--out", "refined.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "refined.yaml").read_text()
    assert [line for line in text.splitlines() if not line.startswith("    ") and line != "  extra:"] == \
        study.read_text().splitlines()
    entries = yaml.safe_load(text)["isoflop"]["extra"]
    assert [(e["preset"], e["budgets"], e["seeds"]) for e in entries] == [("dense-o8", [9e11], [0, 1, 2])]
    assert entries[0]["why"].startswith("edge: dense at C=9e+11: minimum at the largest size served")
    refined = plan_sweep(tmp_path / "refined.yaml")
    assert refined.runs_dir == plan.runs_dir
    assert [r.run_id for r in refined.runs if "isoflop.extra" not in r.values] == [r.run_id for r in plan.runs]
    new = [r for r in refined.runs if "isoflop.extra" in r.values]
    flops = sum(r.trained_flops for r in new)
    assert f"cost: {flops:.3g} FLOPs, {len(new)} runs" in text and len(new) == 3
    assert "dense-o8" in out.stdout and "total: 1 addition(s), 3 new run(s)" in out.stdout


def test_refine_max_flops_keeps_the_first_entries_of_the_ranking(tmp_path):
    """--max-flops X keeps the ranked entries whose summed cost (as priced in the file's comments) fits X."""
    study = write_study(tmp_path, seeds="[0]")
    law_table(plan_sweep(study), noise=0.01).to_csv(tmp_path / "runs.csv", index=False)
    full = ultramem("sweep", "refine", "study.yaml", "--runs", "runs.csv", "--out", "all.yaml", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    text = (tmp_path / "all.yaml").read_text()
    entries = yaml.safe_load(text)["isoflop"]["extra"]
    costs = [float(x) for x in re.findall(r"; cost: (\S+) FLOPs", text)]
    prios = [float(x) for x in re.findall(r"\(priority (\S+)\)", text)]
    assert len(entries) == len(costs) >= 3 and prios == sorted(prios, reverse=True)
    cap = sum(costs[:2]) * 1.001
    part = ultramem("sweep", "refine", "study.yaml", "--runs", "runs.csv", "--out", "two.yaml", "--max-flops",
                    f"{cap:.6g}", cwd=tmp_path)
    assert part.returncode == 0, part.stderr
    assert yaml.safe_load((tmp_path / "two.yaml").read_text())["isoflop"]["extra"] == entries[:2]
    assert f"{len(entries) - 2} lower-priority addition(s) left out" in part.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "study.yaml"], "study.yaml: exists; pass --force"),
    (["--out", "r.yaml", "--runs", "bad.csv"], "bad.csv: missing column(s) seed, val_loss"),
    (["--out", "r.yaml"], "runs: not found; no finished runs to refine from (run the study first"),
    (["--out", "r.yaml", "--runs", "none.csv"], "no finished run of the study"),
    (["--out", "r.yaml", "--max-flops", "0"], "--max-flops: give a number of FLOPs > 0"),
    (["--out", "sub/r.yaml", "--runs", "runs.csv"], "relative to its folder, so the refined file must lie there"),
])
def test_refine_errors_are_one_line_and_exit_2(tmp_path, args, message):
    study = write_study(tmp_path)
    table = law_table(plan_sweep(study))
    table.to_csv(tmp_path / "runs.csv", index=False)
    table[["run_id", "family"]].to_csv(tmp_path / "bad.csv", index=False)
    table.assign(run_id="other").to_csv(tmp_path / "none.csv", index=False)
    (tmp_path / "sub").mkdir()
    out = ultramem("sweep", "refine", "study.yaml", *args, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "r.yaml").exists()


def test_refine_refuses_a_sweep_of_another_method(tmp_path):
    out = ultramem("sweep", "refine", str(REPO / "sweeps/tiny_cpu.yaml"), "--out", "r.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "method is grid; `sweep refine` refines an IsoFLOP study" in out.stderr


@pytest.mark.slow
def test_refine_end_to_end_trains_only_the_new_runs(tmp_path):
    """(f) A tiny study (dense-o2 / dense-o3 at two budgets, one seed, ~3-7k tokens per run) trained through the
    scheduler; refine it (its minimum sits at an edge of two sizes) keeping the first addition; running the refined
    file trains that addition's run and nothing else: the study's final.json files are untouched."""
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: refine-e2e
        output_dir: runs
        method: isoflop
        isoflop:
          budgets: [3.0e+8, 6.0e+8]
          ladder: [dense-o2, dense-o3]
          tokens_per_param: [0.05, 1000]
        base:
          data: {{source: {SHAKESPEARE}, tokenizer: byte}}
          train: {{cooldown: 0.2, min_lr_ratio: 0.0, seq_len: 32, batch_size: 4, log_every: 50, eval_every: 1000,
                  eval_batches: 2, ckpt_every: 1000}}
        seeds: [0]
        resources:
          default: {{cpus: 1, memory_gb: 1}}
        wandb: {{mode: disabled}}
        """))
    out = ultramem("sweep", "run", "tiny.yaml", "--backend", "local", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = tmp_path / "runs"
    before = {p.parent.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in runs.glob("*/final.json")}
    assert len(before) == 4  # 2 trunks + 2 branches
    costs = ultramem("sweep", "refine", "tiny.yaml", "--out", "all.yaml", "--bootstrap", "100", cwd=tmp_path)
    assert costs.returncode == 0, costs.stderr
    first = float(re.search(r"; cost: (\S+) FLOPs", (tmp_path / "all.yaml").read_text()).group(1))
    out = ultramem("sweep", "refine", "tiny.yaml", "--out", "refined.yaml", "--bootstrap", "100", "--max-flops",
                   f"{first * 1.001:.6g}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "edge" in out.stdout and "total: 1 addition(s), 1 new run(s)" in out.stdout
    new = {r.run_id for r in plan_sweep(tmp_path / "refined.yaml").runs} - set(before)
    assert len(new) == 1
    out = ultramem("sweep", "run", "refined.yaml", "--backend", "local", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "4 already finished, 1 to run" in out.stdout
    after = {p.parent.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in runs.glob("*/final.json")}
    assert set(after) == set(before) | new
    assert {k: after[k] for k in before} == before
    final = json.loads((runs / next(iter(new)) / "final.json").read_text())
    assert final["val_loss"] > 0
