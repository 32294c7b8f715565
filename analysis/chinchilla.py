"""The Chinchilla law L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, Approach 3) and its compute-optimal frontier.

Two estimators, both in the LSE parameterisation of analysis/lse.py with θ = (a, b, e, α, β):

- "huber" (Hoffmann §3.3 / App. D.2, Epoch's "replicate exactly" cell 18): Σ Huber_δ(LSE_i − log L_i), δ = 1e-3,
  L-BFGS from the grid α, β ∈ {0, .5, …, 2}, e ∈ {−1, −.5, …, 1}, a, b ∈ {0, 5, …, 25} (4,500 starts). The grid is
  ranked in one vectorised pass and L-BFGS (analytic gradient) runs from the best `refine_top` starts; refine_top=0
  runs all 4,500 as Hoffmann did. On Epoch's 240 points: E=1.8172, A=477.8, B=2143.4, α=0.3473, β=0.3672.
- "mle" (Epoch's headline estimate, cell 24): maximum likelihood under a Huber density with free scale σ, BFGS
  from `x0` (Hoffmann's unrounded values in Epoch's notebook; the "huber" solution by default here). On Epoch's data:
  E=1.81686, A=482.01, B=2085.43, α=0.34781, β=0.36585.

With C ≈ 6ND, the frontier is closed-form (Epoch cell 63): G = (αA/(βB))^(1/(α+β)), a = β/(α+β), b = α/(α+β),
N_opt = G·(C/6)^a, D_opt = (C/6)^b / G.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import lse
from analysis.bootstrap import LawFit, bootstrap_fit
from analysis.checks import FitError, numeric_column, positive_array, require_columns, require_points

HOFFMANN_A = tuple(np.arange(0, 30, 5.0))  # a = log A and b = log B
HOFFMANN_E = tuple(np.arange(-1, 1.5, 0.5))
HOFFMANN_ALPHA = tuple(np.arange(0, 2.5, 0.5))  # α and β
ESTIMATORS = ("huber", "mle")
OPTIMIZERS = ("lm", "lbfgs")
MIN_POINTS = 6  # five parameters and one residual degree of freedom


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A/N^α + B/D^β."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A * n**-self.alpha + self.B * d**-self.beta

    def params(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta}

    @property
    def a(self) -> float:
        """N_opt ∝ C^a, a = β/(α+β)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b, b = α/(α+β)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def compute_optimal(self, c: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N_opt, D_opt, L_opt) at training compute C ≈ 6ND."""
        x = np.asarray(c, dtype=float) / 6
        n_opt, d_opt = self.G * x**self.a, x**self.b / self.G
        return n_opt, d_opt, self(n_opt, d_opt)

    def compute_for_loss(self, loss: np.ndarray | float) -> np.ndarray:
        """Smallest C reaching `loss` on the frontier (Epoch's optimal_compute_from_reducible_loss); nan at or below E."""
        gap = np.asarray(loss, dtype=float) - self.E
        k = self.A * self.G**-self.alpha + self.B * self.G**self.beta
        ex = -(self.alpha + self.beta) / (self.alpha * self.beta)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gap > 0, 6 * (np.where(gap > 0, gap, 1.0) / k) ** ex, np.nan)

    def formula(self) -> str:
        return (f"L = {self.E:.3f} + {self.A:.4g}/N^{self.alpha:.3f} + {self.B:.4g}/D^{self.beta:.3f}")

    def theta(self) -> np.ndarray:
        """(a, b, e, α, β); a coefficient that underflowed to 0 in the fit maps back to a very negative log."""
        log = lambda v: math.log(v) if v > 0 else -700.0
        return np.array([log(self.A), log(self.B), log(self.E), self.alpha, self.beta])

    @classmethod
    def from_theta(cls, theta: np.ndarray) -> ChinchillaLaw:
        """From (a, b, e, α, β); a log beyond float range gives an infinite coefficient (see `finite`)."""
        a, b, e, alpha, beta = (float(v) for v in theta[:5])
        exp = lambda v: math.exp(v) if v < 709.7 else math.inf
        return cls(E=exp(e), A=exp(a), B=exp(b), alpha=alpha, beta=beta)

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.params().values())


# Hoffmann et al. (2022), unrounded values from the TeX source (the rounded paper-body values are biased).
HOFFMANN_2022 = ChinchillaLaw(E=1.69337368, A=406.401018, B=410.722827, alpha=0.33917084, beta=0.2849083)
# Epoch AI's refit of the same data (Besiroglu et al. 2024, Huber-likelihood MLE).
EPOCH_2024 = ChinchillaLaw(E=1.81686, A=482.0057, B=2085.4342, alpha=0.34781, beta=0.36585)


@dataclass(frozen=True)
class ChinchillaFit:
    law: ChinchillaLaw
    objective: float  # Σ Huber ("huber") or the negative log-likelihood ("mle")
    estimator: str
    n_points: int
    log_sigma: float = math.nan  # "mle" only: log of the Huber density's scale


def _arrays(n: object, d: object, loss: object, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    na, da, la = (positive_array(v, name, source) for v, name in ((n, "N"), (d, "D"), (loss, "loss")))
    if not (na.size == da.size == la.size):
        raise FitError(f"{source}: N, D and loss have different lengths ({na.size}, {da.size}, {la.size})")
    require_points(len({*zip(na.tolist(), da.tolist(), strict=True)}), MIN_POINTS, "L(N, D) = E + A/N^α + B/D^β "
                   "(distinct (N, D) pairs)", source, n_rows=la.size,
                   fix=f"add runs at other (N, D) pairs: five parameters need {MIN_POINTS} or more")
    return na, da, la


def fit_chinchilla(n: object, d: object, loss: object, *, estimator: str = "huber", optimizer: str = "lm",
                   delta: float = 1e-3, refine_top: int = 32, x0: ChinchillaLaw | None = None,
                   source: str = "<table>") -> ChinchillaFit:
    """Fit L(N, D) by the Hoffmann grid ("huber") or Epoch's Huber-likelihood MLE ("mle", BFGS from x0).

    optimizer ("huber"): "lm" (default) refines the best `refine_top` grid starts all at once with the batched
    Levenberg–Marquardt of analysis/lse.py (iteratively reweighted for Huber), which reaches a slightly lower
    objective than L-BFGS on this near-L1 problem and never stalls at a kink; "lbfgs" is Hoffmann's L-BFGS with
    the analytic gradient, one start at a time (refine_top=0: all 4,500 starts, Hoffmann's procedure verbatim).
    """
    if estimator not in ESTIMATORS:
        raise FitError(f"estimator {estimator!r} unknown; allowed: {', '.join(ESTIMATORS)}")
    if optimizer not in OPTIMIZERS:
        raise FitError(f"optimizer {optimizer!r} unknown; allowed: {', '.join(OPTIMIZERS)}")
    na, da, la = _arrays(n, d, loss, source)
    logx, logy = np.log(np.vstack([na, da])), np.log(la)
    if estimator == "mle":
        start = x0 if x0 is not None else fit_chinchilla(na, da, la, optimizer=optimizer, delta=delta,
                                                         refine_top=refine_top, source=source).law
        phi, nll = lse.fit_huber_mle(logx, logy, start.theta(), delta)
        return ChinchillaFit(_finite_law(phi[:5], source), nll, "mle", la.size, float(phi[5]))
    starts = lse.start_grid(2, HOFFMANN_A, HOFFMANN_E, HOFFMANN_ALPHA) if x0 is None else x0.theta()[None]
    if optimizer == "lbfgs":
        best = lse.fit_huber(logx, logy, starts, delta, refine_top)
    else:
        best = lse.refine_huber(starts, logx, logy, delta, refine_top)
    if best is None or not (np.all(np.isfinite(best[0])) and np.isfinite(best[1])):
        raise FitError(f"{source}: no start reached a finite optimum for L(N, D)")
    theta, f = best
    return ChinchillaFit(_finite_law(theta, source), f, "huber", la.size)


def _finite_law(theta: np.ndarray, source: str) -> ChinchillaLaw:
    law = ChinchillaLaw.from_theta(theta)
    if not law.finite:
        raise FitError(f"{source}: these points do not identify L(N, D) = E + A/N^α + B/D^β (the best fit sends "
                       f"{'A' if math.isinf(law.A) else 'B' if math.isinf(law.B) else 'E'} to infinity); add runs "
                       "over a wider range of N and D, or fit one variable with --law power")
    return law


def chinchilla_columns(df: pd.DataFrame, *, n_col: str, d_col: str | None, flops_col: str | None, loss_col: str,
                       source: str = "<table>") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, L) from a table; D = C/(6N) when a FLOPs column is given instead of a token column (Epoch's data)."""
    if d_col is None and flops_col is None:
        raise FitError(f"{source}: L(N, D) needs a token column or a FLOPs column to derive D = C/(6N); "
                       f"pass --d-col or --flops-col (available: {', '.join(map(str, df.columns))})")
    require_columns(df, [n_col, d_col or flops_col, loss_col], source)
    n = numeric_column(df, n_col, source)
    if d_col is not None:
        return n, numeric_column(df, d_col, source), numeric_column(df, loss_col, source)
    c = numeric_column(df, flops_col, source)
    return n, c / (6 * n), numeric_column(df, loss_col, source)


def fit_chinchilla_ci(n: object, d: object, loss: object, *, groups: Sequence | np.ndarray | None = None,
                      n_boot: int = 200, seed: int = 0, level: float = 0.95, estimator: str = "huber",
                      delta: float = 1e-3, refine_top: int = 32, budgets: Sequence[float] = (),
                      targets: Sequence[tuple[float, float]] = (), source: str = "<table>",
                      extra: dict[str, Callable[[ChinchillaLaw], float]] | None = None,
                      multistart: bool = True) -> LawFit:
    """Point fit plus a bootstrap over runs, with CIs for the parameters and the identified quantities.

    Raw A and B are poorly identified (on Epoch's data SE(B) ≈ 1,300 on 2,085); the compute-optimal share
    a = β/(α+β), N_opt(C) and D_opt(C) at each budget, and L at each target (N, D) are much better determined.
    Every resample is refitted at once on Σ Huber (batched LM) from the starts of `bootstrap_starts` and keeps its
    best (multistart=False: from the point estimate alone, as Epoch's bootstrap does, which cannot leave the point
    estimate's basin; see below); with estimator "mle" the resamples still refit the plain summed-Huber objective,
    as in Epoch's notebook.
    """
    na, da, la = _arrays(n, d, loss, source)
    fit = fit_chinchilla(na, da, la, estimator=estimator, delta=delta, refine_top=refine_top, source=source)
    quantities = {name: (lambda p, name=name: p.params()[name]) for name in ("E", "A", "B", "alpha", "beta")}
    quantities["a"] = lambda p: p.a
    for c in budgets:
        quantities[f"N_opt(C={c:.3g})"] = lambda p, c=c: float(p.compute_optimal(c)[0])
        quantities[f"D_opt(C={c:.3g})"] = lambda p, c=c: float(p.compute_optimal(c)[1])
    for tn, td in targets:
        quantities[f"L(N={tn:.3g}, D={td:.3g})"] = lambda p, tn=tn, td=td: float(p(tn, td))
    quantities.update(extra or {})

    logx, logy = np.log(np.vstack([na, da])), np.log(la)
    starts = bootstrap_starts(fit.law, logx, logy, delta) if multistart else fit.law.theta()[None]

    def refit(counts: np.ndarray) -> list[ChinchillaLaw | None]:
        thetas, objs = refit_resamples(starts, logx, logy, counts, delta)
        ok = np.isfinite(objs) & np.all(np.isfinite(thetas), axis=1) & _enough_pairs(na, da, counts)
        laws = [ChinchillaLaw.from_theta(t) if good else None for t, good in zip(thetas, ok, strict=True)]
        return [b if b is not None and b.finite else None for b in laws]

    how = (f"from {len(starts)} starts (the point estimate, its floor moved to {', '.join(map(str, FLOOR_STARTS))} "
           f"of the lowest loss, the {BOOT_GRID_TOP} best grid starts)" if multistart else "from the point estimate")
    return bootstrap_fit(refit, fit.law, la.size, groups=None if groups is None else np.asarray(groups),
                         n_boot=n_boot, seed=seed, quantities=quantities, level=level, objective=fit.objective,
                         note=f"estimator {estimator}; resamples refitted on Σ Huber {how}")


# ---- bootstrap refits from several starts ----------------------------------------------------------------------
#
# A resample refitted only from the point estimate stays in its basin. Where the point fit sends E to ~0 (log E
# around -40) the objective's gradient in log E is ~1e-19, so no resample can leave E = 0 even when its own best fit
# has a floor well above it: the interval then describes one basin, not the law. Each resample is therefore
# refitted from the point estimate, from the point estimate with its floor moved up (to fractions of the lowest
# loss), and from the best few Hoffmann grid starts, and keeps the lowest objective.

_MAX_LOG = 709.7  # exp overflows float64 beyond this (ChinchillaLaw.from_theta)
FLOOR_STARTS = (0.25, 0.5, 0.75, 0.9)  # floors E tried as starts, as fractions of the lowest observed loss
BOOT_GRID_TOP = 4  # the best-ranked Hoffmann grid starts (on all rows) tried as starts


def bootstrap_starts(law: ChinchillaLaw, logx: np.ndarray, logy: np.ndarray, delta: float) -> np.ndarray:
    """The starts every resample is refitted from: the point estimate first, then the point estimate with E at
    FLOOR_STARTS of the lowest loss, then the BOOT_GRID_TOP best grid starts.   -> [S, 5]"""
    point = law.theta()
    floors = np.repeat(point[None], len(FLOOR_STARTS), axis=0)
    floors[:, 2] = np.log(np.asarray(FLOOR_STARTS) * math.exp(float(logy.min())))
    grid = lse.rank_starts(lse.start_grid(2, HOFFMANN_A, HOFFMANN_E, HOFFMANN_ALPHA), logx, logy, delta,
                           BOOT_GRID_TOP)
    return np.vstack([point[None], floors, grid])


def refit_resamples(starts: np.ndarray, logx: np.ndarray, logy: np.ndarray, counts: np.ndarray,
                    delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Refit every resample (a row of `counts` [B, n]) from every start [S, P] at once and keep, per resample, the
    solution with the lowest finite Σ Huber whose coefficients are finite (the first start wins ties); nan where no
    start gives one.   -> thetas [B, P], objectives [B]"""
    b, s = len(counts), len(starts)
    thetas, objs = lse.fit_batch(np.tile(starts, (b, 1)), logx, logy, np.repeat(counts, s, axis=0), delta=delta)
    thetas, objs = thetas.reshape(b, s, -1), objs.reshape(b, s)
    # a solution whose log-coefficient (a, b or e) overflows exp is a law with an infinite term: not a refit
    usable = np.isfinite(objs) & np.all(np.isfinite(thetas), axis=2) & np.all(thetas[:, :, :3] < _MAX_LOG, axis=2)
    objs = np.where(usable, objs, np.inf)
    best = np.argmin(objs, axis=1)
    rows = np.arange(b)
    return thetas[rows, best], np.where(np.isfinite(objs[rows, best]), objs[rows, best], np.nan)


# ---- the profile over E ---------------------------------------------------------------------------------------
#
# With E fitted at ~0, β is the local slope of L in D, not an exponent towards a floor: the exponents trade
# against E. The profile refits the law with E held at a ladder of values (fractions of the lowest loss) and shows
# α, β and the objective at each. Which floors the data admit is read off a likelihood ratio: with δ = 1e-3 almost
# every residual lies in Huber's linear part, so Σ Huber_δ / δ ≈ Σ|r| and the model is a Laplace likelihood in
# the log loss, whose profile NLL is n_eff·ln Σ|r| + const. The points are not independent (cooldown branches
# share their trunk's data order), so n_eff is the number of independent units (trunks) the caller passes, not the
# number of rows; a floor is admitted where 2·n_eff·ln(S(E)/S_min) <= χ²₁(level).

PROFILE_FLOORS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def profile_over_e(n: object, d: object, loss: object, *, n_units: int, level: float = 0.95, delta: float = 1e-3,
                   floors: Sequence[float] = PROFILE_FLOORS, source: str = "<table>") -> pd.DataFrame:
    """Refit L(N, D) with E fixed at each of `floors` x the lowest loss (0: no floor), from the Hoffmann grid's
    best starts with e pinned. Columns: floor (fraction), E, objective (Σ Huber), ratio (to the best row),
    abs_resid (Σ|r| of the log loss), lr (2·n_units·ln of its ratio to the smallest), admitted (lr <= χ²₁(level)),
    alpha, beta, a (= β/(α+β)), b."""
    from scipy.stats import chi2

    na, da, la = _arrays(n, d, loss, source)
    logx, logy = np.log(np.vstack([na, da])), np.log(la)
    grid = lse.rank_starts(lse.start_grid(2, HOFFMANN_A, HOFFMANN_E, HOFFMANN_ALPHA), logx, logy, delta, 16)
    rows = []
    for f in floors:
        e = math.log(f * float(la.min())) if f > 0 else -700.0
        starts = grid.copy()
        starts[:, 2] = e
        thetas, objs = lse.fit_batch(starts, logx, logy, delta=delta, fixed=np.array([0, 0, 1, 0, 0], dtype=bool))
        best = lse.best_solution(thetas, objs)
        if best is None:
            continue
        theta, obj = best
        law = ChinchillaLaw.from_theta(theta)
        resid = float(np.abs(lse.predict_log(theta, logx) - logy).sum())
        rows.append({"floor": f, "E": law.E, "objective": obj, "abs_resid": resid, "alpha": law.alpha,
                     "beta": law.beta, "a": law.a, "b": law.b})
    out = pd.DataFrame(rows, columns=["floor", "E", "objective", "abs_resid", "alpha", "beta", "a", "b"])
    if out.empty:
        return out.assign(ratio=[], lr=[], admitted=[])
    out["ratio"] = out["objective"] / out["objective"].min()
    out["lr"] = 2 * n_units * np.log(out["abs_resid"] / out["abs_resid"].min())
    out["admitted"] = out["lr"] <= chi2.ppf(level, 1)
    return out


def _enough_pairs(n: np.ndarray, d: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Resamples holding at least 5 distinct (N, D) pairs, one per parameter (see fit._enough)."""
    _, inverse = np.unique(np.stack([n, d], axis=1), axis=0, return_inverse=True)
    present = np.zeros((len(counts), inverse.max() + 1))
    np.add.at(present.T, inverse.ravel(), (counts > 0).T)
    return (present > 0).sum(axis=1) >= 5


# ---- the frontier under the project's FLOPs: C = F(N)·D with F from ultramem.accounting, not 6N -----------------

FRONTIER_SPAN = 8.0  # the frontier's N is searched over the fitted sizes widened by e^8 (~3,000x) on each side
FRONTIER_GRID = 801


def frontier(law: ChinchillaLaw, flops_per_token: Callable[[np.ndarray], np.ndarray], c: np.ndarray | float,
             n_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N_opt, D_opt, L_opt) at training compute C = F(N)·D: the minimum of L(N, C/F(N)) over N, searched on a
    ln N grid around `n_range` (the fitted sizes) and refined by the parabola through the grid minimum and its
    neighbours. With F(N) = 6N this is `ChinchillaLaw.compute_optimal`'s closed form; the project's F(N) (attention
    and head included) is not proportional to N, so it is found numerically. A minimum at the grid's edge gives nan.
    """
    c = np.atleast_1d(np.asarray(c, dtype=float))
    ln = np.linspace(math.log(n_range[0]) - FRONTIER_SPAN, math.log(n_range[1]) + FRONTIER_SPAN, FRONTIER_GRID)
    n = np.exp(ln)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        loss = law(n[None, :], c[:, None] / flops_per_token(n)[None, :])  # [C, grid]
    i = np.nanargmin(np.where(np.isfinite(loss), loss, np.inf), axis=1)
    inner = (i > 0) & (i < len(ln) - 1)
    j = np.clip(i, 1, len(ln) - 2)
    rows = np.arange(len(c))
    y0, y1, y2 = loss[rows, j - 1], loss[rows, j], loss[rows, j + 1]
    h = ln[1] - ln[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.where(y0 - 2 * y1 + y2 > 0, 0.5 * h * (y0 - y2) / (y0 - 2 * y1 + y2), 0.0)
    n_opt = np.where(inner, np.exp(ln[j] + shift), np.nan)
    d_opt = c / flops_per_token(n_opt)
    with np.errstate(invalid="ignore"):
        return n_opt, d_opt, law(n_opt, d_opt)


def frontier_curve(law: ChinchillaLaw, flops_per_token: Callable[[np.ndarray], np.ndarray],
                   n_range: tuple[float, float], c_range: tuple[float, float],
                   points: int = 301) -> tuple[np.ndarray, np.ndarray]:
    """(ln C, L_opt(C)) on a ln C grid over `c_range` widened by 10^3 each side, where the frontier is found."""
    lc = np.linspace(math.log(c_range[0]) - 3 * math.log(10), math.log(c_range[1]) + 3 * math.log(10), points)
    l_opt = frontier(law, flops_per_token, np.exp(lc), n_range)[2]
    ok = np.isfinite(l_opt)
    return lc[ok], l_opt[ok]


def compute_for_loss(curve: tuple[np.ndarray, np.ndarray], loss: np.ndarray | float) -> np.ndarray:
    """The compute C on a frontier (`frontier_curve`) at which L_opt(C) = loss, by interpolation in ln C; nan where
    the curve does not reach that loss (at or below E, or beyond its C range) or is not a falling curve."""
    lc, l_opt = curve
    target = np.atleast_1d(np.asarray(loss, dtype=float))
    if len(l_opt) < 2 or np.any(np.diff(l_opt) >= 0):
        return np.full(target.shape, np.nan)
    inside = (target <= l_opt[0]) & (target >= l_opt[-1])
    return np.where(inside, np.exp(np.interp(target, l_opt[::-1], lc[::-1])), np.nan)
