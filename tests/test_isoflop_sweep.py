"""The isoflop sweep method (docs/sweeps.md "IsoFLOP grids"): budgets x a size ladder -> the (N, D) grid as WSD
trunks with cooldown branches, the IsoFLOP hyperparameter rule, and the warnings when a budget cannot bracket its
optimum. References are computed here from the stated rules (C = F·D with F from ultramem.accounting, D/N window,
warmup = N tokens capped at 10% of the shortest run, beta2 0.99 below 128 x 2048 tokens), not from the planner."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from experiments import hparams
from experiments.sweep import load_sweep, plan_sweep, plan_table
from experiments.sweep.isoflop import IsoflopSpec, Size, layout
from ultramem.accounting import count_params, flops_per_token
from ultramem.config import ConfigError
from ultramem.presets import get_preset

REPO = Path(__file__).resolve().parents[1]
LADDER = ["dense-t1", "dense-t2", "dense-t3"]
BUDGETS = [1.0e12, 2.0e12, 4.0e12, 8.0e12]


def write(tmp_path: Path, isoflop: str, extra: str = "", name: str = "iso.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""\
        name: iso
        output_dir: {tmp_path / 'runs'}
        method: isoflop
        isoflop:
        """) + textwrap.indent(textwrap.dedent(isoflop), "  ") + textwrap.dedent("""\
        base:
          data: {source: embedded}
          train: {cooldown: 0.2, min_lr_ratio: 0.0}
        """) + textwrap.dedent(extra))
    return path


def preset_size(name: str) -> tuple[int, float]:
    """(N, F): active params and training FLOPs per token at the model's context, byte vocabulary (257)."""
    cfg = get_preset(name).override({"vocab_size": 257})
    return count_params(cfg).active, float(flops_per_token(cfg, cfg.seq_len, training=True))


def test_layout_matches_a_naive_enumeration():
    sizes = [Size(f"s{i}", "dense" if i < 4 else "moe", n, 7.0 * n) for i, n in
             enumerate([1e5, 2e5, 4e5, 8e5, 1e5, 3e5, 9e5])]
    spec = IsoflopSpec(budgets=[1e12, 3e12, 1e13], ladder=[s.preset for s in sizes], tokens_per_param=(3, 100))
    grid = layout(spec, sizes)
    want = {(s.preset, c) for s in sizes for c in spec.budgets if 3 <= c / (7.0 * s.n) / s.n <= 100}
    assert {(x.size.preset, x.budget) for x in grid.cells} == want
    for x in grid.cells:
        assert x.tokens == round(x.budget / x.size.flops_per_token)


def test_planner_lays_trunks_at_the_largest_budget_and_branches_at_the_others(tmp_path):
    path = write(tmp_path, f"""\
        budgets: {BUDGETS}
        ladder: {LADDER}
        tokens_per_param: [1, 200]
        """)
    plan = plan_sweep(path)
    sizes = {p: preset_size(p) for p in LADDER}
    for preset, (n, f) in sizes.items():
        served = [c for c in BUDGETS if 1 <= c / (f * n) <= 200]
        runs = [r for r in plan.runs if r.preset == preset]
        trunks = [r for r in runs if not r.branch_of]
        assert len(trunks) == 1 and len(runs) == len(served)
        trunk = trunks[0]
        assert trunk.config["train"]["schedule"] == "wsd"
        assert trunk.values["isoflop.budget"] == max(served)
        assert {r.values["isoflop.budget"] for r in runs} == set(served)
        assert all(r.branch_of == trunk.run_id for r in runs if r is not trunk)
        step = trunk.config["train"]["batch_size"] * trunk.config["train"]["seq_len"]
        for r in runs:  # each run is a point of its budget: C = F·D within half a step of tokens
            assert r.flops_per_token == pytest.approx(f)
            assert abs(r.flops - r.values["isoflop.budget"]) <= f * step / 2 + 1
    assert plan.totals()["isoflop"]["budgets"] == BUDGETS
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)


def test_independent_runs_without_branches(tmp_path):
    path = write(tmp_path, f"""\
        budgets: {BUDGETS}
        ladder: [dense-t1]
        tokens_per_param: [1, 200]
        branches: false
        """)
    plan = plan_sweep(path)
    n, f = preset_size("dense-t1")
    assert sorted(r.values["isoflop.budget"] for r in plan.runs) == [c for c in BUDGETS if 1 <= c / (f * n) <= 200]
    assert not any(r.branch_of for r in plan.runs)
    assert len({r.name for r in plan.runs}) == len(plan.runs)


def test_isoflop_hparams_rule_is_opt_in_and_recorded_in_the_config(tmp_path):
    body = f"""\
        budgets: {BUDGETS}
        ladder: {LADDER}
        tokens_per_param: [1, 200]
        """
    ruled = plan_sweep(write(tmp_path, body + "hparams: isoflop\n", name="a.yaml"))
    plain = plan_sweep(write(tmp_path, body, name="b.yaml"))
    for r in plain.runs:  # the ladder rule: TrainConfig's beta2 and a warmup fraction of 1% with its floor
        assert r.config["train"]["beta2"] == 0.95
    for preset in LADDER:
        runs = [r for r in ruled.runs if r.preset == preset]
        t = [r.config["train"] for r in runs]
        assert len({x["batch_size"] for x in t}) == 1 and len({x["warmup"] for x in t}) == 1
        n, _ = preset_size(preset)
        tokens_per_step = t[0]["batch_size"] * t[0]["seq_len"]
        shortest = min(x["steps"] for x in t)
        assert shortest >= 95  # the batch cap keeps the shortest run at ~100 steps (the batch is rounded)
        want = max(1, min(math.ceil(n / tokens_per_step), math.floor(0.1 * shortest)))  # N tokens, <= 10%
        assert t[0]["warmup"] == want
        assert t[0]["beta2"] == (0.99 if tokens_per_step < 128 * 2048 else 0.95)
        assert t[0]["lr"] == pytest.approx(min(3e-3, 1.5073 * n**-0.42068))


def naive_steps_batch(tokens: float, seq_len: int, steps: int) -> int:
    """The power of two (>= 1) nearest in log to tokens / (steps x seq_len), by enumeration."""
    want = tokens / (steps * seq_len)
    return min((2**k for k in range(20)), key=lambda b: (abs(math.log(b / want)), b))


@pytest.mark.parametrize(("tokens", "seq_len", "steps"), [
    (1.2e5, 256, 4096), (9.7e5, 256, 4096), (1.9e6, 256, 4096), (3.9e6, 256, 4096), (3.0e6, 256, 1000),
    (1e10, 2048, 4096), (5e4, 64, 100)])
def test_steps_batch_is_the_nearest_power_of_two_to_the_target_steps(tokens, seq_len, steps):
    assert hparams.steps_batch_size(tokens, seq_len, steps) == naive_steps_batch(tokens, seq_len, steps)
    assert hparams.steps_batch_size(tokens, seq_len, steps, multiple=4) % 4 == 0


def test_batch_from_the_run_length_splits_a_size_into_one_trunk_per_batch(tmp_path):
    """isoflop.batch: steps gives every run (trunk, branch or single) the batch its own D calls for; a size
    whose budgets call for different batches is several WSD trunks, each with its own branches."""
    path = write(tmp_path, f"""\
        budgets: {BUDGETS}
        ladder: {LADDER}
        tokens_per_param: [1, 200]
        hparams: isoflop
        batch: steps
        target_steps: 300
        """)
    plan = plan_sweep(path)
    by_id = {r.run_id: r for r in plan.runs}
    trunks_of = {}
    for r in plan.runs:
        t = r.config["train"]
        assert t["batch_size"] == naive_steps_batch(r.tokens, t["seq_len"], 300), r.name
        if r.branch_of:
            trunk = by_id[r.branch_of]
            assert trunk.config["train"]["batch_size"] == t["batch_size"] and trunk.tokens > r.tokens
        else:
            trunks_of.setdefault(r.preset, []).append(t["batch_size"])
    assert any(len(b) > 1 for b in trunks_of.values())  # the rule does split some size
    for batches in trunks_of.values():
        assert len(set(batches)) == len(batches)  # one trunk per batch
    budgets_served = {(r.preset, r.values["isoflop.budget"]) for r in plan.runs}
    grid = plan_sweep(write(tmp_path, f"budgets: {BUDGETS}\nladder: {LADDER}\ntokens_per_param: [1, 200]\n",
                            name="plain.yaml"))
    assert budgets_served == {(r.preset, r.values["isoflop.budget"]) for r in grid.runs}  # same grid


def test_explicit_train_values_win_over_the_rule(tmp_path):
    path = write(tmp_path, f"""\
        budgets: {BUDGETS}
        ladder: [dense-t1]
        tokens_per_param: [1, 200]
        hparams: isoflop
        """, name="c.yaml")
    text = path.read_text().replace("train: {cooldown: 0.2, min_lr_ratio: 0.0}",
                                    "train: {cooldown: 0.2, min_lr_ratio: 0.0, beta2: 0.98, batch_size: 4}")
    path.write_text(text)
    for r in plan_sweep(path).runs:
        assert r.config["train"]["beta2"] == 0.98 and r.config["train"]["batch_size"] == 4


def test_warnings_name_the_budgets_that_cannot_bracket_their_optimum(tmp_path):
    path = write(tmp_path, f"""\
        budgets: {BUDGETS}
        ladder: {LADDER}
        """)  # default window 3-100: the tiny ladder puts at most 2 sizes in it
    plan = plan_sweep(path)
    warnings = plan.warnings
    assert any(w.startswith("dense at C = 1e+12") and "(want >= 5)" in w for w in warnings)
    assert any("does not bracket the expected optimum at 20" in w for w in warnings)
    assert any("Approach 2" in w for w in warnings)  # fewer than 3 budgets with 3 sizes
    text = plan_table(plan)
    assert "IsoFLOP grid" in text and "budget C" in text and "warning(s)" in text


@pytest.mark.parametrize(("isoflop", "extra", "expected"), [
    ("budgets: [2.0e12, 1.0e12]\nladder: [dense-t1]\n", "", ["isoflop.budgets", "ascending"]),
    ("budgets: [1.0e12, 1.1e12]\nladder: [dense-t1]\n", "", ["isoflop.budgets", "1.25x"]),
    ("budgets: [1.0e12, 2.0e12]\nladder: [dense-t1]\ntokens_per_param: [100, 3]\n", "", ["tokens_per_param"]),
    ("budgets: [1.0e12, 2.0e12]\nladder: [dense-t1]\nhparams: porian\n", "", ["isoflop.hparams"]),
    ("budgets: [1.0e12, 2.0e12]\nladder: [dense-t1]\nbatch: steps\n", "", ["isoflop", "hparams: isoflop"]),
    ("budgets: [1.0e12, 2.0e12]\nladder: [dense-t1]\nhparams: isoflop\nbatch: steps\ntarget_steps: 10\n", "",
     ["isoflop.target_steps"]),
    ("budgets: [1.0e12, 2.0e12]\nladder: [dense-t1]\n", "parameters: {model.preset: {values: [dense-t2]}}\n",
     ["model.preset", "isoflop.ladder"]),
])
def test_invalid_isoflop_blocks_name_the_file_and_field(tmp_path, isoflop, extra, expected):
    path = write(tmp_path, isoflop, extra)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert str(path) in msg
    for part in expected:
        assert part in msg, msg


@pytest.mark.parametrize(("train", "expected"), [
    ("tokens: 1.0e6", "train.tokens is set by the isoflop method"),
    ("branches: [1.0e5]", "train.branches is set by the isoflop method"),
    ("schedule: cosine", "isoflop.branches is true"),
])
def test_train_fields_the_method_sets_are_refused(tmp_path, train, expected):
    path = write(tmp_path, f"budgets: {BUDGETS}\nladder: [dense-t1]\ntokens_per_param: [1, 200]\n")
    path.write_text(path.read_text().replace("min_lr_ratio: 0.0}", f"min_lr_ratio: 0.0, {train}}}"))
    with pytest.raises(ConfigError, match=expected) as err:
        plan_sweep(path)
    assert str(path) in str(err.value)


def test_shipped_isoflop_tiny_sweep():
    plan = plan_sweep(REPO / "sweeps/isoflop_tiny.yaml")
    spec = plan.sweep.isoflop
    assert spec.budgets[-1] / spec.budgets[0] >= 10**1.5  # >= 1.5 decades
    assert {r.family for r in plan.runs} == {"dense", "moe", "ultramem"}
    assert spec.hparams == "isoflop" and all(r.config["train"]["beta2"] == 0.99 for r in plan.runs)
    for r in plan.runs:
        assert r.flops == pytest.approx(r.values["isoflop.budget"], rel=0.02)
    t = plan.totals()
    assert t["branches"] > 0 and t["saved_flops"] > 0


def test_max_tokens_drops_the_cells_that_would_train_longer():
    sizes = [Size(f"s{i}", "dense", n, 7.0 * n) for i, n in enumerate([1e5, 2e5, 4e5])]
    budgets = [1e12, 3e12, 1e13]
    spec = IsoflopSpec(budgets=budgets, ladder=[s.preset for s in sizes], tokens_per_param=(3, 100),
                       max_tokens=5e6)
    grid = layout(spec, sizes)
    inside = {(s.preset, c): round(c / (7.0 * s.n)) for s in sizes for c in budgets
              if 3 <= c / (7.0 * s.n) / s.n <= 100}  # D = C / F, the window alone
    assert {(x.size.preset, x.budget) for x in grid.cells} == {k for k, d in inside.items() if d <= 5e6}
    assert {(x.size.preset, x.budget) for x in grid.capped} == {k for k, d in inside.items() if d > 5e6}
    assert grid.capped and all(x.tokens <= 5e6 for x in grid.cells)
    assert any("max_tokens" in w for w in grid.warnings)


def test_plan_of_some_seeds_keeps_the_run_ids_and_refuses_unknown_seeds(tmp_path):
    path = write(tmp_path, f"""\
        budgets: {BUDGETS}
        ladder: {LADDER}
        tokens_per_param: [1, 200]
        """, extra="seeds: [0, 1, 2]\n")
    plan = plan_sweep(path)
    part = plan.only_seeds([1])
    assert {r.run_id for r in part.runs} == {r.run_id for r in plan.runs if r.config["seed"] == 1}
    assert len(part.runs) == len(plan.runs) // 3
    assert all(r.branch_of in {t.run_id for t in part.runs} for r in part.runs if r.branch_of)  # trunks come along
    with pytest.raises(ConfigError, match=r"--seeds 7: not among the seeds of this sweep \(0, 1, 2\)") as err:
        plan.only_seeds([0, 7])
    assert str(path) in str(err.value)


def test_plan_without_done_runs_keeps_a_trunk_until_all_its_branches_are_done(tmp_path):
    path = write(tmp_path, f"""\
        budgets: {BUDGETS}
        ladder: {LADDER}
        tokens_per_param: [1, 200]
        """, extra="seeds: [0, 1]\n")
    plan = plan_sweep(path)
    branches = [r for r in plan.runs if r.branch_of]
    trunk = branches[0].branch_of
    own = [r.run_id for r in branches if r.branch_of == trunk]
    assert own
    # the trunk and all but one of its branches finished elsewhere: the trunk trains again for the missing branch
    done = {trunk, *own[1:]}
    left = {r.run_id for r in plan.without_done(done).runs}
    assert left == {r.run_id for r in plan.runs} - set(own[1:])
    # all of them done: none of them trains; the rest of the plan is untouched
    left = {r.run_id for r in plan.without_done({trunk, *own}).runs}
    assert left == {r.run_id for r in plan.runs} - {trunk, *own}
    assert plan.without_done(set()).runs == plan.runs


@pytest.mark.parametrize("sweep", ["study_isoflop", "study_isoflop_v2"])
def test_shipped_study_isoflop_sweep(sweep):
    """The committed study's design (issue 14): dense / MoE / UltraMem, >= 6 budgets over >= 1.5 decades, >= 5
    sizes per family, 3 seeds, no run longer than 4 epochs of tinyshakespeare's training split (1,056,718 bytes);
    the second design takes each run's batch from its length (~4096 steps, a power of two sequences)."""
    plan = plan_sweep(REPO / f"sweeps/{sweep}.yaml")
    spec = plan.sweep.isoflop
    assert len(spec.budgets) >= 6 and spec.budgets[-1] / spec.budgets[0] >= 10**1.5
    assert {r.family for r in plan.runs} == {"dense", "moe", "ultramem"}
    assert plan.sweep.seeds == [0, 1, 2]
    assert max(r.tokens for r in plan.runs) <= 4 * 1_056_718
    for family in ("dense", "moe", "ultramem"):
        runs = [r for r in plan.runs if r.family == family and r.config["seed"] == 0]
        assert len({r.preset for r in runs}) >= 5
        per_budget = [len({r.preset for r in runs if r.values["isoflop.budget"] == c}) for c in spec.budgets]
        assert all(k >= 3 for k in per_budget) and sum(k >= 5 for k in per_budget) >= 4, (family, per_budget)
    for r in plan.runs:
        assert r.flops == pytest.approx(r.values["isoflop.budget"], rel=0.02)
    if plan.sweep.isoflop.batch == "steps":
        for r in plan.runs:
            t = r.config["train"]
            assert t["batch_size"] == naive_steps_batch(r.tokens, t["seq_len"], 4096)
            assert t["steps"] <= 4096 * 2**0.5 + 1 and (t["steps"] >= 4096 / 2**0.5 or t["batch_size"] == 1)
