"""Per-family peak-LR laws from an LR scan (`method: lr_scan` sweeps; docs/sweeps.md "LR scans").

Per (family, size): the runs' final loss against ln(LR) is fitted by a parabola (least squares over every run of
the grid LRs around the best seed-mean LR: the 3 nearest, and the next on each side unless its loss is far above
what a parabola allows, so the asymmetric far side of the loss-vs-LR curve, where runs diverge, does not tilt the
vertex); the optimum is its vertex, lr* = exp(-b / 2c). Its interval is a seed-cluster
bootstrap: seeds are drawn with replacement and each drawn seed brings all its runs (a seed fixes the
initialisation and the data order, so its runs at different LRs share their luck). An optimum is flagged (`edge`)
when the best seed-mean LR is the smallest or largest of the grid, when the vertex falls outside the grid, or when
the parabola opens downwards (no minimum): the scan must be extended there, and the size is left out of the law.

Per family: ln lr*(N) = ln A + alpha ln N, least squares over its unflagged sizes (N = active parameters), with a
bootstrap that draws one seed set per resample and refits every size's vertex from it, then the law: intervals of
A and alpha and bands of lr*(N). The result, `fitted_rule(...)`, is the file a sweep opts into with
`isoflop.hparams: fitted` (experiments/hparams.py reads it and refuses a family or a size it does not cover).

Pure numpy on plain arrays; `lr_table` takes the runs table of analysis.collect.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.checks import FitError

MIN_LRS = 3  # a parabola needs three distinct LRs
WINDOW = 5  # grid LRs around the best one that the parabola may see
FAR_RATIO = 12.0  # ... when their loss is within this many times the nearest ones' excess over the best
LEVEL = 0.95
RULE_KIND = "ultramem-lr-rule"  # experiments/hparams.py FITTED_RULE_KIND reads the same
RULE_VERSION = 1


@dataclass
class Optimum:
    """The fitted optimum of one (family, size) scan."""

    family: str
    n: float  # active parameters
    lr: float  # the parabola's vertex (nan when it has none)
    lo: float  # seed-bootstrap interval of lr (nan when it cannot be formed)
    hi: float
    loss: float  # the parabola's loss at its vertex
    best_grid_lr: float  # the grid LR with the lowest seed-mean loss
    best_grid_loss: float
    edge: str | None  # None | "low" | "high" | "no-minimum": where the scan must be extended
    lrs: list[float] = field(default_factory=list)  # the grid
    window: list[float] = field(default_factory=list)  # the grid LRs the parabola saw
    seeds: int = 0
    curvature: float = math.nan  # c of loss = a + b ln(lr) + c ln(lr)^2 (nats per ln-unit squared)
    reliable: bool = False  # interval from >= half of the resamples, and more than one seed
    variant: str = ""  # the run name up to its seed and LR ("ultramem-o4-x6", a sweep-local "ultramem-o4-vlr1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Law:
    """lr*(N) = coef * N ** exponent for one family, with bootstrap intervals."""

    family: str
    coef: float
    exponent: float
    coef_ci: tuple[float, float]
    exponent_ci: tuple[float, float]
    n_min: float
    n_max: float
    sizes: list[float]  # the sizes the law was fitted on (unflagged optima)
    band_n: list[float] = field(default_factory=list)
    band_lo: list[float] = field(default_factory=list)
    band_hi: list[float] = field(default_factory=list)
    resamples: int = 0  # bootstrap resamples that gave a law
    reliable: bool = False

    def predict(self, n: float | np.ndarray) -> float | np.ndarray:
        return self.coef * np.asarray(n, dtype=float) ** self.exponent

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["coef_ci"], out["exponent_ci"] = list(self.coef_ci), list(self.exponent_ci)
        return out


# ---- one (family, size) ------------------------------------------------------------------------------------


def _parabola(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """(a, b, c) of y = a + b x + c x^2 by least squares; None with fewer than 3 distinct x."""
    if len(np.unique(x)) < 3:
        return None
    c, b, a = np.polyfit(x, y, 2)
    return float(a), float(b), float(c)


def _vertex(x: np.ndarray, y: np.ndarray) -> float:
    """ln LR of the parabola's minimum; nan when there is none (fewer than 3 LRs, or c <= 0)."""
    coefs = _parabola(x, y)
    if coefs is None or coefs[2] <= 0:
        return math.nan
    return -coefs[1] / (2 * coefs[2])


def _window(grid: np.ndarray, best: int, width: int) -> np.ndarray:
    """`width` consecutive grid indices around `best`, shifted inwards at the edges."""
    width = min(width, len(grid))
    start = min(max(0, best - width // 2), len(grid) - width)
    return np.arange(start, start + width)


def _window_of(means: np.ndarray, best: int, width: int) -> np.ndarray:
    """The grid indices the parabola sees: the 3 around the best seed-mean loss, plus those of the `width` around it
    whose loss exceeds the best by at most FAR_RATIO x the larger excess of the 3 (a parabola's second neighbours
    lie 4-9x as high as its first ones; a diverged run, nats above, does not)."""
    core = _window(means, best, 3)
    excess = means - means[best]
    cap = FAR_RATIO * excess[core].max()
    extra = [j for j in _window(means, best, width) if j not in core and excess[j] <= cap]
    return np.array(sorted({*core.tolist(), *extra}))


def _check_grid(lr: np.ndarray, where: str) -> np.ndarray:
    grid = np.unique(lr)
    if len(grid) < MIN_LRS:
        raise FitError(f"{where}: the LR grid has {len(grid)} value(s) ({', '.join(f'{v:.3g}' for v in grid)}); "
                       f"a parabola in log LR needs at least {MIN_LRS}: add LRs to lr_scan.lr_factors (>= 5, a "
                       "factor ~2 apart, is the design)")
    if np.any(grid <= 0):
        raise FitError(f"{where}: every LR must be > 0, got {grid[grid <= 0][0]:g}")
    return grid


def lr_optimum(lr: Any, loss: Any, seed: Any, *, family: str = "", n: float = math.nan, n_boot: int = 1000,
               seed_rng: int = 0, window: int = WINDOW, level: float = LEVEL,
               where: str = "LR scan") -> Optimum:
    """The optimum of one scan: runs at peak LRs `lr` (several seeds each) that reached `loss`."""
    lr, loss, seed = (np.asarray(v, dtype=float) for v in (lr, loss, seed))
    keep = np.isfinite(loss)
    lr, loss, seed = lr[keep], loss[keep], seed[keep]
    grid = _check_grid(lr, where)
    means = np.array([loss[lr == g].mean() for g in grid])
    best = int(np.argmin(means))
    win = grid[_window_of(means, best, window)]
    inside = np.isin(lr, win)
    x, y, s = np.log(lr[inside]), loss[inside], seed[inside]
    coefs = _parabola(x, y)
    v = -coefs[1] / (2 * coefs[2]) if coefs[2] > 0 else math.nan
    edge = None
    if not math.isfinite(v):
        edge = "no-minimum"
    elif best == 0 or v < math.log(grid[0]):
        edge = "low"
    elif best == len(grid) - 1 or v > math.log(grid[-1]):
        edge = "high"
    draws = _seed_draws(np.unique(s), n_boot, seed_rng)
    boot = np.array([_vertex(*_resample(x, y, s, d)) for d in draws]) if len(draws) else np.zeros(0)
    lo, hi, ok = _interval(boot, level, v, len(np.unique(s)))
    a, b, c = coefs
    return Optimum(
        family=family, n=float(n), lr=math.exp(v) if math.isfinite(v) else math.nan, lo=lo, hi=hi,
        loss=a + b * v + c * v * v if math.isfinite(v) else math.nan, best_grid_lr=float(grid[best]),
        best_grid_loss=float(means[best]), edge=edge, lrs=[float(g) for g in grid], window=[float(w) for w in win],
        seeds=len(np.unique(seed)), curvature=c, reliable=ok and len(np.unique(s)) > 1)


def _seed_draws(seeds: np.ndarray, n_boot: int, rng_seed: int) -> list[np.ndarray]:
    """n_boot draws of len(seeds) seeds with replacement (none with a single seed: nothing to resample)."""
    if len(seeds) < 2 or n_boot <= 0:
        return []
    rng = np.random.default_rng(rng_seed)
    return [rng.choice(seeds, size=len(seeds), replace=True) for _ in range(n_boot)]


def _drawn(s: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """Indices of every run of every drawn seed (a seed drawn twice counts twice)."""
    return np.concatenate([np.flatnonzero(s == d) for d in drawn]) if len(drawn) else np.zeros(0, dtype=int)


def _resample(x: np.ndarray, y: np.ndarray, s: np.ndarray, drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every run of every drawn seed (a seed drawn twice counts twice)."""
    idx = _drawn(s, drawn)
    return x[idx], y[idx]


def _t_half(finite: np.ndarray, clusters: int, level: float) -> float:
    """t(clusters - 1) x the bootstrap draws' sd x sqrt(S / (S - 1)): the half-width `_interval` explains."""
    from scipy.stats import t as student_t  # lazy: scipy only when an interval is formed

    return float(student_t.ppf((1 + level) / 2, clusters - 1) * finite.std(ddof=1) * math.sqrt(clusters / (clusters - 1)))


def _interval(boot: np.ndarray, level: float, center: float, clusters: int) -> tuple[float, float, bool]:
    """exp of center -+ t(clusters - 1) x the bootstrap's sd x sqrt(S / (S - 1)) over the finite draws; reliable
    when >= half of them are finite. A percentile interval of a cluster bootstrap covers too little with 3-5
    seeds (measured: 70% and 85% for a nominal 95% with 3 and 5 seeds); the Student quantile with S - 1
    degrees of freedom and the (S - 1)/S variance correction are the small-sample remedy (94% at 3 and 5 seeds;
    90-91% when diverged runs leave the parabola 3-4 LRs; tests/test_lr_scan.py)."""
    finite = boot[np.isfinite(boot)]
    if len(finite) < 2 or clusters < 2 or not math.isfinite(center):
        return math.nan, math.nan, False
    half = _t_half(finite, clusters, level)
    return math.exp(center - half), math.exp(center + half), len(finite) >= 0.5 * len(boot) and half > 0


# ---- the runs table -> optima -> laws ----------------------------------------------------------------------


_SEED_LR = re.compile(r"-s\d+(?=@|$)|@lr=[^@]*$")


def variant_of(name: Any) -> str:
    """'ultramem-o4-vlr1-s2@lr=0.5x' -> 'ultramem-o4-vlr1': what a scan varies besides the seed and the LR."""
    return _SEED_LR.sub("", str(name)) if isinstance(name, str) else ""


def lr_table(runs: Any) -> list[dict[str, Any]]:
    """Groups of a runs table (analysis.collect: family, active_params, lr, seed, val_loss; name and preset when
    there): one per (family, active_params, variant), each {family, n, variant, base, lr, loss, seed}, arrays for
    the last three. `variant` is the run name up to seed and LR; `base` is whether it is the preset itself (a
    size of the family's law) rather than a sweep-local variant of it (a comparison at that size)."""
    need = ["family", "active_params", "lr", "seed", "val_loss"]
    missing = [c for c in need if c not in runs.columns]
    if missing:
        raise FitError(f"runs table: no column(s) {', '.join(missing)}; an LR scan needs {', '.join(need)}")
    done = runs[runs["val_loss"].notna() & runs["lr"].notna()]
    if done.empty:
        raise FitError("runs table: no finished run with a val_loss and an lr")
    done = done.assign(variant=[variant_of(v) for v in done["name"]] if "name" in done else "")
    out = []
    for (family, n, variant), g in done.groupby(["family", "active_params", "variant"], sort=True):
        budgets = sorted(g["tokens"].dropna().unique()) if "tokens" in g else []
        if len(budgets) > 1:
            raise FitError(f"runs table: {variant or family} at N = {n:.4g} has runs of {len(budgets)} token budgets "
                           f"({', '.join(f'{b:.3g}' for b in budgets)}); an LR scan trains one budget per size: "
                           "give the runs of one budget (e.g. a table filtered on `tokens`)")
        presets = set(g["preset"].dropna().astype(str)) if "preset" in g else set()
        out.append({"family": str(family), "n": float(n), "variant": str(variant),
                    "base": not variant or not presets or variant in presets, "lr": g["lr"].to_numpy(float),
                    "loss": g["val_loss"].to_numpy(float), "seed": g["seed"].fillna(0).to_numpy(float)})
    return out


def fit_optima(groups: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> list[Optimum]:
    out = []
    for g in groups:
        o = lr_optimum(g["lr"], g["loss"], g["seed"], family=g["family"], n=g["n"], n_boot=n_boot, seed_rng=seed,
                       where=f"{g.get('variant') or g['family']} at N = {g['n']:.4g}")
        o.variant = g.get("variant", "")
        out.append(o)
    return out


def fit_law(family: str, groups: list[dict[str, Any]], optima: list[Optimum], n_boot: int = 1000,
            seed: int = 0, level: float = LEVEL) -> Law | None:
    """lr*(N) of one family over its unflagged optima of the presets themselves (not sweep-local variants); None
    with fewer than 2 such sizes."""
    use = [(g, o) for g, o in zip(groups, optima, strict=True)
           if g["family"] == family and g.get("base", True) and o.edge is None and math.isfinite(o.lr)]
    if len(use) < 2:
        return None
    ns = np.array([o.n for _, o in use])
    slope, icept = np.polyfit(np.log(ns), np.log([o.lr for _, o in use]), 1)
    seeds = np.unique(np.concatenate([g["seed"] for g, _ in use]))
    draws = _seed_draws(seeds, n_boot, seed)
    band_n = np.geomspace(ns.min(), ns.max(), 25)
    fits = []
    for d in draws:
        v = []
        for g, o in use:
            inside = np.isin(g["lr"], o.window)
            v.append(_vertex(*_resample(np.log(g["lr"][inside]), g["loss"][inside], g["seed"][inside],
                                        d[np.isin(d, g["seed"])])))
        v = np.array(v)
        ok = np.isfinite(v)
        if ok.sum() >= 2 and len(np.unique(ns[ok])) >= 2:
            fits.append(np.polyfit(np.log(ns[ok]), v[ok], 1))
    law = Law(family=family, coef=float(math.exp(icept)), exponent=float(slope), coef_ci=(math.nan, math.nan),
              exponent_ci=(math.nan, math.nan), n_min=float(ns.min()), n_max=float(ns.max()),
              sizes=[float(n) for n in ns], band_n=[float(n) for n in band_n], resamples=len(fits))
    if len(fits) >= 2:
        f = np.array(fits)
        k = len(seeds)
        e_lo, e_hi, ok = _interval(f[:, 0], level, slope, k)
        law.exponent_ci = (math.log(e_lo), math.log(e_hi)) if ok else (math.nan, math.nan)
        law.coef_ci = _interval(f[:, 1], level, icept, k)[:2]
        curves = f[:, 1:2] + f[:, 0:1] * np.log(band_n)[None, :]  # ln lr*(N) per resample
        bands = [_interval(curves[:, j], level, icept + slope * math.log(n), k) for j, n in enumerate(band_n)]
        law.band_lo, law.band_hi = [b[0] for b in bands], [b[1] for b in bands]
        law.reliable = ok and len(fits) >= 0.5 * len(draws)
    return law


def fit_scan(runs: Any, n_boot: int = 1000, seed: int = 0) -> tuple[list[Optimum], dict[str, Law | None]]:
    """Optima per (family, size) and the law per family of a runs table."""
    groups = lr_table(runs)
    optima = fit_optima(groups, n_boot, seed)
    families = list(dict.fromkeys(g["family"] for g in groups))
    return optima, {f: fit_law(f, groups, optima, n_boot, seed) for f in families}


def fitted_rule(optima: list[Optimum], laws: dict[str, Law | None], source: str = "") -> dict[str, Any]:
    """The fitted-rule file (JSON) a sweep opts into: per family its law, fitted range and intervals."""
    return {
        "kind": RULE_KIND, "version": RULE_VERSION, "source": source, "level": LEVEL,
        "families": {f: law.to_dict() for f, law in laws.items() if law is not None},
        "not_fitted": {f: "fewer than 2 sizes with an optimum inside the grid" for f, law in laws.items()
                       if law is None},
        "optima": [o.to_dict() for o in optima],
    }


# ---- variants at one size: each at its own best LR, against the size's MoE and its own preset -----------------


def _min_loss(x: np.ndarray, y: np.ndarray) -> float:
    """The parabola's minimum loss over (ln LR, loss); nan when it opens downwards or has < 3 LRs."""
    coefs = _parabola(x, y)
    if coefs is None or coefs[2] <= 0:
        return math.nan
    a, b, c = coefs
    return a - b * b / (4 * c)


def _best_loss(g: dict[str, Any], o: Optimum, seeds: np.ndarray | None = None) -> float:
    """A variant's loss at its own optimum: the parabola's minimum over its window (every run of `seeds`, a seed
    drawn twice counting twice), or the best seed-mean grid loss when the optimum sits at the grid's edge."""
    lr, y, s = g["lr"], g["loss"], g["seed"]
    if seeds is not None:
        idx = np.concatenate([np.flatnonzero(s == d) for d in seeds]) if len(seeds) else np.zeros(0, dtype=int)
        lr, y = lr[idx], y[idx]
    if o.edge is None:
        inside = np.isclose(lr[:, None], np.array(o.window)[None, :], rtol=1e-9).any(1)
        return _min_loss(np.log(lr[inside]), y[inside])
    return float(min(y[lr == v].mean() for v in np.unique(lr))) if len(lr) else math.nan


def _rung(g: dict[str, Any]) -> str:
    """The size a variant belongs to: the second part of its name ('ultramem-o4-vlr1' -> 'o4'), else its N."""
    parts = (g.get("variant") or "").split("-")
    return parts[1] if len(parts) > 1 else f"{g['n']:.3g}"


def _paired(g: dict[str, Any], o: Optimum, ref: tuple[dict[str, Any], Optimum], n_boot: int, seed: int,
            level: float) -> tuple[float, float, float]:
    """loss(g) - loss(ref) at their own best LRs, with a paired seed-bootstrap interval (Student t over seeds)."""
    from scipy.stats import t as student_t  # lazy: scipy only when an interval is formed

    rg, ro = ref
    common = np.intersect1d(np.unique(g["seed"]), np.unique(rg["seed"]))
    diff = _best_loss(g, o) - _best_loss(rg, ro)
    boot = np.array([_best_loss(g, o, d) - _best_loss(rg, ro, d) for d in _seed_draws(common, n_boot, seed)])
    finite = boot[np.isfinite(boot)]
    k = len(common)
    if k < 2 or len(finite) < max(2, len(boot) // 2) or not math.isfinite(diff):
        return diff, math.nan, math.nan
    half = student_t.ppf((1 + level) / 2, k - 1) * finite.std(ddof=1) * math.sqrt(k / (k - 1))
    return diff, diff - half, diff + half


def compare_variants(groups: list[dict[str, Any]], optima: list[Optimum], n_boot: int = 1000, seed: int = 0,
                     level: float = LEVEL) -> list[dict[str, Any]]:
    """Per size (rung) with more than one variant: each variant's loss at its own best LR (`_best_loss`), and its
    difference to the rung's MoE preset and, for a sweep-local variant, to its own preset, each with a paired
    seed-bootstrap interval (the seeds both share are drawn together: a seed fixes the data order, so its runs share
    their luck). A sweep-local variant is set against the sweep-local MoE of the same recipe when there is one.
    Negative: lower loss than the reference."""
    pairs = list(zip(groups, optima, strict=True))
    rows = []
    for rung in dict.fromkeys(_rung(g) for g in groups):
        here = [(g, o) for g, o in pairs if _rung(g) == rung]
        if len(here) < 2:
            continue
        moe_base = next(((g, o) for g, o in here if g["family"] == "moe" and g.get("base", True)), None)
        for g, o in here:
            # a sweep-local variant meets the MoE trained the same way when there is one (the same name after the
            # rung: ultramem-o4-b4 and moe-o4-b4), else the rung's MoE preset
            moe = moe_base if g.get("base", True) else next(
                ((m, mo) for m, mo in here if m["family"] == "moe" and not m.get("base", True)
                 and _recipe(m) == _recipe(g)), moe_base)
            base = None if g.get("base", True) else next(
                ((b, bo) for b, bo in here if b.get("base", True) and b["family"] == g["family"]), None)
            row = {"rung": rung, "n": g["n"], "variant": g.get("variant") or g["family"], "family": g["family"],
                   "seeds": len(np.unique(g["seed"])), "best_lr": o.lr if o.edge is None else o.best_grid_lr,
                   "edge": o.edge or "", "loss": _best_loss(g, o)}
            for name, ref in (("moe", moe), ("base", base)):
                diff, lo, hi = (_paired(g, o, ref, n_boot, seed, level) if ref is not None and ref[0] is not g
                                else (math.nan, math.nan, math.nan))
                named = ref is not None and ref[0] is not g
                row |= {f"vs_{name}": (ref[0].get("variant") or ref[0]["family"]) if named else "",
                        f"diff_{name}": diff, f"lo_{name}": lo, f"hi_{name}": hi}
            rows.append(row)
    return rows


def _recipe(group: dict[str, Any]) -> str:
    """What a sweep-local variant's name says after its family and rung ("b4" of ultramem-o4-b4)."""
    parts = str(group.get("variant") or "").split("-", 2)
    return parts[2] if len(parts) == 3 else ""


# ---- figures and report ------------------------------------------------------------------------------------


def rule_gap(group: dict[str, Any], opt: Optimum, rule_lr: float, n_boot: int = 1000, seed: int = 0,
             level: float = LEVEL) -> tuple[float, float, float]:
    """What today's rule costs at one size: the seed-mean loss at the grid LR that is the rule's minus the
    parabola's minimum over the optimum's window, with a seed-cluster bootstrap interval (each draw refits the
    parabola on the drawn seeds' runs and takes their runs at the rule's LR; Student t over the seeds, as for lr*).
    (nan, nan, nan) where the grid lacks the rule's LR or the parabola has no minimum."""
    lr, loss, s = (np.asarray(group[k], dtype=float) for k in ("lr", "loss", "seed"))
    hit = _rule_grid_lr(lr, rule_lr)
    if hit is None or not math.isfinite(opt.loss):
        return math.nan, math.nan, math.nan
    at_rule, inside = lr == hit, np.isin(lr, opt.window)

    def gap(idx: np.ndarray) -> float:
        win, rule = idx[inside[idx]], idx[at_rule[idx]]
        coefs = _parabola(np.log(lr[win]), loss[win]) if len(rule) else None
        if coefs is None or coefs[2] <= 0:
            return math.nan
        a, b, c = coefs
        return float(loss[rule].mean() - (a - b * b / (4 * c)))

    center = gap(np.arange(len(lr)))
    seeds = np.unique(s)
    boot = np.array([gap(_drawn(s, drawn)) for drawn in _seed_draws(seeds, n_boot, seed)])
    finite = boot[np.isfinite(boot)] if len(boot) else boot
    if len(finite) < 2 or not math.isfinite(center):
        return center, math.nan, math.nan
    half = _t_half(finite, len(seeds), level)
    return center, center - half, center + half


def _rule_grid_lr(lr: Any, rule_lr: float) -> float | None:
    """The grid LR that is the rule's (within 1%); None when the grid lacks it."""
    grid = np.unique(lr)
    hit = grid[np.abs(np.log(grid / rule_lr)) < 0.01] if rule_lr > 0 else []
    return float(hit[0]) if len(hit) else None


def _rule_loss(group: dict[str, Any], rule_lr: float) -> float:
    """Seed-mean loss at the grid LR that is the rule's; nan when the grid lacks it."""
    hit = _rule_grid_lr(group["lr"], rule_lr)
    return float(group["loss"][group["lr"] == hit].mean()) if hit is not None else math.nan


def plot_scan(groups: list[dict[str, Any]], optima: list[Optimum], laws: dict[str, Law | None],
              out_dir: Any) -> list[Any]:
    """figures/loss_vs_lr.{png,svg} (per family: seed-mean loss against LR per size, the parabola, its vertex) and
    figures/lr_law.{png,svg} (the optima with their intervals and each family's law with its band)."""
    import matplotlib as mpl  # lazy: matplotlib only when plotting

    from analysis.plots import _figure, color, family_label, marker, save

    families = list(dict.fromkeys(g["family"] for g in groups))
    fig, axes = _figure(len(families), width=4.2, height=3.6)
    cmap = mpl.colormaps["viridis"]
    for ax, fam in zip(axes, families, strict=True):
        sizes = [(g, o) for g, o in zip(groups, optima, strict=True) if g["family"] == fam]
        for i, (g, o) in enumerate(sizes):
            c = cmap(i / max(1, len(sizes) - 1))
            grid = np.unique(g["lr"])
            means = [g["loss"][g["lr"] == v].mean() for v in grid]
            ax.scatter(g["lr"], g["loss"], s=6, color=c, alpha=0.35, linewidths=0)
            ax.plot(grid, means, "o", color=c, ms=3.5,
                    label=(o.variant or f"N={o.n:.3g}") + (f" ({o.edge})" if o.edge else ""))
            inside = np.isin(g["lr"], o.window)
            coefs = _parabola(np.log(g["lr"][inside]), g["loss"][inside])
            if coefs is not None:
                xs = np.linspace(math.log(min(o.window)), math.log(max(o.window)), 60)
                ax.plot(np.exp(xs), coefs[0] + coefs[1] * xs + coefs[2] * xs * xs, "-", color=c, lw=1)
            if math.isfinite(o.lr):
                ax.axvline(o.lr, color=c, lw=0.7, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(family_label(fam))
        ax.legend()
    paths = save(fig, Path(out_dir) / "figures", "loss_vs_lr")
    fig, (ax,) = _figure(1, width=5.5, height=4.0)
    for fam in families:
        opt = [o for o in optima if o.family == fam and math.isfinite(o.lr)]
        ok = [o for o in opt if o.edge is None]
        if ok:
            err = np.array([[o.lr - o.lo if math.isfinite(o.lo) else 0 for o in ok],
                            [o.hi - o.lr if math.isfinite(o.hi) else 0 for o in ok]])
            ax.errorbar([o.n for o in ok], [o.lr for o in ok], yerr=err, fmt=marker(fam), color=color(fam),
                        capsize=2, label=family_label(fam))
        flagged = [o for o in opt if o.edge is not None]
        if flagged:
            ax.plot([o.n for o in flagged], [o.lr for o in flagged], marker(fam), mfc="none", color=color(fam),
                    label=f"{family_label(fam)}: at the grid edge")
        law = laws.get(fam)
        if law is not None:
            ax.plot(law.band_n, law.predict(law.band_n), "-", color=color(fam), lw=1)
            if law.band_lo:
                ax.fill_between(law.band_n, law.band_lo, law.band_hi, color=color(fam), alpha=0.15, lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("active parameters N")
    ax.set_ylabel("optimal peak LR")
    ax.legend()
    return paths + save(fig, Path(out_dir) / "figures", "lr_law")


def _diff(row: dict[str, Any], ref: str) -> str:
    d, lo, hi = row[f"diff_{ref}"], row[f"lo_{ref}"], row[f"hi_{ref}"]
    if not math.isfinite(d):
        return ""
    return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" if math.isfinite(lo) else f"{d:+.4f} (no interval)"


def _g(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else "-"


def report_md(groups: list[dict[str, Any]], optima: list[Optimum], laws: dict[str, Law | None], source: str,
              rule_lr: Any = None, variants: list[dict[str, Any]] | None = None) -> str:
    """The scan's report: per family the law with intervals, per size the optimum, its interval, whether it sits
    at the grid's edge (and which way to extend), and the loss at the optimum against the loss at the rule's LR
    (`rule_lr(N)`, today's shared rule; the grid point at factor 1)."""
    runs = sum(len(g["lr"]) for g in groups)
    lines = [f"# LR scan: {source}", "",
             f"{runs} runs, {len(groups)} (family, size) scans. Per size: a parabola in ln LR over the 3 grid LRs "
             "around the best seed-mean one and the next on each side unless it is far above what a parabola allows "
             "(a diverged run); its vertex is lr*, with a seed-cluster bootstrap interval "
             f"({LEVEL:.0%}, Student t over the seeds). Per family: lr*(N) = A N^alpha by least squares over the "
             "sizes whose optimum lies inside the grid (analysis/hparams.py).", "",
             "## Laws", "", "| family | lr*(N) | alpha (95%) | A (95%) | sizes | reliable |", "|---|---|---|---|---|---|"]
    for fam, law in laws.items():
        if law is None:
            lines.append(f"| {fam} | not fitted: fewer than 2 sizes with an optimum inside the grid | | | | |")
            continue
        lines.append(f"| {fam} | {law.coef:.4g} N^{law.exponent:.3f} | {law.exponent:.3f} "
                     f"[{_g(law.exponent_ci[0])}, {_g(law.exponent_ci[1])}] | {law.coef:.3g} [{_g(law.coef_ci[0])}, "
                     f"{_g(law.coef_ci[1])}] | {len(law.sizes)} ({law.n_min:.3g}-{law.n_max:.3g}) | "
                     f"{'yes' if law.reliable else 'no'} |")
    lines += ["", "## Optima per size", "",
              "| family | N | LR grid | seeds | best grid LR | lr* (95%) | edge | loss at lr* | loss at the rule's LR | "
              f"rule - lr* (nats, {LEVEL:.0%}) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g, o in zip(groups, optima, strict=True):
        if not g.get("base", True):
            continue  # a sweep-local variant: in the table of variants
        rl = _rule_loss(g, float(rule_lr(o.n))) if rule_lr is not None else math.nan
        gap, lo, hi = rule_gap(g, o, float(rule_lr(o.n))) if rule_lr is not None else (math.nan,) * 3
        band = f" [{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) else ""
        lines.append(f"| {o.family} | {o.n:,.0f} | {_g(min(o.lrs))}-{_g(max(o.lrs))} ({len(o.lrs)}) | {o.seeds} | "
                     f"{_g(o.best_grid_lr)} | {_g(o.lr)} [{_g(o.lo)}, {_g(o.hi)}] | {o.edge or ''} | {_g(o.loss)} | "
                     f"{_g(rl)} | {_g(gap)}{band} |")
    if variants:
        lines += ["", "## Variants at one size", "",
                  "Each variant at its own best LR (the parabola's minimum; the best grid point when the optimum sits "
                  "at the grid's edge), against the rung's MoE (a sweep-local variant: the sweep-local MoE of the same "
                  "recipe, e.g. ultramem-o4-b4 against moe-o4-b4, when there is one) and, for a sweep-local variant, "
                  "its own preset: "
                  f"the difference in nats with a paired seed-bootstrap {LEVEL:.0%} interval (negative: lower loss).",
                  "", "| rung | variant | N | seeds | best LR | loss | vs MoE (nats) | vs its preset (nats) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in variants:
            lines.append(f"| {r['rung']} | {r['variant']} | {r['n']:,.0f} | {r['seeds']} | {_g(r['best_lr'])}"
                         f"{' (' + r['edge'] + ' edge)' if r['edge'] else ''} | {r['loss']:.4f} | "
                         f"{_diff(r, 'moe')} | {_diff(r, 'base')} |")
    flagged = [o for o in optima if o.edge]
    if flagged:
        lines += ["", "## Scans to extend", ""]
        for o in flagged:
            how = {"low": f"add LRs below {_g(min(o.lrs))}", "high": f"add LRs above {_g(max(o.lrs))}",
                   "no-minimum": "the loss does not curve up on both sides: widen the grid both ways"}[o.edge]
            who = f"{o.family} at N = {o.n:,.0f}" + (f" ({o.variant})" if o.variant else "")
            lines.append(f"- {who}: best grid LR {_g(o.best_grid_lr)}; {how} (left out of the law)")
    lines += ["", "Figures: `figures/loss_vs_lr.png`, `figures/lr_law.png`. The fitted rule a sweep opts into "
              "(`isoflop.hparams: fitted`, `isoflop.hparams_file: .../lr_rule.json`): `lr_rule.json`.", ""]
    return "\n".join(lines)


# ---- refining a scan (`ultramem hparams SWEEP --refine OUT.yaml`) -------------------------------------------------


@dataclass
class ScanAddition:
    """Runs a scan should add: a preset at these LR factors for these seeds, and why (one `lr_scan.extra` entry)."""

    preset: str
    lr_factors: list[float]
    seeds: list[int]
    why: str


def scan_additions(preset: str, optimum: Optimum, runs: list[tuple[float, int]], *, min_seeds: int = 3,
                   extend: int = 2) -> list[ScanAddition]:
    """What one (family, size) scan needs next, from its finished runs (factor, seed) and its fitted optimum (fitted
    on the same runs, so that its `lrs` are `factors` x the rule's LR, in the same order).

    At an edge (`optimum.edge`), `extend` factors beyond it, each 2x further, for every seed of the edge LR (more
    seeds wait for the next round: the optimum will move). Otherwise up to `min_seeds` seeds at the 3 grid
    factors around the best seed-mean one: existing seeds first, then new ones (the next integers)."""
    factors = sorted({f for f, _ in runs})
    seeds_at = {f: {s for g, s in runs if g == f} for f in factors}
    label = f"{optimum.family} N={optimum.n:,.0f}"
    if optimum.edge in ("low", "no-minimum"):
        new = [factors[0] / 2 ** k for k in range(1, extend + 1)]
        why = (f"{label}: best seed-mean loss at the lowest LR factor {factors[0]:g}" if optimum.edge == "low"
               else f"{label}: the loss does not curve up on both sides")
        out = [ScanAddition(preset, new, sorted(seeds_at[factors[0]]), why + f"; extend below ({_factors(new)})")]
        if optimum.edge == "low":
            return out
    else:
        out = []
    if optimum.edge in ("high", "no-minimum"):
        new = [factors[-1] * 2 ** k for k in range(1, extend + 1)]
        why = (f"{label}: best seed-mean loss at the highest LR factor {factors[-1]:g}" if optimum.edge == "high"
               else f"{label}: the loss does not curve up on both sides")
        return out + [ScanAddition(preset, new, sorted(seeds_at[factors[-1]]), why + f"; extend above "
                                                                                      f"({_factors(new)})")]
    best = optimum.lrs.index(optimum.best_grid_lr)  # the grid in LRs, as `factors` in factors (same order)
    core = [factors[i] for i in _window(np.array(factors), best, 3)]
    have = sorted({s for f in core for s in seeds_at[f]})
    wanted = have[:min_seeds] + [s for s in range(max([*have, -1]) + 1, max([*have, -1]) + 1 + min_seeds)][
        : max(0, min_seeds - len(have))]
    missing: dict[tuple[int, ...], list[float]] = {}
    for f in core:
        lack = tuple(s for s in wanted if s not in seeds_at[f])
        if lack:
            missing.setdefault(lack, []).append(f)
    return [ScanAddition(preset, fs, list(lack), f"{label}: optimum inside the grid near factor {factors[best]:g} "
                         f"(lr* {_g(optimum.lr)}); {min_seeds} seeds wanted at the 3 LRs around it, "
                         f"{min(len(seeds_at[f]) for f in fs)} there") for lack, fs in missing.items()]


def _factors(fs: list[float]) -> str:
    return ", ".join(f"{f:g}x" for f in fs)


def extra_yaml(text: str, additions: list[ScanAddition], costs: list[str] | None = None) -> str:
    """The sweep file `text` with `additions` appended to its lr_scan block as `extra:` entries, each under a comment
    saying why (and its cost). The file's own lines are kept as they are; an existing `extra:` list is extended
    (it must then be the block's last key)."""
    import json

    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.split("#")[0].rstrip() == "lr_scan:"), None)
    if start is None:
        raise FitError("the sweep file has no top-level 'lr_scan:' block (refine works on method: lr_scan sweeps)")
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ", "#")), len(lines))
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    keys = [i for i in range(start + 1, end) if lines[i].startswith("  ") and lines[i][2:3] not in (" ", "#", "-")
            and ":" in lines[i]]
    has_extra = any(lines[i].startswith("  extra:") for i in keys)
    if has_extra and not lines[keys[-1]].startswith("  extra:"):
        raise FitError("lr_scan.extra is not the last key of the lr_scan block; move it to the end so that new "
                       "entries can be appended")
    if has_extra and lines[keys[-1]].split("#")[0].strip() not in ("extra:",):
        raise FitError("lr_scan.extra is written inline; write it as a block list ('extra:' then '- {...}' lines)")
    new = [] if has_extra else ["  extra:"]
    for i, a in enumerate(additions):
        new.append(f"    # {a.why}" + (f"; cost: {costs[i]}" if costs else ""))
        new.append(f"    - {{preset: {a.preset}, lr_factors: [{', '.join(repr(float(f)) for f in a.lr_factors)}], "
                   f"seeds: [{', '.join(str(s) for s in a.seeds)}], why: {json.dumps(a.why)}}}")
    return "\n".join(lines[:end] + new + lines[end:]) + "\n"
