"""Single-variable laws: L(x) = E + A·x^(−α) with a floor, pure power laws y = k·x^a, log-linear y = c0 − k·ln x.

The floor law is fitted in log space as log L̂ = LSE(a − α·log x, e) (analysis/lse.py) from Porian et al.'s grid of
starts α ∈ {0, .1, .2, .3}, e ∈ {−1, −.5, …, 1}, a ∈ {0, 5, …, 25}, with one of three solvers:

- "porian": Porian's `fit_loss_with_saturation` verbatim, the code behind their published fits: TRF least squares
  on the log residuals (ftol = xtol = 1e-6, at most 100 evaluations) from each start, dropping starts that do not
  converge, keeping the endpoint with the lowest Σ Huber_δ(log residual), δ = 1e-3. Reproduces all 15 published
  L*(C) fits to 4 significant figures; 120 scipy calls, so seconds per fit.
- "lsq" (default): the same least-squares problem solved to convergence from all starts at once by a batched
  Levenberg–Marquardt (analysis/lse.py), keeping the lowest cost. Milliseconds per fit, which is what makes
  bootstraps cheap. It matches "porian" wherever the law is identified (14 of Porian's 15 configs to 4 significant
  figures); where it is not (kaplan_tuned_hparams, whose E trades off against A and α over a narrow compute range)
  TRF's early stop selected by Huber and the true least-squares minimum differ in E (0.361 vs 0.355).
- "huber": minimise Σ Huber_δ directly (the Hoffmann/Epoch objective used for Chinchilla) by the batched,
  iteratively reweighted LM from the least-squares optimum and the grid's best starts: close to least absolute
  deviations, robust to an outlying run.

Pure power laws (no floor; right for N*(C), D*(C), wrong for loss when E > 0) are fitted by log-log OLS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from analysis import lse
from analysis.bootstrap import LawFit, bootstrap_fit
from analysis.checks import FitError, positive_array, require_points

PORIAN_A = tuple(np.arange(0, 30, 5.0))
PORIAN_E = tuple(np.arange(-1, 1.5, 0.5))
PORIAN_ALPHA = tuple(np.arange(0, 0.4, 0.1))
SOLVERS = ("lsq", "porian", "huber")
MIN_POINTS_FLOOR = 4  # three parameters need at least one residual degree of freedom
MIN_POINTS_PURE = 3
HUBER_REFINE_TOP = 8  # grid starts refined on the Huber objective, besides the least-squares optimum


def _g(v: float) -> str:
    return f"{v:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


@dataclass(frozen=True)
class PowerLaw:
    """L(x) = E + A·x^(−α); E = 0 is a pure power law."""

    E: float
    A: float
    alpha: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha

    def inverse(self, y: np.ndarray | float) -> np.ndarray:
        """x at which the law reaches y; nan where y is at or below the floor E."""
        gap = np.asarray(y, dtype=float) - self.E
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap > 0, (self.A / np.where(gap > 0, gap, 1.0)) ** (1.0 / self.alpha), np.nan)

    def params(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha}

    def formula(self, x: str = "x", y: str = "L") -> str:
        floor = f"{self.E:.3f} + " if self.E else ""
        return f"{y} = {floor}{_g(self.A)}·{x}^−{self.alpha:.3f}"

    @classmethod
    def from_theta(cls, theta: np.ndarray) -> PowerLaw:
        a, e, alpha = theta
        return cls(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha))

    def theta(self) -> np.ndarray:
        """(a, e, α); a floor that underflowed to 0 (e → −∞ in the fit) maps back to a very negative e."""
        log = lambda v: math.log(v) if v > 0 else -700.0
        return np.array([log(self.A), log(self.E), self.alpha])


@dataclass(frozen=True)
class PurePowerLaw:
    """y = k·x^a (N*(C), D*(C) on the compute-optimal frontier)."""

    k: float
    a: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.k * np.asarray(x, dtype=float) ** self.a

    def params(self) -> dict[str, float]:
        return {"k": self.k, "a": self.a}

    def formula(self, x: str = "C", y: str = "N*") -> str:
        return f"{y} = {_g(self.k)}·{x}^{self.a:.3f}"


@dataclass(frozen=True)
class LogLinear:
    """y = c0 − k·ln x: "loss decreases linearly as sparse parameters increase exponentially" (UltraMem §4.3)."""

    c0: float
    k: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.c0 - self.k * np.log(np.asarray(x, dtype=float))

    def params(self) -> dict[str, float]:
        return {"c0": self.c0, "k": self.k}

    def formula(self, x: str = "M", y: str = "L") -> str:
        return f"{y} = {self.c0:.3f} − {self.k:.4f}·ln {x}"


# ---- point fits ------------------------------------------------------------------------------------------------


def _xy(x: object, y: object, x_name: str, y_name: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = positive_array(x, x_name, source), positive_array(y, y_name, source)
    if xa.shape != ya.shape:
        raise FitError(f"{source}: {x_name!r} and {y_name!r} have different lengths ({xa.size} vs {ya.size})")
    return xa, ya


def _wls(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares of v on u for each row of weights w [B, n] -> (intercept [B], slope [B])."""
    sw = w.sum(axis=1)
    um, vm = (w @ u) / sw, (w @ v) / sw
    du, dv = u[None] - um[:, None], v[None] - vm[:, None]
    sxx = np.sum(w * du * du, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 0, np.sum(w * du * dv, axis=1) / sxx, np.nan)
    return vm - slope * um, slope


def fit_pure_power_law(x: object, y: object, weights: object = None, *, x_name: str = "x", y_name: str = "y",
                       source: str = "<table>") -> PurePowerLaw:
    """y = k·x^a by OLS of ln y on ln x (weights 1/σ² optional, as in Porian's weighted fits)."""
    xa, ya = _xy(x, y, x_name, y_name, source)
    require_points(len(np.unique(xa)), MIN_POINTS_PURE, f"a power law {y_name} = k·{x_name}^a", source,
                   n_rows=xa.size, fix=f"add runs at other {x_name} values")
    w = np.ones((1, xa.size)) if weights is None else np.asarray(weights, dtype=float).reshape(1, -1)
    intercept, slope = _wls(np.log(xa), np.log(ya), w)
    return PurePowerLaw(k=math.exp(intercept[0]), a=float(slope[0]))


def _residual_trf(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray) -> np.ndarray:
    return lse.predict_log(theta, logx) - logy


def _jac_trf(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray) -> np.ndarray:
    z = lse.terms(theta, logx)
    w = np.exp(z - lse.logsumexp(z, axis=0))  # softmax weights = ∂LSE/∂z   [2, n]
    return np.stack([w[0], w[1], -w[0] * logx[0]], axis=1)  # ∂/∂(a, e, α)   [n, 3]


def _porian(starts: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float) -> np.ndarray | None:
    """Porian's loop: capped TRF from each start, non-converged starts dropped, lowest Σ Huber kept."""
    found = []
    for s in starts:
        res = least_squares(_residual_trf, s, jac=_jac_trf, args=(logx, logy), method="trf",
                            ftol=1e-6, xtol=1e-6, max_nfev=100)
        if res.status > 0 and np.all(np.isfinite(res.x)):
            found.append(res.x)
    if not found:
        return None
    return found[int(np.argmin(lse.huber_objective_batch(np.array(found), logx, logy, delta)))]


def fit_power_law(x: object, y: object, *, floor: bool = True, solver: str = "lsq", delta: float = 1e-3,
                  x_name: str = "x", y_name: str = "loss", source: str = "<table>") -> PowerLaw:
    """L(x) = E + A·x^(−α) (floor=True) or A·x^(−α) by log-log OLS (floor=False).

    Raises NotEnoughPointsError below 4 distinct x (3 without a floor).
    """
    xa, ya = _xy(x, y, x_name, y_name, source)
    if not floor:
        law = fit_pure_power_law(xa, ya, x_name=x_name, y_name=y_name, source=source)
        return PowerLaw(E=0.0, A=law.k, alpha=-law.a)
    if solver not in SOLVERS:
        raise FitError(f"solver {solver!r} unknown; allowed: {', '.join(SOLVERS)}")
    require_points(len(np.unique(xa)), MIN_POINTS_FLOOR, f"{y_name} = E + A·{x_name}^−α", source, n_rows=xa.size,
                   fix=f"add runs at other {x_name} values, or fit a pure power law (no floor: `--no-floor`), "
                       f"which needs {MIN_POINTS_PURE}")
    logx, logy = np.log(xa)[None, :], np.log(ya)
    starts = lse.start_grid(1, PORIAN_A, PORIAN_E, PORIAN_ALPHA)
    if solver == "porian":
        theta = _porian(starts, logx, logy, delta)
    else:
        best = lse.best_solution(*lse.fit_batch(starts, logx, logy))
        if solver == "huber" and best is not None:
            # the least-squares optimum joins the grid's best starts on the non-smooth Huber objective
            best = lse.refine_huber(starts, logx, logy, delta, HUBER_REFINE_TOP, extra=best[0][None])
        theta = None if best is None else best[0]
    if theta is None:
        raise FitError(f"{source}: no start of the grid converged for {y_name} = E + A·{x_name}^−α")
    return PowerLaw.from_theta(theta)


def fit_log_linear(x: object, y: object, *, x_name: str = "x", y_name: str = "loss",
                   source: str = "<table>") -> LogLinear:
    """y = c0 − k·ln x by OLS (linear in ln x, so y itself is not log-transformed)."""
    xa = positive_array(x, x_name, source)
    ya = np.asarray(y, dtype=float).reshape(-1)
    if not np.all(np.isfinite(ya)):
        raise FitError(f"{source}: column {y_name!r} has non-finite values; drop those rows")
    require_points(len(np.unique(xa)), MIN_POINTS_PURE, f"{y_name} = c0 − k·ln {x_name}", source, n_rows=xa.size,
                   fix=f"add runs at other {x_name} values")
    intercept, slope = _wls(np.log(xa), ya, np.ones((1, xa.size)))
    return LogLinear(c0=float(intercept[0]), k=-float(slope[0]))


def power_law_objective(law: PowerLaw, x: np.ndarray, y: np.ndarray, delta: float = 1e-3) -> float:
    """Σ Huber_δ of the log residuals."""
    return float(lse.huber(np.log(law(x)) - np.log(y), delta).sum())


# ---- with bootstrap CIs ----------------------------------------------------------------------------------------


def _enough(xa: np.ndarray, counts: np.ndarray, need: int) -> np.ndarray:
    """Which resamples hold at least `need` distinct x (others cannot identify the law).

    A resample only needs as many distinct x as the law has parameters: an exactly determined refit is a valid
    (if extreme) draw. Demanding a spare degree of freedom, as the point fit does, would keep only the resamples
    that contain nearly every run, which with 3-5 sizes collapses the interval onto the point estimate.
    """
    _, inverse = np.unique(xa, return_inverse=True)
    present = np.zeros((len(counts), inverse.max() + 1))
    np.add.at(present.T, inverse, (counts > 0).T)
    return (present > 0).sum(axis=1) >= need


def _refit_power(xa: np.ndarray, ya: np.ndarray, law: PowerLaw, counts: np.ndarray, floor: bool, solver: str,
                 delta: float) -> list[PowerLaw | None]:
    """Every resample at once, from the point estimate ("porian" resamples are solved to convergence by LM)."""
    ok = _enough(xa, counts, 3 if floor else 2)
    if not floor:
        intercept, slope = _wls(np.log(xa), np.log(ya), counts)
        laws = [PowerLaw(0.0, math.exp(i), -s) for i, s in zip(intercept, slope, strict=True)]
    else:
        starts = np.repeat(law.theta()[None], len(counts), axis=0)
        thetas, cost = lse.fit_batch(starts, np.log(xa)[None], np.log(ya), counts,
                                     delta=delta if solver == "huber" else None)
        ok &= np.isfinite(cost) & np.all(np.isfinite(thetas), axis=1)
        laws = [PowerLaw.from_theta(t) for t in thetas]
    return [b if good else None for b, good in zip(laws, ok, strict=True)]


def fit_power_law_ci(x: object, y: object, *, groups: Sequence | np.ndarray | None = None, floor: bool = True,
                     n_boot: int = 1000, seed: int = 0, level: float = 0.95, solver: str = "lsq",
                     delta: float = 1e-3, targets: Sequence[float] = (), x_name: str = "x", y_name: str = "loss",
                     source: str = "<table>") -> LawFit:
    """Point fit plus bootstrap over runs (`groups` labels rows of one run): CIs for E, A, α and L(target)."""
    xa, ya = _xy(x, y, x_name, y_name, source)
    law = fit_power_law(xa, ya, floor=floor, solver=solver, delta=delta, x_name=x_name, y_name=y_name,
                        source=source)
    quantities = {name: (lambda p, name=name: p.params()[name]) for name in ("E", "A", "alpha")}
    for t in targets:
        quantities[f"L({x_name}={t:.3g})"] = lambda p, t=t: float(p(t))
    fit = bootstrap_fit(lambda counts: _refit_power(xa, ya, law, counts, floor, solver, delta), law, len(xa),
                        groups=None if groups is None else np.asarray(groups), n_boot=n_boot, seed=seed,
                        quantities=quantities, level=level, objective=power_law_objective(law, xa, ya, delta),
                        note="" if floor else "pure power law (E = 0) by log-log OLS")
    fit.x_range = (float(xa.min()), float(xa.max()))
    return fit


def fit_log_linear_ci(x: object, y: object, *, groups: Sequence | np.ndarray | None = None, n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95, x_name: str = "x", y_name: str = "loss",
                      source: str = "<table>") -> LawFit:
    """y = c0 − k·ln x with bootstrap CIs for c0 and k (k > 0: loss falls as x grows)."""
    xa = positive_array(x, x_name, source)
    ya = np.asarray(y, dtype=float).reshape(-1)
    law = fit_log_linear(xa, ya, x_name=x_name, y_name=y_name, source=source)

    def refit(counts: np.ndarray) -> list[LogLinear | None]:
        ok = _enough(xa, counts, 2)
        intercept, slope = _wls(np.log(xa), ya, counts)
        return [LogLinear(float(i), -float(s)) if good else None for i, s, good in zip(intercept, slope, ok, strict=True)]

    fit = bootstrap_fit(refit, law, len(xa), groups=None if groups is None else np.asarray(groups),
                        n_boot=n_boot, seed=seed, quantities={"c0": lambda p: p.c0, "k": lambda p: p.k},
                        level=level, objective=float(np.sum((ya - law(xa)) ** 2)))
    fit.x_range = (float(xa.min()), float(xa.max()))
    return fit
