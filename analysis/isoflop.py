"""IsoFLOP profiles (Hoffmann et al. 2022, Approach 2) and the compute-optimal frontier N*(C), D*(C); the per-family
IsoFLOP study that sets Approach 2 beside Approach 3 (L(N, D), analysis/chinchilla.py).

For each FLOP budget C, loss is fitted by a parabola in ln N over the `k_nearest` sizes closest (in ln N) to the
observed minimum (the seeds of a size averaged), N* = exp(−p1/(2·p2)); a vertex outside those points' range, or a
parabola opening downwards, is rejected rather than extrapolated (the parabola is a symmetric local approximation
of an asymmetric curve). Then ln N* is regressed on ln C by OLS: N* = k·C^a (Porian et al.'s `power_law_fit`).
D* is read off the budget's own runs (ln D interpolated at ln N* between its sizes) when a token column is given,
so that C = F(N)·D is the project's FLOPs (ultramem.accounting, attention and head included); without one it is
C/(6N*), the convention of published IsoFLOP tables.

`isoflop_study` runs both approaches per family on a runs table (analysis/collect.py): budgets are recognised from
the `flops` column (`budget_of`), the bootstrap resamples seed clusters (the runs of one (family, N, D) point),
within each budget for Approach 2, and the effective compute multiplier of each sparse family over dense is taken
on the two Approach 3 frontiers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.bootstrap import Estimate, LawFit, estimate, not_identified, resample_counts
from analysis.checks import FitError, positive_array, require_columns, require_points
from analysis.chinchilla import (
    MIN_POINTS,
    ChinchillaLaw,
    compute_for_loss,
    fit_chinchilla_ci,
    frontier,
    frontier_curve,
    profile_over_e,
)
from analysis.fit import PurePowerLaw, fit_pure_power_law
from analysis.holdout import predict_family


def isoflop_optima(df: pd.DataFrame, *, flops_col: str = "flops", n_col: str = "n", loss_col: str = "loss",
                   d_col: str | None = None, k_nearest: int = 5, source: str = "<table>") -> pd.DataFrame:
    """One row per budget: flops, n_star, d_star, loss_star (the parabola's minimum), n_points, valid.

    Rows of one size in a budget (seeds) are averaged first. d_star: ln D interpolated at ln N* between the
    budget's sizes when `d_col` is given (D from the runs themselves: the project's C = F(N)·D), else C/(6N*).
    `valid` is False (with the reason in `why`) where the budget has fewer than 3 sizes, the parabola opens
    downwards, or its vertex lies outside the fitted points.
    """
    require_columns(df, [flops_col, n_col, loss_col] + ([d_col] if d_col else []), source)
    rows = []
    for c, g in df.groupby(flops_col, sort=True):
        positive_array(g[n_col], n_col, source)
        agg = g.groupby(n_col, sort=False).agg(loss=(loss_col, "mean"), d=(d_col or n_col, "mean"))
        rows.append(_optimum(float(c), np.log(agg.index.to_numpy(float)), agg["loss"].to_numpy(float),
                             np.log(agg["d"].to_numpy(float)) if d_col else None, len(g), k_nearest))
    return pd.DataFrame(rows)


def _optimum(c: float, x: np.ndarray, y: np.ndarray, lnd: np.ndarray | None, n_points: int,
             k_nearest: int) -> dict:
    """The vertex of one budget's parabola; x = ln N of its distinct sizes, y their mean loss, lnd their ln D."""
    row = {"flops": c, "n_star": math.nan, "d_star": math.nan, "loss_star": math.nan, "n_points": n_points,
           "n_sizes": len(x), "valid": False, "why": ""}
    if len(x) < 3:
        row["why"] = f"{len(x)} sizes (need 3)"
        return row
    near = np.argsort(np.abs(x - x[np.argmin(y)]), kind="stable")[:k_nearest]
    p2, p1, p0 = np.polyfit(x[near], y[near], 2)
    vertex = -p1 / (2 * p2) if p2 > 0 else math.nan
    if not (p2 > 0 and x[near].min() <= vertex <= x[near].max()):
        row["why"] = "parabola opens downwards" if p2 <= 0 else "vertex outside the sampled sizes"
        return row
    n_star = math.exp(vertex)
    if lnd is None:
        d_star = c / (6 * n_star)
    else:
        order = np.argsort(x)
        d_star = math.exp(float(np.interp(vertex, x[order], lnd[order])))
    row.update(n_star=n_star, d_star=d_star, loss_star=p0 - p1**2 / (4 * p2), valid=True)
    return row


def parabola(df: pd.DataFrame, flops: float, *, flops_col: str = "flops", n_col: str = "n",
             loss_col: str = "loss", k_nearest: int = 5) -> np.ndarray:
    """Coefficients (p2, p1, p0) of the budget's parabola in ln N (for plotting the profile)."""
    g = df[df[flops_col] == flops].groupby(n_col, sort=False)[loss_col].mean()
    x, y = np.log(g.index.to_numpy(float)), g.to_numpy(float)
    near = np.argsort(np.abs(x - x[np.argmin(y)]), kind="stable")[:k_nearest]
    return np.polyfit(x[near], y[near], 2)


def fit_frontier(optima: pd.DataFrame, source: str = "<table>") -> dict[str, PurePowerLaw]:
    """N*(C) = k·C^a and D*(C) = k'·C^b by OLS on the valid budgets (a + b = 1 when D* = C/6N*; with the project's
    C = F(N)·D and F(N) not proportional to N, a + b differs from 1 by the curvature of F)."""
    ok = optima[optima["valid"]]
    require_points(len(ok), 3, "the compute-optimal frontier N*(C) (valid IsoFLOP budgets)", source)
    return {"n": fit_pure_power_law(ok["flops"], ok["n_star"], x_name="C", y_name="N*", source=source),
            "d": fit_pure_power_law(ok["flops"], ok["d_star"], x_name="C", y_name="D*", source=source)}


def frontier_exponent_ci(optima: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Exponent a of N*(C) with a bootstrap over budgets (each budget's vertex is one observation)."""
    ok = optima[optima["valid"]]
    if len(ok) < 3:
        raise FitError(f"not enough points for the frontier: {len(ok)} valid IsoFLOP budgets, need at least 3")
    lc, ln = np.log(ok["flops"].to_numpy(float)), np.log(ok["n_star"].to_numpy(float))
    a = float(np.polyfit(lc, ln, 1)[0])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(lc), len(lc))
        if len(np.unique(lc[idx])) >= 2:
            draws.append(np.polyfit(lc[idx], ln[idx], 1)[0])
    return estimate(a, np.array(draws), level)


# ---- the per-family IsoFLOP study (Approach 2 and Approach 3 side by side) --------------------------------------

BUDGET_RTOL = 0.1  # runs whose C lie within 10% of the smallest C of their group share a budget (an isoflop sweep
#                    spaces budgets >= 1.25x apart, experiments/sweep/isoflop.py; rounding to whole steps moves a
#                    run's C by half a step's tokens)
MAX_EXPONENT_WIDTH = 0.5  # a frontier exponent (a, b in [0, 1]) whose interval is wider is not identified
MAX_ALPHA_WIDTH = 1.0  # likewise for the L(N, D) exponents alpha, beta
EXPONENT_BOUNDS = (0.01, 2.5)  # alpha, beta at or beyond these: the fit sits at a bound
MAX_MULTIPLIER_RATIO = 10.0  # a multiplier whose interval spans more than 10x is not identified
STUDY_K_NEAREST = 7  # the study's parabolas use up to 7 sizes around each budget's minimum (5 nearest of a 1.26x
#                      ladder span only 2.5x in N, where seed noise rivals the curvature)


def budget_of(flops: np.ndarray, rtol: float = BUDGET_RTOL) -> np.ndarray:
    """Each run's FLOP budget: sorted by C, a run starts a new budget unless its C is within `rtol` of the first
    C of the current one; a budget's value is the geometric mean of its runs' C."""
    f = np.asarray(flops, dtype=float)
    order = np.argsort(f, kind="stable")
    label = np.empty(len(f), dtype=int)
    start, k = None, -1
    for i in order:
        if start is None or f[i] > start * (1 + rtol):
            start, k = f[i], k + 1
        label[i] = k
    means = np.array([math.exp(np.log(f[label == j]).mean()) for j in range(k + 1)])
    return means[label]


def frontier_exponents(points: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                       k_nearest: int = 5, unit_col: str = "cluster") -> tuple[pd.DataFrame,
                                                                             dict[str, PurePowerLaw] | None,
                                                                             dict[str, Estimate]]:
    """Approach 2 with a cluster bootstrap: `points` has columns budget, n, d, loss and `unit_col`.
    unit_col "cluster" (the seeds of one (N, D) point, each inside one budget): each resample draws, within every
    budget, as many clusters as it holds. Any other column (e.g. "unit": a trunk with its branches, which spans
    budgets) is drawn whole across budgets, as many units as there are. The budgets' parabolas and the frontier OLS
    are refitted on each resample. Returns the optima, the frontier laws (None with fewer than 3 valid budgets) and
    the estimates of a (N* ∝ C^a) and b (D* ∝ C^b)."""
    optima = isoflop_optima(points, flops_col="budget", n_col="n", loss_col="loss", d_col="d", k_nearest=k_nearest)
    try:
        front = fit_frontier(optima)
    except FitError:
        return optima, None, {}
    counts = resample_counts(len(points), points[unit_col].to_numpy(), n_boot, seed,
                             strata=points["budget"].to_numpy() if unit_col == "cluster" else None)
    budgets = []
    for c, g in points.groupby("budget", sort=True):
        sizes, idx = np.unique(g["n"].to_numpy(float), return_inverse=True)
        budgets.append((float(c), g.index.to_numpy(), idx, np.log(sizes), g["loss"].to_numpy(float),
                        np.log(g["d"].to_numpy(float))))
    pos = {r: i for i, r in enumerate(points.index)}
    draws = np.full((n_boot, 2), np.nan)
    for b in range(n_boot):
        rows = []
        for c, index, idx, x, y, lnd in budgets:
            w = counts[b, [pos[r] for r in index]]
            sw = np.bincount(idx, w, minlength=len(x))
            keep = sw > 0
            with np.errstate(invalid="ignore", divide="ignore"):
                ym = np.bincount(idx, w * y, minlength=len(x)) / sw
                dm = np.bincount(idx, w * lnd, minlength=len(x)) / sw
            rows.append(_optimum(c, x[keep], ym[keep], dm[keep], int(w.sum()), k_nearest))
        ok = [r for r in rows if r["valid"]]
        if len(ok) >= 3:
            lc = np.log([r["flops"] for r in ok])
            draws[b] = [np.polyfit(lc, np.log([r[k] for r in ok]), 1)[0] for k in ("n_star", "d_star")]
    est = {"a": estimate(front["n"].a, draws[:, 0], level, resamples=n_boot),
           "b": estimate(front["d"].a, draws[:, 1], level, resamples=n_boot)}
    return optima, front, est


@dataclass
class FamilyStudy:
    """One family's IsoFLOP study: its points, Approach 2 (optima, frontier, exponents) and Approach 3 (L(N, D))."""

    family: str
    points: pd.DataFrame  # budget, flops, n, d, loss, cluster, seed, flops_per_token
    flops_law: PurePowerLaw  # F(N) = k·N^p, training FLOPs per token fitted to the runs (ultramem.accounting's)
    optima: pd.DataFrame | None = None
    frontier: dict[str, PurePowerLaw] | None = None
    approach2: dict[str, Estimate] = field(default_factory=dict)  # a, b of the IsoFLOP frontier
    why2: str = ""  # why there is no Approach 2 frontier
    lnd: LawFit | None = None  # Approach 3: E, A, B, alpha, beta, a, b, and a_C, b_C over the budgets' range
    why3: str = ""
    profile: pd.DataFrame | None = None  # Approach 3 with E held at fractions of the lowest loss (profile_over_e)
    holdouts: list = field(default_factory=list)  # analysis.holdout.Holdout: refits without a slice, predicting it

    @property
    def n_range(self) -> tuple[float, float]:
        return float(self.points["n"].min()), float(self.points["n"].max())

    @property
    def c_range(self) -> tuple[float, float]:
        return float(self.points["budget"].min()), float(self.points["budget"].max())

    def flops_per_token(self, n: np.ndarray) -> np.ndarray:
        return self.flops_law(n)


@dataclass
class IsoflopStudy:
    families: dict[str, FamilyStudy]
    comparison: pd.DataFrame  # family, exponent, approach 2, approach 3, intervals overlap
    multipliers: pd.DataFrame  # family, over (the reference family), budget C, L_opt, M, lo, hi, status
    sampled: pd.DataFrame | None = None  # sampled_minima: the lowest sampled loss per budget, no law (see there)
    level: float = 0.95


def has_data_axis(df: pd.DataFrame) -> bool:
    """Whether some size of a family was trained at two or more token budgets (a D axis for L(N, D))."""
    d = df.groupby("active_params")["tokens"].agg(lambda t: t.max() / t.min() if t.min() > 0 else 1.0)
    return bool((d > 1 + BUDGET_RTOL).any())


def _flops_law(n: np.ndarray, fpt: np.ndarray) -> PurePowerLaw:
    """F(N) = k·N^p by OLS in log-log over the distinct sizes (p = 1 with a single size)."""
    sizes, idx = np.unique(n, return_inverse=True)
    f = np.bincount(idx, np.log(fpt)) / np.bincount(idx)
    if len(sizes) < 2:
        return PurePowerLaw(k=float(math.exp(f[0]) / sizes[0]), a=1.0)
    p, c0 = np.polyfit(np.log(sizes), f, 1)
    return PurePowerLaw(k=float(math.exp(c0)), a=float(p))


def family_points(runs: pd.DataFrame, family: str) -> pd.DataFrame:
    """A family's finished runs as IsoFLOP points: budget (from `flops`), n, d, loss, seed, cluster (the seeds of
    one (N, D) point) and unit (the runs of one size and seed: a WSD trunk with its cooldown branches, which share
    its initialisation, data order and every step before the branch, or stand-alone runs of that seed, which share
    initialisation and data order; the independent unit every bootstrap over these runs resamples)."""
    df = runs[runs["family"] == family]
    cols = ["flops", "tokens", "active_params", "val_loss", "flops_per_token"]
    ok = np.ones(len(df), dtype=bool)
    for col in cols:
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(float)
        ok &= np.isfinite(v) & (v > 0)
    df = df[ok]
    out = pd.DataFrame({"flops": df["flops"].astype(float).to_numpy(), "n": df["active_params"].astype(float).to_numpy(),
                        "d": df["tokens"].astype(float).to_numpy(), "loss": df["val_loss"].astype(float).to_numpy(),
                        "flops_per_token": df["flops_per_token"].astype(float).to_numpy(),
                        "seed": df["seed"].to_numpy() if "seed" in df else 0,
                        "run_id": df["run_id"].to_numpy()})
    out["budget"] = budget_of(out["flops"].to_numpy()) if len(out) else []
    out["cluster"] = [f"{n:.0f}|{d:.0f}" for n, d in zip(out["n"], out["d"], strict=True)]
    out["unit"] = [f"{n:.0f}|s{s}" for n, s in zip(out["n"], out["seed"], strict=True)]
    return out.sort_values(["budget", "n", "seed"], kind="stable").reset_index(drop=True)


def _frontier_slopes(law: ChinchillaLaw, fam: FamilyStudy) -> tuple[float, float]:
    """d ln N_opt / d ln C and d ln D_opt / d ln C of a law's frontier over the family's budget range (OLS on 5
    budgets): Approach 3's counterpart of the IsoFLOP exponents under the project's C = F(N)·D."""
    c = np.geomspace(*fam.c_range, 5) if fam.c_range[1] > fam.c_range[0] else np.array([fam.c_range[0]] * 2) * [1, 2]
    n, d, _ = frontier(law, fam.flops_per_token, c, fam.n_range)
    if not (np.all(np.isfinite(n)) and np.all(n > 0)):
        return math.nan, math.nan
    return float(np.polyfit(np.log(c), np.log(n), 1)[0]), float(np.polyfit(np.log(c), np.log(d), 1)[0])


def study_family(runs: pd.DataFrame, family: str, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> FamilyStudy:
    pts = family_points(runs, family)
    fam = FamilyStudy(family, pts, _flops_law(pts["n"].to_numpy(), pts["flops_per_token"].to_numpy()))
    sizes = pts.groupby("budget")["n"].nunique()
    usable = pts[pts["budget"].isin(sizes[sizes >= 3].index)]
    if usable["budget"].nunique() >= 3:
        fam.optima, fam.frontier, fam.approach2 = frontier_exponents(usable.reset_index(drop=True), n_boot=n_boot,
                                                                     seed=seed, level=level,
                                                                     k_nearest=STUDY_K_NEAREST, unit_col="unit")
        if fam.frontier is None:
            fam.why2 = (f"{int(fam.optima['valid'].sum())} budget(s) with a vertex inside their sizes (need 3): "
                        + "; ".join(f"C = {r.flops:.3g}: {r.why}" for r in fam.optima.itertuples() if not r.valid))
    else:
        fam.why2 = f"{usable['budget'].nunique()} budget(s) with >= 3 sizes (need 3)"
    pairs = pts.drop_duplicates(["n", "d"])
    if len(pairs) < MIN_POINTS or pairs["n"].nunique() < 2 or pairs["d"].nunique() < 2:
        fam.why3 = f"{len(pairs)} distinct (N, D) points over {pairs['n'].nunique()} sizes (need {MIN_POINTS} over 2+)"
        return fam
    slopes = lambda p: _frontier_slopes(p, fam)
    try:
        fam.lnd = fit_chinchilla_ci(pts["n"], pts["d"], pts["loss"], groups=pts["unit"].to_numpy(), n_boot=n_boot,
                                    seed=seed, level=level, source=f"{family} runs",
                                    extra={"b": lambda p: p.b, "a_C": lambda p: slopes(p)[0],
                                           "b_C": lambda p: slopes(p)[1]})
    except FitError as err:
        fam.why3 = str(err)
        return fam
    fam.profile = profile_over_e(pts["n"], pts["d"], pts["loss"], n_units=pts["unit"].nunique(), level=level,
                                 source=f"{family} runs")
    fam.holdouts = predict_family(pts, family, n_boot=n_boot, seed=seed, level=level)
    return fam


def profile_interval(fam: FamilyStudy, name: str) -> tuple[float, float] | None:
    """The range of `name` (alpha, beta, a, b) over the floors E that the profile admits (see
    chinchilla.profile_over_e), or None without a profile."""
    if fam.profile is None or fam.profile.empty or not fam.profile["admitted"].any():
        return None
    v = fam.profile.loc[fam.profile["admitted"], name]
    return float(v.min()), float(v.max())


def lnd_why(fam: FamilyStudy, name: str) -> str:
    """Why an Approach 3 estimate is not identified ("" when it is)."""
    if fam.lnd is None:
        return fam.why3 or "no L(N, D) fit"
    e = fam.lnd.estimates.get(name)
    if name in ("alpha", "beta"):
        return not_identified(e, max_width=MAX_ALPHA_WIDTH, bounds=EXPONENT_BOUNDS)
    if name in ("a", "b", "a_C", "b_C"):
        return not_identified(e, max_width=MAX_EXPONENT_WIDTH, bounds=(0.0, 1.0))
    if name == "E":
        return not_identified(e, bounds=(1e-3, math.inf))
    return not_identified(e)


def approach2_why(fam: FamilyStudy, name: str) -> str:
    if fam.frontier is None:
        return fam.why2 or "no IsoFLOP frontier"
    return not_identified(fam.approach2.get(name), max_width=MAX_EXPONENT_WIDTH, bounds=(0.0, 1.0))


def compare_approaches(families: dict[str, FamilyStudy]) -> pd.DataFrame:
    """Per family, the frontier exponents of Approach 2 (IsoFLOP parabolas) and Approach 3 (L(N, D)'s frontier over
    the same budgets, under the project's FLOPs) side by side, and whether their intervals overlap."""
    rows = []
    for fam in families.values():
        for name, a3 in (("a", "a_C"), ("b", "b_C")):
            e2 = fam.approach2.get(name)
            e3 = fam.lnd.estimates.get(a3) if fam.lnd is not None else None
            w2, w3 = approach2_why(fam, name), lnd_why(fam, a3)
            overlap = "—" if (w2 or w3) else ("yes" if e2.lo <= e3.hi and e3.lo <= e2.hi else "no")
            rows.append({"family": fam.family,
                         "exponent": "a (N* ∝ C^a)" if name == "a" else "b (D* ∝ C^b)",
                         "Approach 2 (IsoFLOP)": "not identified (" + w2 + ")" if w2 else e2.fmt(3),
                         "Approach 3 (L(N, D))": "not identified (" + w3 + ")" if w3 else e3.fmt(3),
                         "intervals overlap": overlap})
    return pd.DataFrame(rows, columns=["family", "exponent", "Approach 2 (IsoFLOP)", "Approach 3 (L(N, D))",
                                       "intervals overlap"])


def _pairs(families: dict[str, FamilyStudy], references: tuple[str, ...]) -> list[tuple[str, str]]:
    """(family, reference) pairs to compare: every family with the first reference (dense), and each later
    reference (moe) with the families that come after all references (ultramem over moe)."""
    pairs = [(f, references[0]) for f in families if f != references[0]]
    return pairs + [(f, r) for r in references[1:] for f in families if f not in references]


def frontier_multipliers(families: dict[str, FamilyStudy], level: float = 0.95,
                         references: tuple[str, ...] = ("dense", "moe")) -> pd.DataFrame:
    """Effective compute multiplier on the frontier: M(C) = C_ref(L_f*(C)) / C, the compute the reference family
    needs on its L(N, D) frontier to reach the loss family f reaches at compute C on its own, at each of f's
    budgets; the interval pairs the two families' bootstrap refits (independent resamples). Every family is
    compared with the first reference (dense); each later reference (moe) is compared with the families that come
    after all references (ultramem over moe, not moe over itself or dense over moe)."""
    cols = ["family", "over", "budget C", "L* (family)", "M", "lo", "hi", "status"]
    pairs = _pairs(families, references)
    rows = []
    for name, reference in pairs:
        fam, ref = families[name], families.get(reference)
        budgets = np.sort(fam.points["budget"].unique())
        why = (f"no {reference} L(N, D) fit ({ref.why3 if ref else 'no ' + reference + ' runs'})"
               if ref is None or ref.lnd is None else fam.why3 if fam.lnd is None else "")
        if why:
            rows += [{"family": name, "over": reference, "budget C": c, "L* (family)": math.nan, "M": math.nan,
                      "lo": math.nan, "hi": math.nan, "status": f"not identified ({why})"} for c in budgets]
            continue
        m, l_opt = _multiplier(fam.lnd.law, ref.lnd.law, fam, ref, budgets)
        boots = list(zip(fam.lnd.boot, ref.lnd.boot, strict=False))
        draws = (np.array([_multiplier(f, r, fam, ref, budgets)[0] for f, r in boots]) if boots
                 else np.zeros((0, len(budgets))))
        resamples = fam.lnd.resamples or None
        for j, c in enumerate(budgets):
            e = estimate(float(m[j]), draws[:, j] if len(draws) else None, level, resamples=resamples)
            w = not_identified(e, max_ratio=MAX_MULTIPLIER_RATIO)
            rows.append({"family": name, "over": reference, "budget C": float(c), "L* (family)": float(l_opt[j]),
                         "M": e.value, "lo": e.lo, "hi": e.hi,
                         "status": f"not identified ({w})" if w else "identified"})
    return pd.DataFrame(rows, columns=cols)


def _multiplier(f_law: ChinchillaLaw, r_law: ChinchillaLaw, fam: FamilyStudy, ref: FamilyStudy,
                budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M at each budget, family f's frontier loss there) for one pair of laws."""
    l_opt = frontier(f_law, fam.flops_per_token, budgets, fam.n_range)[2]
    c_range = (min(fam.c_range[0], ref.c_range[0]), max(fam.c_range[1], ref.c_range[1]))
    curve = frontier_curve(r_law, ref.flops_per_token, ref.n_range, c_range)
    return compute_for_loss(curve, l_opt) / budgets, l_opt


def isoflop_study(runs: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                  families: list[str] | None = None) -> IsoflopStudy | None:
    """Both approaches for every family with a D axis (some size trained at two or more token budgets), their
    cross-check and the multipliers on the frontier; None when no family has one (a sweep at one budget per size)."""
    need = ["family", "flops", "tokens", "active_params", "val_loss", "flops_per_token"]
    if runs.empty or any(c not in runs for c in need):
        return None
    names = families or list(dict.fromkeys(runs["family"].dropna()))
    out = {}
    for name in names:
        pts = runs[runs["family"] == name]
        if len(pts) and has_data_axis(pts.assign(tokens=pd.to_numeric(pts["tokens"], errors="coerce"))):
            out[name] = study_family(runs, name, n_boot=n_boot, seed=seed, level=level)
    if not out:
        return None
    return IsoflopStudy(out, compare_approaches(out), frontier_multipliers(out, level),
                        sampled_minima(out, n_boot=n_boot, seed=seed, level=level), level)


def _budget_minima(fam: FamilyStudy, n_boot: int, seed: int) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """(budgets, their lowest seed-mean point, [B, budgets] the same minimum in each resample). A resample draws
    each (N, D) point's seeds with replacement, as many as it has, so it carries seed noise and nothing else."""
    pts = fam.points
    y = pts["loss"].to_numpy(float)
    keys, cl = np.unique(pts["cluster"].to_numpy(), return_inverse=True)
    w = resample_counts(len(pts), None, n_boot, seed, strata=cl)  # [B, runs]
    boot = np.stack([np.bincount(cl, wb * y, minlength=len(keys)) / np.bincount(cl, wb, minlength=len(keys))
                     for wb in w]) if n_boot else np.zeros((0, len(keys)))  # [B, points]
    means = pts.groupby("cluster", sort=True).agg(budget=("budget", "first"), n=("n", "first"), loss=("loss", "mean"))
    budgets = np.sort(means["budget"].unique())
    best, draws = [], np.full((len(boot), len(budgets)), np.nan)
    for j, c in enumerate(budgets):
        at = np.flatnonzero(means["budget"].to_numpy() == c)
        row = means.iloc[at].sort_values("n")
        top = row.loc[row["loss"].idxmin()]
        edge = ("smallest" if top["n"] == row["n"].iloc[0] else "largest" if top["n"] == row["n"].iloc[-1] else "")
        best.append({"n": top["n"], "loss": top["loss"], "edge": edge if len(row) > 1 else "only"})
        if len(boot):
            draws[:, j] = boot[:, at].min(axis=1)
    return budgets, pd.DataFrame(best), draws


def sampled_minima(families: dict[str, FamilyStudy], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                   references: tuple[str, ...] = ("dense", "moe")) -> pd.DataFrame:
    """The comparison without a fitted law: at each budget, each family's lowest seed-mean loss over its sampled
    sizes, and its difference to the reference family's at the same budget (within BUDGET_RTOL), with a bootstrap
    over seeds (each point's seeds redrawn, the two families independently). Pairs as in frontier_multipliers.
    The sampled minimum is an upper bound on the frontier loss (more so when it sits at the smallest or largest
    sampled size: column `edge`), so the difference is not a frontier difference; it is what the runs show at
    the sizes they tried, and it needs no E, α or β."""
    cols = ["family", "over", "budget C", "N (family)", "L (family)", "N (over)", "L (over)", "dL", "lo", "hi",
            "edge"]
    mins = {name: _budget_minima(fam, n_boot, seed + i) for i, (name, fam) in enumerate(families.items())}
    pairs = _pairs(families, references)
    rows = []
    for name, reference in pairs:
        if reference not in mins:
            continue
        (cf, bf, df), (cr, br, dr) = mins[name], mins[reference]
        for j, c in enumerate(cf):
            k = int(np.argmin(np.abs(np.log(cr / c))))
            if abs(math.log(cr[k] / c)) > math.log1p(BUDGET_RTOL):
                continue
            e = estimate(bf["loss"][j] - br["loss"][k], df[:, j] - dr[:, k] if len(df) else None, level)
            edge = "; ".join(f"{who} at its {bf_['edge'][i]} size" for who, bf_, i in ((name, bf, j), (reference, br, k))
                             if bf_["edge"][i])
            rows.append({"family": name, "over": reference, "budget C": float(c), "N (family)": bf["n"][j],
                         "L (family)": bf["loss"][j], "N (over)": br["n"][k], "L (over)": br["loss"][k],
                         "dL": e.value, "lo": e.lo, "hi": e.hi, "edge": edge})
    return pd.DataFrame(rows, columns=cols)
