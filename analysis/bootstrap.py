"""Nonparametric bootstrap over runs, and the point-estimate-plus-interval record every fit reports.

Resampling is by *run*: with one row per run this is case resampling (Epoch, cell 21); when a run contributes
several rows (intermediate checkpoints) whole runs are drawn as clusters, because checkpoints of one run are
correlated and treating them as independent shrinks the intervals dishonestly (Epoch, cells 60–61).

An interval is flagged unreliable (`Estimate.unreliable` says why; printed instead of the numbers, and
`"reliable": false` in JSON) when fewer than MIN_USABLE_SHARE (half) of the resamples drawn gave a usable value:
the resamples that cannot be refitted (too few distinct points) are not a random subset, so the percentiles of the
rest describe neither the data nor the law (6 points of a 5-parameter law: ~25% usable; 4 points of a
3-parameter law: ~66%). It is flagged as well when it has zero width (relative width below ZERO_WIDTH: the usable
resamples gave one value, because the data do not identify it or are noise-free), which would otherwise look exact.
Estimates without a bootstrap carry no flag; `to_dict` adds the flag keys only to flagged estimates (or full=True).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_USABLE_SHARE = 0.5  # an interval from fewer usable resamples than this share of those drawn is unreliable
ZERO_WIDTH = 1e-9  # relative width below which an interval counts as zero width


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile interval and the bootstrap standard error (nan without a bootstrap).

    usable / resamples: the finite bootstrap values behind the interval and the resamples drawn (None without a
    bootstrap); see `unreliable`.
    """

    value: float
    lo: float = math.nan
    hi: float = math.nan
    se: float = math.nan
    usable: int | None = None
    resamples: int | None = None

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def unreliable(self) -> str:
        """Why the interval must not be trusted, e.g. "48/200 resamples usable" ("" when it can be, or without a
        bootstrap)."""
        if self.usable is None or not self.resamples:
            return ""
        if self.usable < MIN_USABLE_SHARE * self.resamples:
            return f"{self.usable}/{self.resamples} resamples usable"
        if self.has_ci and self.hi - self.lo <= ZERO_WIDTH * max(abs(self.lo), abs(self.hi)):
            return f"zero width: {self.usable}/{self.resamples} usable resamples gave one value"
        return ""

    @property
    def reliable(self) -> bool:
        return not self.unreliable

    def excludes(self, x: float) -> bool:
        return self.has_ci and self.reliable and not (self.lo <= x <= self.hi)

    def fmt(self, digits: int = 4) -> str:
        v = f"{self.value:.{digits}g}"
        if self.unreliable:
            return f"{v} [unreliable: {self.unreliable}]"
        return f"{v} [{self.lo:.{digits}g}, {self.hi:.{digits}g}]" if self.has_ci else v

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        """value, lo, hi, se; plus reliable, usable_resamples, resamples (and why, if unreliable) when the interval
        is unreliable or full=True."""
        clean = lambda x: x if math.isfinite(x) else None
        out: dict[str, Any] = {"value": clean(self.value), "lo": clean(self.lo), "hi": clean(self.hi),
                               "se": clean(self.se)}
        if full or self.unreliable:
            out.update(reliable=self.reliable, usable_resamples=self.usable, resamples=self.resamples)
            if self.unreliable:
                out["unreliable"] = self.unreliable
        return out


def estimate(value: float, draws: np.ndarray | None, level: float = 0.95, resamples: int | None = None) -> Estimate:
    """Percentile interval of the finite bootstrap draws around `value`.

    resamples: how many resamples were drawn (default: len(draws)); those without a finite draw count as unusable.
    """
    if draws is None:
        return Estimate(float(value))
    d = np.asarray(draws, dtype=float).reshape(-1)
    total = d.size if resamples is None else int(resamples)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return Estimate(float(value), usable=int(d.size), resamples=total)
    q = (1 - level) / 2
    lo, hi = np.quantile(d, [q, 1 - q])
    return Estimate(float(value), float(lo), float(hi), float(np.std(d, ddof=1)), int(d.size), total)


def resample_counts(n_rows: int, groups: np.ndarray | None, n_boot: int, seed: int,
                    strata: np.ndarray | None = None) -> np.ndarray:
    """How often each row is drawn in each resample: rows (groups=None) or whole groups with replacement. [B, n]

    A resample as a count vector lets a batched solver refit every resample at once (counts act as row weights,
    which is the same as duplicating the drawn rows).
    strata: a label per row (each group inside one stratum); groups are then drawn within each stratum, as many as
    it holds, so every stratum keeps its size (the IsoFLOP bootstrap resamples the points of each FLOP budget).
    """
    if strata is not None:
        return _stratified_counts(np.asarray(strata), np.arange(n_rows) if groups is None else np.asarray(groups),
                                  n_boot, seed)
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = rng.integers(0, n_rows, (n_boot, n_rows))
        return np.stack([np.bincount(d, minlength=n_rows) for d in draws]).astype(float)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(inverse.max()) + 1
    draws = rng.integers(0, n_groups, (n_boot, n_groups))
    group_counts = np.stack([np.bincount(d, minlength=n_groups) for d in draws])  # [B, G]
    return group_counts[:, inverse].astype(float)


def _stratified_counts(strata: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, g = np.unique(groups, return_inverse=True)
    counts = np.zeros((n_boot, len(groups)))
    for stratum in np.unique(strata):
        rows = np.flatnonzero(strata == stratum)
        members = np.unique(g[rows])  # the groups of this stratum
        draws = rng.integers(0, len(members), (n_boot, len(members)))
        per_group = np.stack([np.bincount(d, minlength=len(members)) for d in draws])  # [B, groups here]
        counts[:, rows] = per_group[:, np.searchsorted(members, g[rows])]
    return counts


def not_identified(e: Estimate | None, *, max_width: float | None = None, max_ratio: float | None = None,
                   bounds: tuple[float, float] | None = None) -> str:
    """Why `e` is not identified by the data ("" when it is): no estimate or interval, an unreliable interval, an
    interval wider than `max_width` (absolute) or spanning more than `max_ratio` (hi/lo, for positive ratios), or a
    point estimate at or beyond one of `bounds` (a fit at the edge of its parameter space). A report prints "not
    identified" with the reason instead of the number."""
    if e is None or not math.isfinite(e.value):
        return "no finite estimate"
    if bounds is not None and not bounds[0] < e.value < bounds[1]:
        return f"the fit sits at a bound ({e.value:.3g}, outside ({bounds[0]:g}, {bounds[1]:g}))"
    if not e.has_ci:
        return "no bootstrap interval"
    if e.unreliable:
        return f"unreliable interval: {e.unreliable}"
    if max_width is not None and e.hi - e.lo > max_width:
        return f"interval [{e.lo:.3g}, {e.hi:.3g}] wider than {max_width:g}"
    if max_ratio is not None and not (e.lo > 0 and e.hi / e.lo <= max_ratio):
        return f"interval [{e.lo:.3g}, {e.hi:.3g}] spans more than {max_ratio:g}x"
    return ""


def fmt_identified(e: Estimate | None, why: str, digits: int = 3) -> str:
    """`e` with its interval, or "not identified (why)" in its place."""
    return f"not identified ({why})" if why or e is None else e.fmt(digits)


@dataclass
class LawFit:
    """A fitted law, its bootstrap refits, and estimates (with CIs) of its parameters and derived quantities."""

    law: Any  # PowerLaw | ChinchillaLaw | LogLinear: callable, with .params()
    estimates: dict[str, Estimate]
    n_points: int
    n_groups: int
    boot: list[Any] = field(default_factory=list)  # refitted laws, one per successful resample
    n_failed: int = 0  # resamples that could not be fitted (e.g. too few distinct x)
    level: float = 0.95
    objective: float = math.nan
    note: str = ""
    x_range: tuple[float, float] | None = None  # single-variable laws: the fitted x span (extrapolation beyond)

    def band(self, *x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the bootstrap predictions at x (the point prediction where no bootstrap)."""
        if not self.boot:
            y = np.asarray(self.law(*x), dtype=float)
            return y, y
        with np.errstate(over="ignore", invalid="ignore"):  # runaway refits (see bootstrap_fit) predict inf / nan
            preds = np.array([np.asarray(b(*x), dtype=float) for b in self.boot])
        q = (1 - self.level) / 2
        return np.nanquantile(preds, q, axis=0), np.nanquantile(preds, 1 - q, axis=0)

    @property
    def resamples(self) -> int:
        return len(self.boot) + self.n_failed

    @property
    def reliable(self) -> bool:
        """At least MIN_USABLE_SHARE of the resamples refitted (each estimate may still be flagged on its own)."""
        return not self.resamples or len(self.boot) >= MIN_USABLE_SHARE * self.resamples

    def to_dict(self) -> dict[str, Any]:
        return {"law": type(self.law).__name__, "n_points": self.n_points, "n_groups": self.n_groups,
                "n_boot": len(self.boot), "n_failed": self.n_failed, "level": self.level,
                "objective": self.objective if math.isfinite(self.objective) else None, "note": self.note,
                "x_range": list(self.x_range) if self.x_range else None,
                "estimates": {k: e.to_dict() for k, e in self.estimates.items()}}


def bootstrap_fit(refit: Callable[[np.ndarray], list[Any]], law: Any, n_rows: int, *,
                  groups: np.ndarray | None, n_boot: int, seed: int, quantities: dict[str, Callable[[Any], float]],
                  level: float = 0.95, objective: float = math.nan, note: str = "") -> LawFit:
    """Refit on `n_boot` resamples and summarise `quantities` (parameters and derived values) of the refits.

    `refit(counts)` takes the resample count matrix [B, n_rows] and returns one law per resample, or None for a
    resample that cannot be fitted (e.g. too few distinct x); those are counted in `n_failed`, never replaced.
    The point estimate is `law`, fitted on all rows.
    """
    counts = resample_counts(n_rows, groups, n_boot, seed) if n_boot > 0 else np.zeros((0, n_rows))
    # A law that the data do not pin down has refits that run off to huge or infinite parameters; those overflow
    # harmlessly here (the estimate drops non-finite draws, and `not_identified` reports the interval), so numpy's
    # overflow warnings would only repeat what the report says.
    with np.errstate(over="ignore", invalid="ignore"):
        boot = [b for b in refit(counts) if b is not None] if len(counts) else []
        estimates = {}
        for name, fn in quantities.items():
            draws = np.array([fn(b) for b in boot], dtype=float) if len(counts) else None
            estimates[name] = estimate(fn(law), draws, level, resamples=len(counts))
    n_groups = n_rows if groups is None else len(np.unique(np.asarray(groups)))
    return LawFit(law, estimates, n_rows, n_groups, boot, len(counts) - len(boot), level, objective, note)
