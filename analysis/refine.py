"""Where the next runs of an IsoFLOP study go (`ultramem sweep refine`; docs/sweeps.md "Refining a study").

From a study's runs table (analysis/collect.py) and the runs its sweep file lays (`Study.planned`), `refine` proposes
`Addition`s: a preset at some of the study's budgets for some seeds, with the reason, ranked by priority. It reads
the runs as the report does (analysis/isoflop.py: each budget's parabola in ln N over the seed means of the
STUDY_K_NEAREST sizes nearest its minimum, the vertex rejected outside them; sampled_minima for the comparison of
families) and applies three rules, in this order of priority:

  edge (3.x)      per family and budget, the seed-mean loss is lowest at the smallest or largest size trained there
                  (or the parabola's vertex falls beyond the sizes): the next rungs of that family beyond the edge
                  (its presets ordered by N, `Study.rungs`), one when the parabola's extrapolated vertex lies before
                  the first of them, else EDGE_RUNGS, with the study's seeds. A budget with one size gets the next
                  rung on each side.
  seeds (2.x)     per family and budget whose minimum lies inside its sizes, when the runs do not resolve its vertex:
                  no vertex (the parabola opens downwards), more than (1 - level) / 2 of the bootstrap resamples
                  opening downwards (the curvature's interval reaches 0) or without a vertex inside the sizes,
                  fewer than MEASURED_SEEDS seeds at the sizes nearest it (the seed noise is not measured), or an
                  interval in ln N reaching further than MAX_HALF_WIDTH (2x in N) to a side: seeds up to
                  `min_seeds` at the SEED_SIZES sizes nearest the vertex. The bootstrap redraws each size's units
                  (size x seed) with replacement, as many as it has, so it varies what more seeds would pin down.
  frontier (1.x)  per pair of families (sampled_minima's: each over dense, UltraMem over MoE), among the budgets
                  whose difference of sampled minima is not resolved (its interval includes 0, or has zero width:
                  one seed) and whose minima lie inside the sizes, the one with the widest interval relative to the
                  difference: seeds up to `min_seeds` at both families' minimum sizes there. The comparison is the
                  sampled minima, not the frontier multipliers: those rest on the L(N, D) fits, whose intervals
                  seeds at one budget hardly narrow, while more seeds at the minimum sizes narrow these directly.

Within a rule the fraction after the point orders the additions (the first rung beyond an edge before the second;
the less resolved vertex or comparison first); equal priorities keep the order of family, budget and nearness to
the minimum, so that a budget's sizes stay together under --max-flops. Two rules adding the same cell keep the
higher priority and both reasons; a cell the sweep already lays (finished or not) is never added again. Pure:
numbers and tables in, additions out; the CLI (cli/sweep.py) builds the Study from the sweep's plan and prices the
additions with `sweep plan`'s numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.bootstrap import ZERO_WIDTH, estimate, resample_counts
from analysis.checks import FitError, require_columns
from analysis.isoflop import (
    STUDY_K_NEAREST,
    FamilyStudy,
    _flops_law,
    _optimum,
    family_points,
    isoflop_optima,
    parabola,
    sampled_minima,
)

EDGE_RUNGS = 2  # at most this many rungs beyond an edge: the vertex lies past the first when the loss still falls
MAX_HALF_WIDTH = math.log(2)  # a 95% half-width of ln 2 is a vertex sd of 0.35 in ln N; on 6 budgets over 1.5
#   decades that alone gives the frontier exponent a (N* ~ C^a) an interval ~0.5 wide, the report's limit for
#   "identified" (analysis.isoflop.MAX_EXPONENT_WIDTH); 2x in N is also 2-5 rungs of the study ladders
MEASURED_SEEDS = 2  # fewer seeds at a size near the vertex: its seed noise is not measured (the bootstrap redraws
#   one seed, always the same), so the vertex counts as not resolved
SEED_SIZES = 3  # seeds go to the sizes nearest the vertex, the three points a parabola needs
MIN_SEEDS = 5  # default seeds per size at the sizes that decide a vertex or a comparison
RUNS_COLUMNS = ["run_id", "family", "seed", "val_loss", "flops", "tokens", "active_params", "flops_per_token"]


@dataclass(frozen=True)
class Rung:
    """A size the study can train: preset, family, active parameters N and training FLOPs per token F, as the
    study's sweep resolves it (experiments.sweep.plan.isoflop_sizes)."""

    preset: str
    family: str
    n: float
    flops_per_token: float


@dataclass
class Study:
    """What the sweep file lays: its budgets and seeds, per family the rungs it may add (ascending in N) and every
    run it plans, finished or not (`planned`: run_id, family, preset, budget, seed)."""

    budgets: list[float]
    seeds: list[int]
    rungs: dict[str, list[Rung]]
    planned: pd.DataFrame
    max_tokens: float | None = None

    def seeds_at(self, preset: str, budget: float) -> set[int]:
        p = self.planned
        return {int(s) for s in p.loc[(p["preset"] == preset) & (p["budget"] == budget), "seed"]}

    def presets_at(self, family: str, budget: float) -> set[str]:
        p = self.planned
        return set(p.loc[(p["family"] == family) & (p["budget"] == budget), "preset"])


@dataclass
class Addition:
    """Runs to add: `preset` at `budgets` for `seeds` (an `isoflop.extra` entry), why, and its rank."""

    kind: str  # edge | seeds | frontier
    family: str
    preset: str
    budgets: list[float]
    seeds: list[int]
    why: str
    priority: float


@dataclass
class Refinement:
    """What `refine` proposes, what it could not add, and the per-budget view it decided from."""

    additions: list[Addition]  # highest priority first
    notes: list[str] = field(default_factory=list)  # what a rule wanted but could not add, and why
    vertices: pd.DataFrame | None = None  # per family and budget: what the rules saw (see `vertices`)


def named_like(name: str, ladder: list[str]) -> bool:
    """Whether a preset is named like one of the ladder's with every number free (dense-o7 -> dense-o<k>,
    moe-o7-2in12 -> moe-o<k>-<k>in<k>): a rung of that ladder, not a control beside it (dense-o7-wide) or an
    alias (dense-tiny)."""
    return any(re.fullmatch(_name_pattern(p), name) for p in ladder)


def _name_pattern(name: str) -> str:
    return "".join(r"\d+" if part.isdigit() else re.escape(part) for part in re.split(r"(\d+)", name))


def rungs_of(sizes: list[Rung], ladder: list[str]) -> dict[str, list[Rung]]:
    """Per family its rungs ascending in N, one preset per (N, F): an alias (dense-tiny of dense-t2) is the same
    rung, and the ladder's name wins."""
    first: dict[tuple[str, float, float], Rung] = {}
    for r in sorted(sizes, key=lambda r: r.preset not in ladder):
        first.setdefault((r.family, r.n, r.flops_per_token), r)
    out: dict[str, list[Rung]] = {}
    for r in sorted(first.values(), key=lambda r: (r.n, r.flops_per_token, r.preset)):
        out.setdefault(r.family, []).append(r)
    return out


def study_points(runs: pd.DataFrame, study: Study, source: str = "<runs>") -> dict[str, pd.DataFrame]:
    """Per family, its finished runs of the study as IsoFLOP points (analysis.isoflop.family_points), each with the
    preset and budget its sweep gave it (runs the sweep does not plan are left out)."""
    require_columns(runs, RUNS_COLUMNS, source)
    planned = study.planned[["run_id", "preset", "budget"]]
    mine = runs[runs["run_id"].isin(planned["run_id"])]
    out = {}
    for fam in dict.fromkeys(study.planned["family"]):
        pts = family_points(mine, fam)
        if len(pts):
            pts = pts.drop(columns="budget").merge(planned, on="run_id", how="inner")
            out[fam] = pts.sort_values(["budget", "n", "seed"], kind="stable").reset_index(drop=True)
    return out


def vertices(pts: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """One row per budget of a family's points: its sizes, the size of the lowest seed-mean loss (`n_min`) and the
    edge it sits at (smallest / largest / only / ""), the vertex (analysis.isoflop's parabola over the
    STUDY_K_NEAREST sizes nearest the minimum; `valid`, `why`) with its percentile interval in ln N from a
    bootstrap of each size's units (`_vertex_draws`), and the shares of resamples without a vertex inside the sizes
    (`invalid`) and with a parabola opening downwards (`downward`)."""
    optima = isoflop_optima(pts, flops_col="budget", n_col="n", loss_col="loss", k_nearest=STUDY_K_NEAREST)
    rows = []
    for j, ((c, g), opt) in enumerate(zip(pts.groupby("budget", sort=True), optima.itertuples(), strict=True)):
        means = g.groupby("n", sort=True)["loss"].mean()
        draws, downward = _vertex_draws(float(c), g, n_boot, seed + j)
        e = estimate(math.log(opt.n_star) if opt.valid else math.nan, draws, level, resamples=n_boot)
        rows.append({"budget": float(c), "sizes": len(means), "n_min": float(means.idxmin()),
                     "edge": _edge(pts, float(c), means, opt.why), "valid": bool(opt.valid), "why": opt.why,
                     "ln_n_star": e.value, "lo": e.lo, "hi": e.hi,
                     "invalid": float(np.isnan(draws).mean()) if n_boot else 0.0,
                     "downward": downward})
    return pd.DataFrame(rows)


def _vertex_draws(c: float, g: pd.DataFrame, n_boot: int, seed: int) -> tuple[np.ndarray, float]:
    """ln N* of each resample (NaN where it has no vertex inside its sizes) and the share of resamples whose
    parabola opens downwards. A resample redraws each size's units (its seeds) with replacement, as many as it has:
    it keeps every size, so it varies what more seeds would pin down, the seed noise, and nothing else."""
    sizes, idx = np.unique(g["n"].to_numpy(float), return_inverse=True)
    x, y = np.log(sizes), g["loss"].to_numpy(float)
    counts = (resample_counts(len(g), g["unit"].to_numpy(), n_boot, seed, strata=idx) if n_boot
              else np.zeros((0, len(g))))
    draws, downward = np.full(len(counts), np.nan), 0
    for b, w in enumerate(counts):
        sw = np.bincount(idx, w, minlength=len(x))
        keep = sw > 0
        ym = np.bincount(idx, w * y, minlength=len(x))[keep] / sw[keep]
        r = _optimum(c, x[keep], ym, None, int(w.sum()), STUDY_K_NEAREST)
        if r["valid"]:
            draws[b] = math.log(r["n_star"])
        downward += r["why"] == "parabola opens downwards"
    return draws, downward / n_boot if n_boot else 0.0


def _edge(pts: pd.DataFrame, c: float, means: pd.Series, why: str) -> str:
    """Where the budget's minimum sits: at its smallest or largest size (or only size), or beyond them by the
    parabola's vertex ("vertex outside the sampled sizes"); "" inside."""
    if len(means) == 1:
        return "only"
    best = int(np.argmin(means.to_numpy()))
    if best in (0, len(means) - 1):
        return "smallest" if best == 0 else "largest"
    if why == "vertex outside the sampled sizes":
        v = _extrapolated_vertex(pts, c)
        x = np.log(means.index.to_numpy(float))
        return "smallest" if v < x[0] else "largest" if v > x[-1] else ""
    return ""


def _extrapolated_vertex(pts: pd.DataFrame, c: float) -> float:
    """ln N of the budget's parabola vertex wherever it falls (NaN with < 3 sizes or opening downwards)."""
    if pts.loc[pts["budget"] == c, "n"].nunique() < 3:
        return math.nan
    p2, p1, _ = parabola(pts, c, flops_col="budget", n_col="n", loss_col="loss", k_nearest=STUDY_K_NEAREST)
    return -p1 / (2 * p2) if p2 > 0 else math.nan


# ---- the rules ---------------------------------------------------------------------------------------------------


def _edge_additions(fam: str, pts: pd.DataFrame, row: dict, study: Study, notes: list[str]) -> list[Addition]:
    c, edge = row["budget"], row["edge"]
    at = pts[pts["budget"] == c]
    sizes = np.sort(at["n"].unique())
    planned = study.presets_at(fam, c)
    v = _extrapolated_vertex(pts, c)
    out = []
    for side in ("smallest", "largest") if edge == "only" else (edge,):
        n_edge = sizes[0] if side == "smallest" else sizes[-1]
        preset = at.loc[at["n"] == n_edge, "preset"].iloc[0]
        where = (f"{fam} at C={c:.3g}: " + (f"one size trained (N={n_edge:.3g}, {preset})" if edge == "only" else
                                            f"minimum at the {side} size served (N={n_edge:.3g}, {preset})"))
        beyond = _beyond(study.rungs.get(fam, []), preset, n_edge, side)
        if not beyond:
            notes.append(f"{where}; vertex not bracketed, and no {'smaller' if side == 'smallest' else 'larger'} "
                         f"{fam} preset is registered beside the ladder or sweep-local: add one under presets:")
            continue
        if pending := [r.preset for r in beyond if r.preset in planned]:
            notes.append(f"{where}: {', '.join(pending)} laid there already and not finished; run the study first")
            continue
        for rank, r in enumerate(beyond[:1 if edge == "only" else _rungs_needed(beyond, v, side)]):
            tokens = c / r.flops_per_token
            if study.max_tokens is not None and tokens > study.max_tokens:
                notes.append(f"{where}: {r.preset} would train {tokens:.3g} tokens, more than isoflop.max_tokens "
                             f"({study.max_tokens:.3g}); raise max_tokens or lower the budget")
                break
            out.append(Addition("edge", fam, r.preset, [c], sorted(study.seeds),
                                f"{where}; vertex not bracketed: add {r.preset} (N={r.n:.3g})", 3 + 0.5 / (rank + 1)))
    return out


def _beyond(rungs: list[Rung], preset: str, n: float, side: str) -> list[Rung]:
    """The rungs past `preset` (of N `n`) on `side`, nearest first: by its place among the rungs, else by N."""
    names = [r.preset for r in rungs]
    if preset in names:
        i = names.index(preset)
        return rungs[:i][::-1] if side == "smallest" else rungs[i + 1:]
    return [r for r in rungs if r.n < n][::-1] if side == "smallest" else [r for r in rungs if r.n > n]


def _rungs_needed(beyond: list[Rung], v: float, side: str) -> int:
    """1 when the first rung beyond the edge lies past the parabola's extrapolated vertex, else EDGE_RUNGS."""
    if not beyond or not math.isfinite(v):
        return EDGE_RUNGS
    x = math.log(beyond[0].n)
    return 1 if (x >= v if side == "largest" else x <= v) else EDGE_RUNGS


def _unresolved_vertex(row: dict, level: float, seeds_near: int) -> tuple[str, float]:
    """Why a budget's vertex (inside its sizes) is not resolved ("" when it is) and how badly: the ratio of its
    wider half interval to MAX_HALF_WIDTH, or inf without a vertex, with a curvature or a vertex its resamples do
    not bound, or with one seed at the sizes nearest it (`seeds_near`: the fewest finished seeds among them)."""
    q = (1 - level) / 2
    if not row["valid"]:
        return f"no vertex ({row['why']})", math.inf
    if row["downward"] > q:
        return f"curvature not resolved ({row['downward']:.0%} of resamples open downwards)", math.inf
    if seeds_near < MEASURED_SEEDS:
        return "one seed at the sizes nearest N*: the bootstrap cannot measure the seed noise", math.inf
    if row["invalid"] > q:
        return f"vertex not resolved ({row['invalid']:.0%} of resamples put it outside the sizes)", math.inf
    half = max(row["ln_n_star"] - row["lo"], row["hi"] - row["ln_n_star"])
    if not half > MAX_HALF_WIDTH:
        return "", 0.0
    return (f"vertex N*={math.exp(row['ln_n_star']):.3g} [{math.exp(row['lo']):.3g}, {math.exp(row['hi']):.3g}] "
            "reaches beyond 2x on a side"), half / MAX_HALF_WIDTH


def _seed_additions(fam: str, pts: pd.DataFrame, row: dict, study: Study, min_seeds: int, level: float,
                    notes: list[str]) -> list[Addition]:
    c = row["budget"]
    at = pts[pts["budget"] == c]
    per_size = at.groupby("preset", sort=False).agg(n=("n", "first"), seeds=("seed", "nunique")).reset_index()
    centre = row["ln_n_star"] if row["valid"] else math.log(row["n_min"])  # no vertex: the lowest seed mean
    order = np.argsort(np.abs(np.log(per_size["n"].to_numpy(float)) - centre), kind="stable")
    near = per_size.iloc[order[:SEED_SIZES]]
    why, u = _unresolved_vertex(row, level, int(near["seeds"].min()))
    if not why:
        return []
    out = []
    for preset in near["preset"]:  # nearest first: equal priorities keep this order (a stable sort)
        if seeds := _top_up(study, preset, c, min_seeds):
            out.append(Addition("seeds", fam, preset, [c], seeds,
                                f"{fam} at C={c:.3g}: {why}: seeds at the {SEED_SIZES} sizes nearest the minimum",
                                2 + 0.9 * _share(u)))
    if not out:
        notes.append(f"{fam} at C={c:.3g}: {why}, with {min_seeds} seeds at the sizes nearest N* already; raise "
                     "--min-seeds or add sizes near N*")
    return out


def _top_up(study: Study, preset: str, budget: float, min_seeds: int) -> list[int]:
    """The lowest seeds not yet laid at (preset, budget) that bring it to `min_seeds`."""
    have = study.seeds_at(preset, budget)
    need = min_seeds - len(have)
    return [s for s in range(len(have) + min_seeds) if s not in have][:max(need, 0)]


def _share(u: float) -> float:
    """A badness u >= 0 mapped into [0, 1) (inf -> 1), to order the additions within a rule."""
    return 1.0 if math.isinf(u) else u / (1 + u)


def _frontier_additions(points: dict[str, pd.DataFrame], table: pd.DataFrame, edges: set[tuple[str, float]],
                        study: Study, min_seeds: int, notes: list[str]) -> list[Addition]:
    out = []
    for (fam, over), rows in table.groupby(["family", "over"], sort=False):
        best, best_rel = None, -1.0
        for r in rows.to_dict("records"):
            c = r["budget C"]
            if r["edge"] or (fam, c) in edges or (over, c) in edges:
                continue  # a minimum at an edge bounds the frontier loss only; the edge rule comes first
            zero = not r["hi"] - r["lo"] > ZERO_WIDTH * max(abs(r["lo"]), abs(r["hi"]))
            if not (zero or r["lo"] <= 0 <= r["hi"]):
                continue
            rel = math.inf if zero or r["dL"] == 0 else (r["hi"] - r["lo"]) / abs(r["dL"])
            if rel > best_rel:
                best, best_rel = r, rel
        if best is None:
            continue
        c = best["budget C"]
        interval = ("one seed: no interval" if math.isinf(best_rel) else
                    f"[{best['lo']:+.3g}, {best['hi']:+.3g}] includes 0, {best_rel:.3g}x |dL| wide")
        why = (f"{fam} vs {over} at C={c:.3g}: sampled minima differ by dL={best['dL']:+.3g} ({interval}), the "
               "least resolved budget of the pair: seeds at both minimum sizes")
        added = False
        for who, n in ((fam, best["N (family)"]), (over, best["N (over)"])):
            pts = points[who]
            preset = pts.loc[(pts["budget"] == c) & (pts["n"] == n), "preset"].iloc[0]
            if seeds := _top_up(study, preset, c, min_seeds):
                added = True
                out.append(Addition("frontier", who, preset, [c], seeds, why, 1 + 0.9 * _share(best_rel)))
        if not added:
            notes.append(f"{why}: {min_seeds} seeds there already; raise --min-seeds")
    return out


def _merge(additions: list[Addition]) -> list[Addition]:
    """One addition per (preset, budgets): the higher priority, the seeds of both, both reasons."""
    kept: dict[tuple[str, tuple[float, ...]], Addition] = {}
    for a in sorted(additions, key=lambda a: -a.priority):
        key = (a.preset, tuple(a.budgets))
        if key in kept:
            k = kept[key]
            k.seeds = sorted(set(k.seeds) | set(a.seeds))
            k.why += f"; also {a.why}"
        else:
            kept[key] = a
    return [a for a in kept.values() if a.seeds]


def refine(runs: pd.DataFrame, study: Study, *, min_seeds: int = MIN_SEEDS, n_boot: int = 1000, seed: int = 0,
           level: float = 0.95, source: str = "<runs>") -> Refinement:
    """The additions the three rules propose (module docstring), highest priority first."""
    if min_seeds < 1:
        raise FitError(f"min_seeds {min_seeds}: give at least 1")
    points = study_points(runs, study, source)
    if not points:
        raise FitError(f"{source}: no finished run of the study (none of its {len(study.planned)} planned run ids "
                       "has a finite val_loss); run the study first")
    notes: list[str] = []
    additions, tables, edges = [], [], set()
    for fam, pts in points.items():
        table = vertices(pts, n_boot=n_boot, seed=seed, level=level)
        tables.append(table.assign(family=fam))
        for row in table.to_dict("records"):
            if row["edge"]:
                edges.add((fam, row["budget"]))
                additions += _edge_additions(fam, pts, row, study, notes)
            else:
                additions += _seed_additions(fam, pts, row, study, min_seeds, level, notes)
    if len(points) > 1:
        fams = {f: FamilyStudy(f, p, _flops_law(p["n"].to_numpy(), p["flops_per_token"].to_numpy()))
                for f, p in points.items()}
        table = sampled_minima(fams, n_boot=n_boot, seed=seed, level=level)
        additions += _frontier_additions(points, table, edges, study, min_seeds, notes)
    out = sorted(_merge(additions), key=lambda a: -a.priority)
    return Refinement(out, notes, pd.concat(tables, ignore_index=True))


def within_budget(additions: list[Addition], costs: list[float], max_flops: float | None) -> list[Addition]:
    """The additions (highest priority first) whose cumulative cost stays within `max_flops`: a prefix of the
    ranking, so the first that would pass it ends the list and no cheaper, lower-priority one jumps the queue."""
    if max_flops is None:
        return list(additions)
    out, total = [], 0.0
    for a, cost in zip(additions, costs, strict=True):
        if total + cost > max_flops:
            break
        out.append(a)
        total += cost
    return out
