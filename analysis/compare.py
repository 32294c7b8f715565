"""Dense vs MoE vs UltraMem: per-family laws, exponent differences, effective compute multiplier, memory-size law,
knowledge capacity. Every function takes the runs table of analysis/collect.py and degrades to a stated reason
("not enough points: ...") instead of raising when a sweep is too small for a law.

- Per-family law L = E + A·x^(−α) in x = training FLOPs or activated parameters (pure power law when there are
  too few sizes for a floor), with bootstrap CIs over runs.
- Effective compute multiplier of a sparse run (Clark et al. 2022's "effective parameter count", in compute):
  the dense compute that reaches the run's loss on the dense law, divided by the run's own compute,
  M = C_dense(L) / C with C_dense(L) = (A/(L − E))^(1/α). M > 1: the sparse model is worth more dense compute.
- UltraMem loss vs memory size at a fixed backbone (fixed activated size, top-m): log-linear L = c0 − k·ln M, which
  is how the paper states it ("the loss decreases linearly as the sparse parameters increase exponentially",
  Fig. 6b), and a power law with a floor where there are enough sizes.
- Activation density (UltraMemV2 §1, §4.1): loss vs values read per token v at fixed total parameters, per memory
  family, as L = c0 + b·ln v; and whether 4× density lowers the loss more than 4× total sparse parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.bootstrap import Estimate, LawFit, estimate
from analysis.checks import FitError, NotEnoughPointsError
from analysis.fit import MIN_POINTS_FLOOR, MIN_POINTS_PURE, fit_log_linear_ci, fit_power_law_ci
from ultramem.families import families as registered_families

AXES = {  # column -> axis label with units
    "flops": "training compute C (FLOPs)",
    "active_params": "activated parameters",
    "active_non_embedding_params": "activated non-embedding parameters",
    "total_params": "total parameters",
    "non_embedding_params": "non-embedding parameters",
    "tokens": "training tokens",
    "memory_slots": "memory values per layer",
    "sparse_params": "sparse (memory value) parameters",
    "values_per_token": "memory values read per token (heads × top-m × memory layers)",
}
FLOOR_MIN_SIZES = MIN_POINTS_FLOOR + 1  # "auto" fits a floor only with a residual dof to spare


def families(runs: pd.DataFrame) -> list[str]:
    """The families present in `runs`: registered ones in registry order, then unknown names sorted."""
    order = [f.name for f in registered_families()]
    present = list(dict.fromkeys(runs["family"].dropna()))
    return [f for f in order if f in present] + sorted(f for f in present if f not in order)


def sparse_family_names() -> tuple[str, ...]:
    """The registered families with parameters tokens select from (experts, value tables), in registry order."""
    return tuple(f.name for f in registered_families() if f.sparse)


def usable(runs: pd.DataFrame, x: str, y: str = "val_loss") -> pd.DataFrame:
    """Finished runs with positive, finite x and y."""
    ok = runs["state"].fillna("done").eq("done") if "state" in runs else True
    for col in (x, y):
        v = pd.to_numeric(runs[col], errors="coerce")
        ok = ok & np.isfinite(v) & (v > 0)
    return runs[ok]


SPARSE_CONFIG = ("memory_slots", "memory_top_m", "moe_experts", "moe_top_k")


def seed_clusters(df: pd.DataFrame, x: str) -> np.ndarray:
    """A label per run, equal for the seeds of one configuration (same x, parameter counts and tokens). Every
    bootstrap here draws these clusters whole, a configuration with all its seeds, so an interval is not narrowed
    by counting seeds of one point as independent points, and a configuration's seed spread enters each refit."""
    cols = [c for c in dict.fromkeys((x, "active_params", "total_params", "tokens")) if c in df]
    return np.array(["|".join(f"{float(v):.6g}" for v in row) for row in df[cols].itertuples(index=False)])


def ladder(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One family's runs at a single sparsity, and how many were set aside.

    A family's law follows one sparsity (the paper compares at a fixed total/activated ratio). Where a backbone
    carries several sparse configurations (a memory-size or expert-count sweep in the same runs directory), the
    runs whose log(total/active) is closest to the ladder's (the median over single-configuration backbones, or
    over all runs if there are none) stand for the family there; the others belong to the memory-size law.
    """
    if df.empty or "backbone" not in df:
        return df, 0
    config = df.reindex(columns=list(SPARSE_CONFIG)).astype(float).fillna(-1).astype(str).agg("/".join, axis=1)
    backbone = df["backbone"].astype(object).fillna(df["run_id"])  # object: an all-empty column reads as float
    n_configs = config.groupby(backbone).transform("nunique")
    if (n_configs <= 1).all():
        return df, 0
    ratio = np.log(pd.to_numeric(df["total_params"], errors="coerce") / pd.to_numeric(df["active_params"],
                                                                                       errors="coerce"))
    single = ratio[n_configs <= 1]
    ref = float(np.nanmedian(single if len(single) else ratio))
    dist = (ratio - ref).abs()
    keep = (n_configs <= 1) | (dist <= dist.groupby(backbone).transform("min") + 1e-9)
    return df[keep], int((~keep).sum())


@dataclass
class FamilyFit:
    family: str
    x: str
    n_runs: int
    fit: LawFit | None = None
    reason: str = ""  # why there is no fit
    set_aside: int = 0  # runs at other sparsities (see `ladder`)
    floor: bool = False  # the law has a fitted floor E (else a pure power law)


def fit_family(runs: pd.DataFrame, family: str, x: str = "flops", y: str = "val_loss", *, floor: str = "auto",
               n_boot: int = 1000, seed: int = 0, level: float = 0.95, solver: str = "lsq",
               targets: tuple[float, ...] = ()) -> FamilyFit:
    """L = E + A·x^(−α) for one family. floor: "auto" (a floor from 5 distinct sizes, else a pure power law from
    3), "yes" or "no"."""
    if floor not in ("auto", "yes", "no"):
        raise FitError(f"floor {floor!r} unknown; allowed: auto | yes | no")
    df, aside = ladder(usable(runs[runs["family"] == family], x, y))
    sizes = df[x].nunique()
    with_floor = floor == "yes" or (floor == "auto" and sizes >= FLOOR_MIN_SIZES)
    need = MIN_POINTS_FLOOR if with_floor else MIN_POINTS_PURE
    out = FamilyFit(family, x, len(df), set_aside=aside, floor=with_floor)
    if sizes < need:
        out.reason = f"not enough points: {sizes} distinct {x} value(s), need {need}"
        return out
    try:
        out.fit = fit_power_law_ci(df[x], df[y], groups=seed_clusters(df, x), floor=with_floor, n_boot=n_boot, seed=seed,
                                   level=level, solver=solver, targets=targets, x_name=x, y_name=y,
                                   source=f"family {family}")
    except NotEnoughPointsError as err:
        out.reason = str(err)
    return out


def fit_families(runs: pd.DataFrame, x: str = "flops", y: str = "val_loss", **kw) -> dict[str, FamilyFit]:
    return {f: fit_family(runs, f, x, y, **kw) for f in families(runs)}


def _draws(fit: LawFit, fn) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # runaway refits give inf / nan (analysis.bootstrap_fit)
        return np.array([fn(b) for b in fit.boot], dtype=float)


def exponent_differences(fits: dict[str, FamilyFit], reference: str = "dense", level: float = 0.95) -> pd.DataFrame:
    """α_family − α_reference with a percentile CI (the families' bootstraps are independent, so draw i of one is
    paired with draw i of the other). Only laws of the same form (both with or both without a floor) are compared."""
    ref = fits.get(reference)
    rows = []
    for fam, ff in fits.items():
        if fam == reference or ff.fit is None:
            continue
        row = {"family": fam, "reference": reference, "alpha": ff.fit.law.alpha, "diff": math.nan,
               "lo": math.nan, "hi": math.nan, "note": ""}
        rows.append(row)
        if ref is None or ref.fit is None:
            row["note"] = f"no {reference} law"
            continue
        if ff.floor != ref.floor:
            row["note"] = "laws of different form (floor vs none); exponents not comparable"
            continue
        a, b = _draws(ff.fit, lambda p: p.alpha), _draws(ref.fit, lambda p: p.alpha)
        k = min(len(a), len(b))
        e = estimate(ff.fit.law.alpha - ref.fit.law.alpha, a[:k] - b[:k] if k else None, level)
        row.update(diff=e.value, lo=e.lo, hi=e.hi)
    return pd.DataFrame(rows, columns=["family", "reference", "alpha", "diff", "lo", "hi", "note"])


SUMMARY_COLUMNS = ["family", "n_runs", "multiplier", "lo", "hi", "note"]


@dataclass
class Multiplier:
    points: pd.DataFrame  # one row per sparse run: multiplier with CI
    summary: pd.DataFrame  # one row per family: geometric-mean multiplier with CI


def compute_multiplier(runs: pd.DataFrame, dense: FamilyFit, y: str = "val_loss",
                       sparse_families: tuple[str, ...] | None = None, level: float = 0.95,
                       seed: int = 0) -> Multiplier:
    """Effective compute multiplier M = C_dense(L)/C of each sparse run (of the family's ladder) on the dense law.

    Point CIs come from the dense law's bootstrap refits. The family summary is the geometric mean over the
    family's runs; its CI resamples those runs as well (draw i: dense refit i and a resample of the runs), so it
    reflects both the dense law's uncertainty and the spread between the family's runs. Runs whose loss is at or
    below the dense floor E have no finite multiplier (nan, noted); C_dense outside the dense runs' compute range is
    an extrapolation (noted). `sparse_families` defaults to the registered families with sparse parameters.
    """
    sparse_families = sparse_family_names() if sparse_families is None else sparse_families
    cols = ["run_id", "family", "flops", "loss", "dense_flops", "multiplier", "lo", "hi", "note"]
    if dense.fit is None or dense.x != "flops":
        why = dense.reason or "the dense law must be fitted against flops"
        present = [f for f in sparse_families if f in set(runs["family"])]
        summary = pd.DataFrame({"family": present, "n_runs": 0, "multiplier": math.nan, "lo": math.nan,
                                "hi": math.nan, "note": f"no dense law: {why}"}, columns=SUMMARY_COLUMNS)
        return Multiplier(pd.DataFrame(columns=cols), summary)
    law, boot = dense.fit.law, dense.fit.boot
    dense_runs = usable(runs[runs["family"] == dense.family], "flops", y)
    c_lo, c_hi = dense_runs["flops"].min(), dense_runs["flops"].max()
    rows, per_family = [], {}
    for fam in sparse_families:
        df, _ = ladder(usable(runs[runs["family"] == fam], "flops", y))
        if df.empty:
            continue
        c, loss = df["flops"].to_numpy(float), df[y].to_numpy(float)
        point = law.inverse(loss) / c
        draws = np.array([b.inverse(loss) / c for b in boot]) if boot else np.empty((0, len(c)))  # [B, n]
        per_family[fam] = (point, draws)
        for i, (rid, ci, li) in enumerate(zip(df["run_id"], c, loss, strict=True)):
            e = estimate(point[i], draws[:, i] if len(draws) else None, level)
            cd = point[i] * ci
            note = ("loss at or below the dense floor E" if not math.isfinite(point[i]) else
                    "extrapolated beyond the dense runs" if not (c_lo <= cd <= c_hi) else "")
            rows.append({"run_id": rid, "family": fam, "flops": ci, "loss": li, "dense_flops": cd,
                         "multiplier": e.value, "lo": e.lo, "hi": e.hi, "note": note})
    summary = [_family_summary(fam, p, d, level, seed) for fam, (p, d) in per_family.items()]
    return Multiplier(pd.DataFrame(rows, columns=cols),
                      pd.DataFrame(summary, columns=SUMMARY_COLUMNS))


def _family_summary(fam: str, point: np.ndarray, draws: np.ndarray, level: float, seed: int) -> dict:
    finite = np.isfinite(point)
    row = {"family": fam, "n_runs": int(finite.sum()), "multiplier": math.nan, "lo": math.nan, "hi": math.nan,
           "note": "" if finite.all() else f"{int((~finite).sum())} run(s) below the dense floor left out"}
    if not finite.any():
        return row
    logp = np.log(point[finite])
    geo = []
    rng = np.random.default_rng(seed)
    for d in draws[:, finite]:
        pick = rng.integers(0, len(logp), len(logp))
        with np.errstate(invalid="ignore"):
            geo.append(np.exp(np.mean(np.log(d[pick]))))
    e = estimate(float(np.exp(logp.mean())), np.array(geo) if geo else None, level)
    row.update(multiplier=e.value, lo=e.lo, hi=e.hi)
    return row


def loss_gap(fits: dict[str, FamilyFit], a: str, b: str, at: float | None = None,
             level: float = 0.95) -> tuple[float, Estimate] | None:
    """L_a(x) − L_b(x) at x = `at` (default: the geometric middle of the x range both families cover), with a CI
    from the two independent bootstraps. None when either law is missing or their ranges do not overlap."""
    fa, fb = fits.get(a), fits.get(b)
    if fa is None or fb is None or fa.fit is None or fb.fit is None:
        return None
    if at is None:
        lo = max(fa.fit.x_range[0], fb.fit.x_range[0])
        hi = min(fa.fit.x_range[1], fb.fit.x_range[1])
        if lo > hi:
            return None
        at = math.sqrt(lo * hi)
    da, db = _draws(fa.fit, lambda p: float(p(at))), _draws(fb.fit, lambda p: float(p(at)))
    k = min(len(da), len(db))
    return at, estimate(float(fa.fit.law(at) - fb.fit.law(at)), da[:k] - db[:k] if k else None, level)


@dataclass
class MemoryLaw:
    backbone: str  # "<backbone> top-m <m>": the group at fixed activated size
    x: str
    n_runs: int
    log_linear: LawFit | None
    power: LawFit | None
    reason: str = ""
    run_ids: list[str] = field(default_factory=list)


def memory_laws(runs: pd.DataFrame, x: str = "memory_slots", y: str = "val_loss", family: str = "ultramem", *,
                n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[MemoryLaw]:
    """Loss vs memory size at each fixed backbone and top-m (fixed activated size), one law per such group.

    Groups with fewer than 3 memory sizes are returned with the reason instead of a law.
    """
    df = usable(runs[runs["family"] == family], x, y)
    top_m = pd.to_numeric(df["memory_top_m"], errors="coerce")
    label = df["backbone"].fillna("?") + np.where(np.isfinite(top_m), " top-m " + top_m.fillna(0).astype(int)
                                                  .astype(str), "")
    out = []
    for backbone, g in df.groupby(label, sort=True):
        sizes = g[x].nunique()
        ml = MemoryLaw(str(backbone), x, len(g), None, None, run_ids=list(g["run_id"]))
        out.append(ml)
        if sizes < MIN_POINTS_PURE:
            ml.reason = f"not enough points: {sizes} memory size(s), need {MIN_POINTS_PURE}"
            continue
        kw = dict(groups=seed_clusters(g, x), n_boot=n_boot, seed=seed, level=level, x_name=x, y_name=y,
                  source=f"{family} {backbone}")
        ml.log_linear = fit_log_linear_ci(g[x], g[y], **kw)
        if sizes >= MIN_POINTS_FLOOR:
            ml.power = fit_power_law_ci(g[x], g[y], floor=True, **kw)
        else:
            ml.reason = f"power law with floor needs {MIN_POINTS_FLOOR} memory sizes (have {sizes})"
    return out


def knowledge_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Fact recall per run (embedded-corpus probe): facts recalled = recall × facts probed."""
    cols = ["family", "run_id", "active_params", "total_params", "knowledge_facts", "knowledge_recall",
            "knowledge_heldout_recall", "knowledge_bits"]
    if "knowledge_recall" not in runs:
        return pd.DataFrame(columns=cols + ["facts_recalled", "bits_per_param"])
    df = runs[np.isfinite(pd.to_numeric(runs["knowledge_recall"], errors="coerce"))][cols].copy()
    df["facts_recalled"] = df["knowledge_recall"] * df["knowledge_facts"]
    df["bits_per_param"] = df["knowledge_bits"] / df["total_params"]
    return df.reset_index(drop=True)


# ---- activation density (UltraMemV2: "activation density has greater impact than total sparse parameters") ------

DENSITY_X = "values_per_token"
MEMORY_SIZE_KEYS = {"ultramem": "model.memory.num_keys", "pkm": "model.memory.num_keys",
                    "memory_plus": "model.memory_plus.num_keys", "ultramem_v2": "model.memory_v2.num_keys"}
FOLD = 4.0  # the comparison's factor: 4× values per token vs 4× sparse parameters


def _negate(e: Estimate) -> Estimate:
    return Estimate(-e.value, -e.hi, -e.lo, e.se, e.usable, e.resamples)


def scale_estimate(e: Estimate, f: float) -> Estimate:
    """f·e with its interval (ends swapped for f < 0)."""
    lo, hi = sorted((e.lo * f, e.hi * f))
    return Estimate(e.value * f, lo, hi, e.se * abs(f), e.usable, e.resamples)


@dataclass
class DensityLaw:
    """One memory family's runs at one total parameter count (and backbone) across values read per token v.

    `fit`: L = c0 − k·ln v (analysis.fit.LogLinear) from >= 3 densities, else None with `reason`. `slope` is
    dL/d ln v = −k (negative: reading more values per token lowers the loss)."""

    family: str
    total_params: float  # the group's total parameters, rounded to 3 significant figures
    backbone: str
    n_runs: int
    densities: list[float]
    fit: LawFit | None = None
    reason: str = ""
    run_ids: list[str] = field(default_factory=list)

    @property
    def slope(self) -> Estimate | None:
        return None if self.fit is None else _negate(self.fit.estimates["k"])


def _total_group(total: pd.Series) -> pd.Series:
    return total.map(lambda t: float(f"{t:.3g}"))


def density_laws(runs: pd.DataFrame, y: str = "val_loss", *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> list[DensityLaw]:
    """Loss vs values read per token at fixed total parameters: one group per family, total parameters (3
    significant figures) and backbone that holds >= 2 densities; a law from >= 3 densities (a bootstrap over runs).
    Groups with one density are not on this axis and are left out."""
    df = usable(runs, DENSITY_X, y)
    df = df[np.isfinite(pd.to_numeric(df["total_params"], errors="coerce"))]
    out = []
    if df.empty:
        return out
    keys = pd.DataFrame({"family": df["family"], "total": _total_group(df["total_params"].astype(float)),
                         "backbone": df["backbone"].fillna("?") if "backbone" in df else "?"}, index=df.index)
    order = {f: i for i, f in enumerate(families(df))}
    groups = sorted(keys.drop_duplicates().itertuples(index=False), key=lambda k: (order[k[0]], k[1], k[2]))
    for fam, total, backbone in groups:
        g = df[(keys["family"] == fam) & (keys["total"] == total) & (keys["backbone"] == backbone)]
        densities = sorted(g[DENSITY_X].astype(float).unique())
        if len(densities) < 2:
            continue
        law = DensityLaw(str(fam), float(total), str(backbone), len(g), densities, run_ids=list(g["run_id"]))
        out.append(law)
        if len(densities) < MIN_POINTS_PURE:
            law.reason = f"not identified: needs >= {MIN_POINTS_PURE} densities (has {len(densities)})"
            continue
        law.fit = fit_log_linear_ci(g[DENSITY_X], g[y], groups=seed_clusters(g, DENSITY_X), n_boot=n_boot, seed=seed, level=level,
                                    x_name=DENSITY_X, y_name=y, source=f"{fam} N_total {total:.3g}")
    return out


def _sparse_laws(runs: pd.DataFrame, family: str, y: str, **kw) -> list[tuple[str, float, LawFit, int]]:
    """(backbone, values per token, L = c0 − k·ln P_sparse, runs) for each group of one family at fixed backbone and
    values per token with >= 3 sparse-parameter sizes."""
    df = usable(usable(runs[runs["family"] == family], DENSITY_X, y), "sparse_params", y)
    out = []
    for (backbone, v), g in df.groupby([df["backbone"].fillna("?"), df[DENSITY_X].astype(float)], sort=True):
        if g["sparse_params"].nunique() >= MIN_POINTS_PURE:
            fit = fit_log_linear_ci(g["sparse_params"], g[y], groups=seed_clusters(g, "sparse_params"), x_name="sparse_params", y_name=y,
                                    source=f"{family} {backbone} v {v:g}", **kw)
            out.append((str(backbone), float(v), fit, len(g)))
    return out


DENSITY_COMPARISON_COLUMNS = ["family", "backbone", "loss change, 4× density", "loss change, 4× sparse params",
                              "difference", "verdict"]


def density_vs_sparse(runs: pd.DataFrame, laws: list[DensityLaw], y: str = "val_loss", *, n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per family with a density axis: the loss change from 4× values per token (at fixed total parameters) next to
    the loss change from 4× sparse parameters (at fixed values per token, same backbone), both from log-linear laws
    (Δ = slope · ln 4), and their difference with a CI from the two independent bootstraps (draw i with draw i).
    Where the runs hold only one of the two axes, the verdict says which runs would answer it."""
    rows = []
    for fam in dict.fromkeys(law.family for law in laws):
        fitted = [law for law in laws if law.family == fam and law.fit is not None]
        sparse = _sparse_laws(runs, fam, y, n_boot=n_boot, seed=seed, level=level)
        dens = max(fitted, key=lambda law: law.n_runs) if fitted else None
        paired = [s for s in sparse if dens is None or s[0] == dens.backbone]
        sp = max(paired, key=lambda s: s[3]) if paired else None
        bb = dens.backbone if dens is not None else next(law.backbone for law in laws if law.family == fam)
        row = {"family": fam, "backbone": bb, "loss change, 4× density": "—", "loss change, 4× sparse params": "—",
               "difference": "—", "verdict": ""}
        rows.append(row)
        ln = math.log(FOLD)
        if dens is not None:
            row["loss change, 4× density"] = scale_estimate(dens.slope, ln).fmt(3)
        if sp is not None:
            row["loss change, 4× sparse params"] = scale_estimate(_negate(sp[2].estimates["k"]), ln).fmt(3)
        need = []
        if dens is None:
            need.append(f"{MIN_POINTS_PURE} or more values-per-token settings (top-m, heads, memory layers) of {fam} at "
                        "one total parameter count (sweeps/density_tiny.yaml)")
        if sp is None:
            at = (f" (one of {', '.join(f'{d:g}' for d in dens.densities)})" if dens is not None else "")
            key = MEMORY_SIZE_KEYS.get(fam, "the memory size")
            need.append(f"{MIN_POINTS_PURE} or more memory sizes ({key}; 4× the values = 2× the keys) of {fam} on "
                        f"backbone {bb} at one fixed values per token{at}, on the same data and budget")
        if need:
            row["verdict"] = "not answered by these runs: needs " + " and ".join(need)
            continue
        d_draws = np.array([-b.k * ln for b in dens.fit.boot])
        s_draws = np.array([-b.k * ln for b in sp[2].boot])
        k = min(len(d_draws), len(s_draws))
        e = estimate(dens.slope.value * ln - (-sp[2].law.k * ln), d_draws[:k] - s_draws[:k] if k else None, level,
                     resamples=min(dens.fit.resamples, sp[2].resamples))
        row["difference"] = e.fmt(3)
        row["verdict"] = ("not testable (" + (e.unreliable or "no interval") + ")" if not (e.has_ci and e.reliable)
                          else "4× density lowers the loss more (as UltraMemV2 reports; interval below 0)" if e.hi < 0
                          else "4× sparse parameters lower the loss more (contradicts UltraMemV2; interval above 0)"
                          if e.lo > 0
                          else "no detectable difference (interval contains 0)")
        span = dens.densities[-1] / dens.densities[0]
        if span < FOLD:
            row["verdict"] += f"; the densities span only {span:.2g}×, so 4× extrapolates the law"
    return pd.DataFrame(rows, columns=DENSITY_COMPARISON_COLUMNS)
