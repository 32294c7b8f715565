"""LR scans (issue 26 item 2): the optimum of a parabola in log LR against synthetic loss-vs-LR surfaces with a known
optimum, the per-family law lr*(N) against a known power law, the `lr_scan` sweep method, the fitted-rule opt-in of
IsoFLOP sweeps, and the bad-input errors (exit 2)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.checks import FitError
from analysis.hparams import (
    ScanAddition,
    compare_variants,
    extra_yaml,
    fit_law,
    fit_optima,
    fitted_rule,
    lr_optimum,
    lr_table,
    scan_additions,
    variant_of,
)
from experiments.hparams import fitted_lr, load_fitted_rule
from experiments.sweep import plan_sweep
from ultramem.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"


@pytest.fixture(autouse=True)
def _at_the_repository(monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped sweeps name their data relative to the checkout


def ultramem(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def surface(rng: np.random.Generator, lr_star: float, grid: np.ndarray, seeds: int, noise: float = 0.02,
            curvature: float = 0.08, seed_sd: float = 0.03, diverge_above: float = math.inf) -> pd.DataFrame:
    """loss = 2 + k ln(lr / lr*)^2 + a per-seed offset + noise; runs above `diverge_above` x lr* blow up to ~5
    nats (the far side of a real scan). The optimum is lr* by construction."""
    rows = []
    for s in range(seeds):
        offset = rng.normal(0, seed_sd)
        for lr in grid:
            x = math.log(lr / lr_star)
            loss = 2 + curvature * x * x + offset + rng.normal(0, noise)
            if lr > diverge_above * lr_star:
                loss = 5 + rng.normal(0, 0.3)
            rows.append({"lr": lr, "val_loss": loss, "seed": s})
    return pd.DataFrame(rows)


# ---- one (family, size) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seeds", [3, 5])
def test_optimum_interval_covers_the_known_optimum(seeds):
    """Over 120 synthetic scans (7 LRs a factor 2 apart, the two largest diverged), the 95% interval holds the true
    optimum in about 95% of them, and the point estimates centre on it."""
    rng = np.random.default_rng(seeds)
    grid = 3e-3 * 2.0 ** np.arange(-3, 4)
    hits, errors = 0, []
    trials = 120
    for t in range(trials):
        lr_star = 3e-3 * 2 ** rng.uniform(-1, 1)  # never at the grid's edge
        df = surface(rng, lr_star, grid, seeds, diverge_above=3.0)
        o = lr_optimum(df["lr"], df["val_loss"], df["seed"], n_boot=200, seed_rng=t)
        assert o.edge is None and o.reliable
        hits += o.lo <= lr_star <= o.hi
        errors.append(math.log(o.lr / lr_star))
    coverage = hits / trials
    assert 0.88 <= coverage <= 1.0, coverage  # nominal 0.95; 120 trials: binomial sd 0.02
    assert abs(np.median(errors)) < 0.05  # ln units: within 5% of lr*
    assert np.quantile(np.abs(errors), 0.9) < 0.35


def test_the_parabola_ignores_diverged_runs_far_from_the_optimum():
    """Runs at 8x-32x the optimum (diverged, loss ~5) lie outside the 5-LR window, so they do not tilt the vertex;
    an unwindowed parabola through all 9 LRs would be pulled far off."""
    rng = np.random.default_rng(0)
    grid = 1e-3 * 2.0 ** np.arange(-2, 7)  # optimum 1e-3 at index 2
    df = surface(rng, 1e-3, grid, 3, noise=0.005, diverge_above=6.0)
    o = lr_optimum(df["lr"], df["val_loss"], df["seed"], n_boot=200)
    assert abs(math.log(o.lr / 1e-3)) < 0.1
    c, b, _ = np.polyfit(np.log(df["lr"]), df["val_loss"], 2)  # the unwindowed fit, for contrast
    assert abs(-b / (2 * c) - math.log(1e-3)) > 0.5


@pytest.mark.parametrize(("lr_star", "edge"), [(1e-4, "low"), (1.0, "high")])
def test_an_optimum_outside_the_grid_is_flagged(lr_star, edge):
    rng = np.random.default_rng(1)
    grid = 3e-3 * 2.0 ** np.arange(-2, 3)
    df = surface(rng, lr_star, grid, 3, noise=0.005)
    o = lr_optimum(df["lr"], df["val_loss"], df["seed"], n_boot=50)
    assert o.edge == edge
    assert o.best_grid_lr == (grid[0] if edge == "low" else grid[-1])


def test_a_scan_without_a_minimum_is_flagged():
    grid = 3e-3 * 2.0 ** np.arange(-2, 3)
    x = np.log(grid / 3e-3)
    df = pd.DataFrame({"lr": np.tile(grid, 2), "val_loss": np.tile(2 - 0.05 * x * x, 2), "seed": [0] * 5 + [1] * 5})
    assert lr_optimum(df["lr"], df["val_loss"], df["seed"], n_boot=20).edge == "no-minimum"


def test_a_grid_of_two_lrs_is_an_error():
    with pytest.raises(FitError, match="needs at least 3"):
        lr_optimum([1e-3, 2e-3, 1e-3, 2e-3], [2.1, 2.0, 2.2, 2.0], [0, 0, 1, 1])


# ---- the law lr*(N) ----------------------------------------------------------------------------------------


def scan_table(rng: np.random.Generator, coef: float, exponent: float, sizes: list[float], seeds: int = 5,
               family: str = "dense") -> pd.DataFrame:
    frames = []
    for n in sizes:
        lr_star = coef * n**exponent
        grid = lr_star * 2.0 ** np.arange(-3, 4) * 2 ** rng.uniform(-0.5, 0.5)
        df = surface(rng, lr_star, grid, seeds)
        frames.append(df.assign(family=family, active_params=n))
    return pd.concat(frames, ignore_index=True)


def test_law_interval_covers_the_known_exponent():
    """lr*(N) = 0.4 N^-0.3 at 4 sizes (1e4-1e6), 5 seeds: the 95% interval of the exponent holds -0.3 in most of 40
    synthetic scans, and the fitted law predicts lr* within its band."""
    rng = np.random.default_rng(3)
    hits, trials = 0, 40
    for t in range(trials):
        runs = scan_table(rng, 0.4, -0.3, [1e4, 1e5 / 3, 1e5, 1e6])
        groups = lr_table(runs)
        optima = fit_optima(groups, n_boot=100, seed=t)
        law = fit_law("dense", groups, optima, n_boot=100, seed=t)
        hits += law.exponent_ci[0] <= -0.3 <= law.exponent_ci[1]
    assert hits / trials >= 0.8, hits / trials
    assert abs(law.exponent + 0.3) < 0.1 and law.n_min == 1e4 and law.n_max == 1e6
    true = 0.4 * np.asarray(law.band_n) ** -0.3
    assert np.mean((np.asarray(law.band_lo) <= true) & (true <= np.asarray(law.band_hi))) > 0.5


# ---- the fitted rule: written by the analysis, read by the planner ------------------------------------------


def write_rule(path: Path, families: dict[str, tuple[float, float, float, float]]) -> Path:
    """A fitted-rule file, made by the analysis from synthetic scans with the given (coef, exponent, n_min, n_max)."""
    rng = np.random.default_rng(7)
    frames = [scan_table(rng, c, e, list(np.geomspace(lo, hi, 3)), seeds=3, family=f)
              for f, (c, e, lo, hi) in families.items()]
    runs = pd.concat(frames, ignore_index=True)
    groups = lr_table(runs)
    optima = fit_optima(groups, n_boot=50)
    laws = {f: fit_law(f, groups, optima, n_boot=50) for f in families}
    path.write_text(json.dumps(fitted_rule(optima, laws, "synthetic")))
    return path


def test_the_fitted_rule_round_trips_and_refuses_what_it_does_not_cover(tmp_path):
    path = write_rule(tmp_path / "lr_rule.json", {"dense": (0.4, -0.3, 1e4, 1e6)})
    rule = load_fitted_rule(path)
    assert fitted_lr(rule, "dense", 100_000, "here") == pytest.approx(0.4 * 1e5**-0.3, rel=0.15)
    with pytest.raises(ConfigError, match="no fitted LR law for family 'moe'"):
        fitted_lr(rule, "moe", 100_000, "here")
    with pytest.raises(ConfigError, match=r"above the range .*extrapolate .* by 3x in N"):
        fitted_lr(rule, "dense", 3_000_000, "here")
    (tmp_path / "bad.json").write_text('{"kind": "something else"}')
    with pytest.raises(ConfigError, match="not a fitted LR rule"):
        load_fitted_rule(tmp_path / "bad.json")


def fitted_copy(tmp_path: Path, rule: Path) -> Path:
    """sweeps/isoflop_tiny.yaml with `hparams: fitted` pointing at `rule` (same data path, so same run configs)."""
    sweep = yaml.safe_load((SWEEPS / "isoflop_tiny.yaml").read_text())
    sweep["isoflop"].update(hparams="fitted", hparams_file=str(rule))
    path = tmp_path / "isoflop_fitted.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_an_isoflop_sweep_opts_into_the_fitted_rule(tmp_path):
    """Every run takes lr = coef N^exponent of its family's law (N active); batch, warmup and beta2 stay the IsoFLOP
    rule's, so only the LR (and hence the run ids) differ from isoflop_tiny's; isoflop_tiny itself is unchanged."""
    rule = write_rule(tmp_path / "lr_rule.json", {f: (0.05, -0.2, 1e5, 2e6) for f in ("dense", "moe", "ultramem")})
    laws = json.loads(rule.read_text())["families"]
    shipped = plan_sweep(SWEEPS / "isoflop_tiny.yaml")
    fitted = plan_sweep(fitted_copy(tmp_path, rule))
    assert len(fitted.runs) == len(shipped.runs)
    for a, b in zip(shipped.runs, fitted.runs, strict=True):
        law = laws[b.family]
        assert b.config["train"]["lr"] == pytest.approx(law["coef"] * b.active_params ** law["exponent"])
        assert a.config["train"]["lr"] == 3e-3  # the shared rule (its cap) at these sizes
        for key in ("batch_size", "warmup", "beta2", "steps", "tokens"):
            assert a.config["train"][key] == b.config["train"][key]
    assert len({r.run_id for r in fitted.runs} & {r.run_id for r in shipped.runs}) == 0


def test_a_fitted_rule_that_misses_a_family_or_a_size_is_exit_2(tmp_path):
    rule = write_rule(tmp_path / "dense_only.json", {"dense": (0.05, -0.2, 1e5, 2e6)})
    out = ultramem("sweep", "plan", str(fitted_copy(tmp_path, rule)))
    assert out.returncode == 2 and "no fitted LR law for family 'moe'" in out.stderr
    narrow = write_rule(tmp_path / "narrow.json", {f: (0.05, -0.2, 1e5, 3e5) for f in ("dense", "moe", "ultramem")})
    out = ultramem("sweep", "plan", str(fitted_copy(tmp_path, narrow)))
    assert out.returncode == 2 and "would extrapolate" in out.stderr and "above the range" in out.stderr


def test_an_allowed_extrapolation_uses_the_law_beyond_its_range_and_says_so(tmp_path):
    """`isoflop.hparams_extrapolate: k` lets the law serve sizes up to k x beyond its fitted range (with the law's own
    value, coef N^exponent) and the plan names each such size; k below the factor needed is exit 2 naming it."""
    narrow = write_rule(tmp_path / "narrow.json", {f: (0.05, -0.2, 1e5, 3e5) for f in ("dense", "moe", "ultramem")})
    laws = json.loads(narrow.read_text())["families"]
    sweep = yaml.safe_load(fitted_copy(tmp_path, narrow).read_text())
    plan = plan_sweep(SWEEPS / "isoflop_tiny.yaml")
    need = max(max(r.active_params / laws[r.family]["n_max"], laws[r.family]["n_min"] / r.active_params)
               for r in plan.runs)
    assert need > 1.2  # the tiny ladder leaves this rule's range
    sweep["isoflop"]["hparams_extrapolate"] = round(need, 1) + 0.1
    path = tmp_path / "extrapolated.yaml"
    path.write_text(yaml.safe_dump(sweep))
    allowed = plan_sweep(path)
    for r in allowed.runs:
        law = laws[r.family]
        assert r.config["train"]["lr"] == pytest.approx(law["coef"] * r.active_params ** law["exponent"])
    outside = {r.preset for r in allowed.runs
               if not law_range(laws[r.family])[0] <= r.active_params <= law_range(laws[r.family])[1]}
    named = {w.split(":")[0] for w in allowed.warnings if "LR extrapolated" in w}
    assert outside and named == outside
    sweep["isoflop"]["hparams_extrapolate"] = 1.1
    path.write_text(yaml.safe_dump(sweep))
    out = ultramem("sweep", "plan", str(path))
    assert out.returncode == 2 and "isoflop.hparams_extrapolate:" in out.stderr and "would extrapolate" in out.stderr
    sweep["isoflop"].update(hparams="isoflop", hparams_file=None, hparams_extrapolate=2.0)
    path.write_text(yaml.safe_dump(sweep))
    out = ultramem("sweep", "plan", str(path))
    assert out.returncode == 2 and "hparams_extrapolate applies to hparams: fitted only" in out.stderr


def law_range(law: dict) -> tuple[float, float]:
    return law["n_min"] * (1 - 1e-9), law["n_max"] * (1 + 1e-9)


# ---- the lr_scan sweep method ------------------------------------------------------------------------------


def test_lr_scan_plans_factors_of_the_rule():
    """lr_scan_tiny: 2 sizes x 3 factors x 2 seeds; at these sizes the rule is its cap 3e-3, so the LRs are
    0.25, 1 and 4 times it, and every run of a size trains ~2 tokens per active parameter."""
    plan = plan_sweep(SWEEPS / "lr_scan_tiny.yaml")
    assert len(plan.runs) == 12 and len({r.run_id for r in plan.runs}) == 12
    for r in plan.runs:
        factor = r.values["lr_scan.factor"]
        assert r.config["train"]["lr"] == pytest.approx(factor * 3e-3)
        assert r.tokens == pytest.approx(2 * r.active_params, rel=0.01)
        assert r.name.endswith(f"@lr={factor:g}x")
    by_size = {}
    for r in plan.runs:
        by_size.setdefault((r.preset, r.config["seed"]), set()).add(r.config["train"]["lr"])
    assert all(len(v) == 3 for v in by_size.values()) and len(by_size) == 4


def test_the_real_scan_plans():
    plan = plan_sweep(SWEEPS / "hparams_scan.yaml")
    assert {r.family for r in plan.runs} == {"dense", "moe", "ultramem"}
    assert len({r.preset for r in plan.runs}) == 12 and len(plan.runs) == 12 * 5  # seed 0; more by --refine
    assert all(r.config["data"]["source"].endswith("english_mix.txt") for r in plan.runs)
    by_size: dict[tuple, list] = {}
    for r in plan.runs:
        by_size.setdefault((r.preset, r.config["seed"]), []).append(r)
    for runs in by_size.values():  # one recipe per size (the IsoFLOP rule's batch, warmup, beta2), only the LR varies
        assert sorted(r.config["train"]["lr"] for r in runs) == pytest.approx([f * 3e-3 for f in (0.25, 0.5, 1, 2, 4)])
        assert len({(r.config["train"]["batch_size"], r.config["train"]["warmup"], r.config["train"]["beta2"],
                     r.tokens) for r in runs}) == 1
        assert runs[0].tokens == pytest.approx(20 * runs[0].active_params, rel=0.01)


def test_a_table_mixing_token_budgets_is_refused():
    rng = np.random.default_rng(0)
    grid = 3e-3 * 2.0 ** np.arange(-2, 3)
    runs = pd.concat([surface(rng, 3e-3, grid, 2).assign(tokens=t) for t in (1e5, 2e5)])
    with pytest.raises(FitError, match="2 token budgets"):
        lr_table(runs.assign(family="dense", active_params=1e4))


@pytest.mark.parametrize(("change", "message"), [
    ({"lr_factors": [0.5, 1]}, "needs at least 3"),
    ({"lr_factors": [1, 0.5, 2]}, "ascending"),
])
def test_a_bad_lr_scan_block_is_exit_2(tmp_path, change, message):
    sweep = yaml.safe_load((SWEEPS / "lr_scan_tiny.yaml").read_text())
    sweep["lr_scan"].update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = ultramem("sweep", "plan", str(path))
    assert out.returncode == 2 and message in out.stderr and "lr_scan.lr_factors" in out.stderr


def test_hparams_refuses_a_two_lr_table(tmp_path):
    rng = np.random.default_rng(0)
    runs = surface(rng, 1e-3, np.array([1e-3, 2e-3]), 2).assign(family="dense", active_params=1e4, run_id="r")
    runs.to_csv(tmp_path / "runs.csv", index=False)
    out = ultramem("hparams", str(tmp_path / "runs.csv"))
    assert out.returncode == 2 and "needs at least 3" in out.stderr and "dense at N = 1e+04" in out.stderr


def test_what_the_rule_costs_has_an_interval_that_covers_the_known_gap():
    """A surface with lr* = 2x the rule: the rule's LR costs k ln(2)^2 = 0.0384 nats by construction. Over 40 scans
    (5 seeds, per-seed offsets larger than the gap, which the pairing must remove) the estimate is unbiased and the
    95% interval covers the known gap in >= 85% of them."""
    from analysis.hparams import rule_gap

    known = 0.08 * math.log(2.0) ** 2
    grid = 3e-3 * 2.0 ** np.arange(-2, 3)
    gaps, covered = [], 0
    for i in range(40):
        runs = surface(np.random.default_rng(100 + i), 6e-3, grid, 5, noise=0.01, seed_sd=0.05)
        groups = lr_table(runs.assign(family="dense", active_params=1e4))
        (opt,) = fit_optima(groups, n_boot=200)
        gap, lo, hi = rule_gap(groups[0], opt, 3e-3, n_boot=200)
        gaps.append(gap)
        covered += lo <= known <= hi
    assert np.mean(gaps) == pytest.approx(known, abs=0.006)
    assert covered >= 34
    assert all(math.isnan(v) for v in rule_gap(groups[0], opt, 5e-3))  # the grid lacks 5e-3: no number


# ---- variants at one size (issue 26 item 3) --------------------------------------------------------------------


def test_variant_names_drop_seed_and_lr():
    assert variant_of("ultramem-o4-vlr1-s2@lr=0.5x") == "ultramem-o4-vlr1"
    assert variant_of("dense-o4-s0@lr=1x") == "dense-o4" and variant_of(None) == ""


def test_variants_compare_at_their_own_best_lr_with_paired_intervals():
    """Three variants at one rung with known minima (2.00, 2.10, 2.05) at different optimal LRs, sharing per-seed
    offsets (a seed's data order): each difference is the known one, its paired interval covers it and is narrower
    than the seed spread, and the law uses the presets only (a sweep-local variant is a comparison)."""
    rng = np.random.default_rng(7)
    grid = 3e-3 * 2.0 ** np.arange(-2, 3)
    offsets = rng.normal(0, 0.05, 4)  # larger than the differences' noise: pairing must remove it
    rows = []
    for name, preset, family, star, floor in [("ultramem-o4-x6", "ultramem-o4-x6", "ultramem", 3e-3, 2.10),
                                              ("ultramem-o4-vlr1", "ultramem-o4-x6", "ultramem", 6e-3, 2.00),
                                              ("moe-o4-2in9", "moe-o4-2in9", "moe", 1.5e-3, 2.05)]:
        for s, off in enumerate(offsets):
            for lr in grid:
                loss = floor + 0.08 * math.log(lr / star) ** 2 + off + rng.normal(0, 0.004)
                rows.append({"family": family, "active_params": 49_000 if family != "moe" else 50_200, "lr": lr,
                             "seed": s, "val_loss": loss, "name": f"{name}-s{s}@lr={lr / 3e-3:g}x",
                             "preset": preset})
    groups = lr_table(pd.DataFrame(rows))
    assert [(g["variant"], g["base"]) for g in groups] == [
        ("moe-o4-2in9", True), ("ultramem-o4-vlr1", False), ("ultramem-o4-x6", True)]
    optima = fit_optima(groups, n_boot=300)
    out = {r["variant"]: r for r in compare_variants(groups, optima, n_boot=300)}
    assert out["ultramem-o4-x6"]["diff_moe"] == pytest.approx(0.05, abs=0.01)
    assert out["ultramem-o4-vlr1"]["diff_moe"] == pytest.approx(-0.05, abs=0.01)
    assert out["ultramem-o4-vlr1"]["diff_base"] == pytest.approx(-0.10, abs=0.01)
    assert out["ultramem-o4-vlr1"]["vs_base"] == "ultramem-o4-x6" and out["ultramem-o4-x6"]["vs_base"] == ""
    for r, known in ((out["ultramem-o4-x6"], 0.05), (out["ultramem-o4-vlr1"], -0.05)):
        assert r["lo_moe"] <= known <= r["hi_moe"] and r["hi_moe"] - r["lo_moe"] < 0.05
    assert math.isnan(out["moe-o4-2in9"]["diff_moe"])
    assert fit_law("ultramem", groups, optima) is None  # one preset size: the variant is no second size


def test_a_recipe_variant_meets_the_moe_of_its_own_recipe():
    """ultramem-o4-b4 and moe-o4-b4 (one recipe, e.g. another batch) beside the presets: the UltraMem variant's "vs
    MoE" is against moe-o4-b4 (known difference +0.03), not the preset MoE (+0.13); a variant with no MoE of its
    recipe (ultramem-o4-vlr1) still meets the preset MoE."""
    rng = np.random.default_rng(3)
    grid = 3e-3 * 2.0 ** np.arange(-1, 2)
    rows = []
    for name, preset, family, floor in [("moe-o4-2in9", "moe-o4-2in9", "moe", 2.00),
                                        ("moe-o4-b4", "moe-o4-2in9", "moe", 2.10),
                                        ("ultramem-o4-x6", "ultramem-o4-x6", "ultramem", 2.08),
                                        ("ultramem-o4-b4", "ultramem-o4-x6", "ultramem", 2.13),
                                        ("ultramem-o4-vlr1", "ultramem-o4-x6", "ultramem", 2.09)]:
        for s in range(3):
            for lr in grid:
                loss = floor + 0.08 * math.log(lr / 3e-3) ** 2 + rng.normal(0, 0.003)
                rows.append({"family": family, "active_params": 49_000 if family != "moe" else 50_200, "lr": lr,
                             "seed": s, "val_loss": loss, "name": f"{name}-s{s}@lr={lr / 3e-3:g}x",
                             "preset": preset})
    groups = lr_table(pd.DataFrame(rows))
    out = {r["variant"]: r for r in compare_variants(groups, fit_optima(groups, n_boot=100), n_boot=100)}
    assert out["ultramem-o4-b4"]["vs_moe"] == "moe-o4-b4"
    assert out["ultramem-o4-b4"]["diff_moe"] == pytest.approx(0.03, abs=0.01)
    assert out["ultramem-o4-vlr1"]["vs_moe"] == "moe-o4-2in9"
    assert out["ultramem-o4-vlr1"]["diff_moe"] == pytest.approx(0.09, abs=0.01)
    assert out["moe-o4-b4"]["vs_moe"] == "" and out["moe-o4-b4"]["vs_base"] == "moe-o4-2in9"


# ---- refining a scan (lr_scan.extra, `ultramem hparams --refine`) ---------------------------------------------

FACTORS = [0.25, 0.5, 1.0, 2.0, 4.0]


def _scan(rng, lr_star_factor: float, seeds: int, **kw) -> tuple[object, list[tuple[float, int]]]:
    runs = surface(rng, lr_star_factor * 3e-3, 3e-3 * np.array(FACTORS), seeds, **kw)
    opt = lr_optimum(runs["lr"], runs["val_loss"], runs["seed"], family="dense", n=1e4, n_boot=100)
    return opt, [(lr / 3e-3, int(s)) for lr, s in zip(runs["lr"], runs["seed"], strict=True)]


def test_refine_adds_seeds_at_the_three_lrs_around_an_inside_optimum():
    """One seed, optimum at 2x the rule: seeds 1 and 2 at 1x, 2x and 4x, nothing elsewhere."""
    opt, runs = _scan(np.random.default_rng(1), 2.0, 1, noise=0.002)
    assert opt.edge is None
    adds = scan_additions("dense-o1", opt, runs, min_seeds=3)
    assert [(a.lr_factors, a.seeds) for a in adds] == [([1.0, 2.0, 4.0], [1, 2])]
    assert "optimum inside the grid near factor 2" in adds[0].why


@pytest.mark.parametrize(("star", "edge", "new"), [(16.0, "high", [8.0, 16.0]), (0.03, "low", [0.125, 0.0625])])
def test_refine_extends_the_grid_beyond_an_edge(star, edge, new):
    opt, runs = _scan(np.random.default_rng(2), star, 2, noise=0.002)
    assert opt.edge == edge
    adds = scan_additions("dense-o1", opt, runs, min_seeds=3)
    assert [(a.lr_factors, a.seeds) for a in adds] == [(new, [0, 1])]  # the edge's own seeds; more seeds later


def test_refine_of_a_resolved_scan_adds_nothing():
    opt, runs = _scan(np.random.default_rng(3), 1.0, 3, noise=0.002)
    assert scan_additions("dense-o1", opt, runs, min_seeds=3) == []


def _with_extra(tmp_path: Path, entries: list[ScanAddition]) -> Path:
    path = tmp_path / "scan.yaml"
    text = (SWEEPS / "lr_scan_tiny.yaml").read_text()  # data relative to the checkout, the cwd here
    path.write_text(extra_yaml(text, entries, ["cost"] * len(entries)))
    return path


def test_extra_runs_keep_the_grid_run_ids_and_add_their_own(tmp_path):
    grid = plan_sweep(SWEEPS / "lr_scan_tiny.yaml")
    path = _with_extra(tmp_path, [ScanAddition("dense-s1", [1.0, 4.0], [2, 3], "more seeds"),
                                  ScanAddition("dense-s2", [16.0], [0], "beyond the edge")])
    assert "    # more seeds; cost: cost" in path.read_text()
    refined = plan_sweep(path)
    old = [r.run_id for r in grid.runs]
    assert [r.run_id for r in refined.runs[:len(old)]] == old
    new = refined.runs[len(old):]
    assert len(new) == 5 and not {r.run_id for r in new} & set(old)
    assert sorted((r.preset, r.config["seed"], r.values["lr_scan.factor"]) for r in new) == [
        ("dense-s1", 2, 1.0), ("dense-s1", 2, 4.0), ("dense-s1", 3, 1.0), ("dense-s1", 3, 4.0), ("dense-s2", 0, 16.0)]
    for r in new:  # the same recipe as the grid's runs of that size: only the seed or the LR differs
        twin = next(g for g in grid.runs if g.preset == r.preset)
        assert r.config["train"]["lr"] == pytest.approx(r.values["lr_scan.factor"] * 3e-3)
        assert r.tokens == twin.tokens and r.config["train"]["batch_size"] == twin.config["train"]["batch_size"]
    # appending to an existing extra list works too, and still keeps every earlier id
    again = tmp_path / "again.yaml"
    again.write_text(extra_yaml(path.read_text(), [ScanAddition("dense-s2", [0.125], [1], "below")]))
    assert [r.run_id for r in plan_sweep(again).runs[:len(refined.runs)]] == [r.run_id for r in refined.runs]


@pytest.mark.parametrize(("entry", "message"), [
    (ScanAddition("dense-s1", [1.0], [0], "dup"), "already a run of the grid"),
    (ScanAddition("dense-s9", [1.0], [5], "not in the ladder"), "is not in lr_scan.ladder"),
])
def test_a_bad_extra_entry_is_exit_2(tmp_path, entry, message):
    out = ultramem("sweep", "plan", str(_with_extra(tmp_path, [entry])))
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_refine_needs_finished_runs_and_a_free_output(tmp_path):
    env = {"ULTRAMEM_RUNS_DIR": str(tmp_path / "runs")}
    out = ultramem("hparams", "sweeps/lr_scan_tiny.yaml", "--refine", str(tmp_path / "r.yaml"), env=env)
    assert out.returncode == 2 and "no finished runs" in out.stderr and not (tmp_path / "r.yaml").exists()
    (tmp_path / "r.yaml").write_text("x")
    out = ultramem("hparams", "sweeps/lr_scan_tiny.yaml", "--refine", str(tmp_path / "r.yaml"), env=env)
    assert out.returncode == 2 and "--force" in out.stderr


@pytest.mark.slow
def test_lr_scan_tiny_end_to_end(tmp_path):
    """The tiny scan trains through the scheduler (local backend) and `ultramem hparams` writes the rule, the
    optima, the report and the figures; every run records the corpus's sha256."""
    env = {"ULTRAMEM_RUNS_DIR": str(tmp_path / "runs")}
    out = ultramem("sweep", "run", "sweeps/lr_scan_tiny.yaml", "--backend", "local", env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    report = tmp_path / "report"
    out = ultramem("hparams", "sweeps/lr_scan_tiny.yaml", "--out", str(report), "--bootstrap", "200", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    optima = pd.read_csv(report / "optima.csv")
    assert len(optima) == 2 and set(optima["family"]) == {"dense"}
    assert all(json.loads(g) == pytest.approx([7.5e-4, 3e-3, 1.2e-2]) for g in optima["lrs"])
    rule = json.loads((report / "lr_rule.json").read_text())
    # a law when both optima lie inside the grid, else the family is listed as not fitted
    assert rule["kind"] == "ultramem-lr-rule" and set(rule["families"]) | set(rule["not_fitted"]) == {"dense"}
    for stem in ("loss_vs_lr", "lr_law"):
        assert (report / "figures" / f"{stem}.png").stat().st_size > 0
    assert "## Optima per size" in (report / "report.md").read_text()
    runs = pd.read_csv(report / "runs.csv")
    assert len(runs) == 12
    final = json.loads(next((tmp_path / "runs" / "lr-scan-tiny").glob("*/final.json")).read_text())
    import hashlib

    shakespeare = (REPO.parent / "shared" / "data" / "tinyshakespeare.txt").read_bytes()
    assert final["data_sha256"] == hashlib.sha256(shakespeare).hexdigest()
    # refine: 3 seeds wanted around each optimum; the refined file trains only the added runs, in the same folder
    finals = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "lr-scan-tiny").glob("*/final.json")}
    refined = tmp_path / "refined.yaml"
    out = ultramem("hparams", "sweeps/lr_scan_tiny.yaml", "--refine", str(refined), env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    added = plan_sweep(refined).runs[12:]
    assert added and "runs" in out.stdout and "TFLOPs added" in out.stdout
    out = ultramem("sweep", "run", str(refined), "--backend", "local", env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "lr-scan-tiny").glob("*/final.json")}
    assert {p: after[p] for p in finals} == finals  # nothing trained twice
    assert {p.parent.name for p in set(after) - set(finals)} == {r.run_id for r in added}
