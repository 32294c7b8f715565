"""Seed distributions: how far apart the seeds of one configuration land, and what changes that.

A *point* is a run configuration up to its seed (the run's sweep name without its `-s<seed>` suffix, on one data
source). For each point over its seeds: mean, standard deviation with a bootstrap interval (seeds resampled), min,
median, max, range and the seeds lying more than `OUTLIER_Z` robust standard deviations (1.4826 x MAD) above the
median. Two curve statistics from each run's held-out evaluations say *when* a run learns:

    t_half  the first step at which the val loss has covered half of its drop from the first evaluation to the last
            (linear interpolation between evaluations): a run stuck on an early plateau has a late t_half
    val@S   the val loss at evaluation step S (the early steps show the plateau)

and the memory layers' row usage of the last evaluation (`ultramem.memory.usage`: fraction of value rows read,
entropy of the reads), min over the layers, and Spearman's rho between final loss and rows used over a point's
seeds (negative: the seeds that read fewer rows end higher). Comparisons between points (`compare_points`): Welch's t-test on the
means and the Brown-Forsythe test (Levene's test about the median) on the spreads, each with its p-value: with
8 seeds a spread ratio below ~2 is not resolved, and the table says so through the p-values, not by omission.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from runfolder import atomic_write_text, iter_run_dirs, run_state

OUTLIER_Z = 3.0
N_BOOT = 2000
EARLY_STEPS = (25, 50, 100)
_SEED = re.compile(r"-s\d+(?=@|$)")  # branches are named <trunk name>@<D/N>xN
_SOURCE = re.compile(r"-source=.*?(?=-\w+=|$)")  # the data source is the `corpus` column, not part of the point
_SIZE = re.compile(r"-(t\d+|o\d+)\b")  # a size of the tiny ladder (tK) or of the one-shape ladder (oK)
_RUNG = re.compile(r"^([a-z_]+)-o(\d+)(?:-(?:\d+in\d+|x\d+))?$")  # a one-shape ladder preset: family, rung
_SETTING = re.compile(r"-(?=[A-Za-z_][\w.]*=)")  # splits 'p-a=1-lr=1e-3' into 'p', 'a=1', 'lr=1e-3'


def point_of(name: str | None, run_id: str) -> str:
    """'ultramem-t1-x6-source=embedded-s3' -> 'ultramem-t1-x6', 'dense-t1-schedule=wsd-s0@1.3xN' ->
    'dense-t1-schedule=wsd@1.3xN' (the run id when unnamed)."""
    return _SOURCE.sub("", _SEED.sub("", name)) if name else run_id


def corpus_of(source: str | None) -> str:
    if str(source).startswith("embedded"):
        return "embedded"
    return Path(str(source)).stem if source else "?"


def t_half(steps: np.ndarray, losses: np.ndarray) -> float:
    """First step (interpolated) at which the loss has made half of its drop from losses[0] to losses[-1]."""
    if len(steps) < 2 or not losses[0] > losses[-1]:
        return math.nan
    target = (losses[0] + losses[-1]) / 2
    for i in range(1, len(steps)):
        if losses[i] <= target:
            frac = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
            return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))
    return float(steps[-1])


def seed_runs(roots: list[str | Path]) -> pd.DataFrame:
    """One row per finished run below `roots`: point, family, preset, corpus, seed, val_loss, t_half, val@S for
    S in EARLY_STEPS, rows_used and row_entropy (last evaluation, min over memory layers; NaN without memory)."""
    return read_runs(roots)[0]


def read_runs(roots: list[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`seed_runs`' table and the held-out curves it was computed from (run_id, step, loss), in one pass over the
    run folders."""
    rows, curves = [], []
    for root in roots:
        for rd in iter_run_dirs(root):
            now = run_state(rd)
            if now.final is None or now.state != "done":
                continue
            final = now.final.to_dict()
            evals = [r for r in rd.metrics() if r.get("kind") == "eval"]
            steps = np.array([r["step"] for r in evals], float)
            losses = np.array([r["val_loss"] for r in evals], float)
            curves += [{"run_id": final["run_id"], "step": st, "loss": lo} for st, lo in zip(steps, losses, strict=True)]
            usage = (evals[-1].get("memory") or {}) if evals else {}
            train = (rd.read_config() or {}).get("train") or {}
            row = {
                "point": point_of(final.get("name"), final["run_id"]), "run_id": final["run_id"],
                "schedule": train.get("schedule", "cosine"), "branch_of": train.get("branch_of"),
                "tokens": float(final["tokens"]), "steps": int(final["steps"]),
                "family": final.get("family"), "preset": final.get("preset"),
                "corpus": corpus_of(final.get("data_source")), "seed": final.get("seed"),
                "val_loss": float(final["val_loss"]), "t_half": t_half(steps, losses),
                "rows_used": min((v for k, v in usage.items() if k.endswith("/rows_used")), default=math.nan),
                "row_entropy": min((v for k, v in usage.items() if k.endswith("/row_entropy")), default=math.nan),
            }
            for s in EARLY_STEPS:
                hit = np.flatnonzero(steps == s)
                row[f"val@{s}"] = float(losses[hit[0]]) if hit.size else math.nan
            rows.append(row)
    if not rows:
        raise ValueError(f"no finished runs below {', '.join(map(str, roots))}")
    runs = pd.DataFrame(rows).sort_values(["corpus", "point", "seed"], kind="stable").reset_index(drop=True)
    return runs, pd.DataFrame(curves, columns=["run_id", "step", "loss"])


def sd_interval(x: np.ndarray, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the sample standard deviation, resampling the seeds."""
    if len(x) < 3:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = rng.choice(x, size=(n_boot, len(x)), replace=True).std(axis=1, ddof=1)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def outliers(x: np.ndarray) -> np.ndarray:
    """Mask of values more than OUTLIER_Z robust SDs above the median (a seed that trained late)."""
    med = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - med))
    return x > med + OUTLIER_Z * mad if mad > 0 else np.zeros(len(x), bool)


def seed_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (corpus, point): seeds, mean, sd [sd_lo, sd_hi], min, median, max, range, outlier seeds, and
    the means of t_half, rows_used and row_entropy."""
    out = []
    for (corpus, point), g in runs.groupby(["corpus", "point"], sort=True):
        x = g["val_loss"].to_numpy(float)
        lo, hi = sd_interval(x)
        out.append({
            "corpus": corpus, "point": point, "family": g["family"].iloc[0], "seeds": len(x),
            "mean": x.mean(), "sd": x.std(ddof=1) if len(x) > 1 else math.nan, "sd_lo": lo, "sd_hi": hi,
            "min": x.min(), "median": float(np.median(x)), "max": x.max(), "range": x.max() - x.min(),
            "outlier_seeds": " ".join(str(int(s)) for s in g["seed"][outliers(x)]),
            "t_half": g["t_half"].mean(), "t_half_max": g["t_half"].max(),
            "rows_used": g["rows_used"].mean(), "row_entropy": g["row_entropy"].mean(),
            **_usage_correlation(x, g["rows_used"].to_numpy(float)),
        })
    return pd.DataFrame(out)


def _usage_correlation(loss: np.ndarray, rows_used: np.ndarray) -> dict[str, float]:
    """Spearman's rho between final loss and rows used over the seeds, with its p-value (NaN without memory)."""
    if len(loss) < 4 or np.isnan(rows_used).any() or np.ptp(rows_used) == 0:
        return {"rho_rows_used": math.nan, "p_rho": math.nan}
    res = stats.spearmanr(loss, rows_used)
    return {"rho_rows_used": float(res.statistic), "p_rho": float(res.pvalue)}


COMPARE_COLUMNS = ("corpus", "a", "b", "mean_diff", "p_mean", "sd_ratio", "p_spread", "t_half_diff", "p_t_half")


def compare_points(runs: pd.DataFrame, pairs: list[tuple[str, str, str]]) -> pd.DataFrame:
    """For each (corpus, point a, point b): mean difference a - b with Welch's p, sd ratio a/b with the
    Brown-Forsythe p, t_half difference with Welch's p. The columns are COMPARE_COLUMNS, also with no row (nothing
    to compare: compare.csv is then its header alone)."""
    out = []
    for corpus, a, b in pairs:
        xa = runs[(runs.corpus == corpus) & (runs.point == a)]
        xb = runs[(runs.corpus == corpus) & (runs.point == b)]
        if len(xa) < 2 or len(xb) < 2:
            continue
        la, lb = xa["val_loss"].to_numpy(float), xb["val_loss"].to_numpy(float)
        ta, tb = xa["t_half"].to_numpy(float), xb["t_half"].to_numpy(float)
        out.append({
            "corpus": corpus, "a": a, "b": b, "mean_diff": la.mean() - lb.mean(),
            "p_mean": float(stats.ttest_ind(la, lb, equal_var=False).pvalue),
            "sd_ratio": la.std(ddof=1) / lb.std(ddof=1) if lb.std(ddof=1) > 0 else math.inf,
            "p_spread": float(stats.levene(la, lb, center="median").pvalue),
            **_t_half_test(ta[~np.isnan(ta)], tb[~np.isnan(tb)]),
        })
    return pd.DataFrame(out, columns=list(COMPARE_COLUMNS))


def _t_half_test(ta: np.ndarray, tb: np.ndarray) -> dict[str, float]:
    if len(ta) < 2 or len(tb) < 2:
        return {"t_half_diff": math.nan, "p_t_half": math.nan}
    return {"t_half_diff": ta.mean() - tb.mean(), "p_t_half": float(stats.ttest_ind(ta, tb, equal_var=False).pvalue)}


def default_pairs(runs: pd.DataFrame) -> list[tuple[str, str, str]]:
    """What to compare: each variant point (its preset plus changed settings) with its preset's own point, each
    preset's point of a non-dense family with the dense point of the same size (`-tK`, `-oK`), and each rung of the
    one-shape ladder with the rung below it of its family (`ladder_order`), per corpus."""
    pairs = []
    for corpus, g in runs.groupby("corpus", sort=True):
        points = dict(zip(g["point"], g["preset"], strict=False))
        dense = {m.group(1): p for p, preset in points.items() if p == preset and (m := _SIZE.search(p))
                 and runs.loc[runs.point == p, "family"].iloc[0] == "dense"}
        for p, preset in sorted(points.items()):
            if p != preset and preset in points:
                pairs.append((corpus, p, preset))
            elif p == preset and (m := _SIZE.search(p)) and m.group(1) in dense and dense[m.group(1)] != p:
                pairs.append((corpus, p, dense[m.group(1)]))
        pairs += [(corpus, a, b) for a, b in _neighbours(list(points))]
    return pairs


def _neighbours(points: list[str]) -> list[tuple[str, str]]:
    """(rung k+1, rung k) of each family among one-shape ladder points, for rungs present next to each other."""
    rungs: dict[str, dict[int, str]] = {}
    for p in points:
        if m := _RUNG.match(p):
            rungs.setdefault(m.group(1), {})[int(m.group(2))] = p
    return [(byk[k + 1], byk[k]) for byk in rungs.values() for k in sorted(byk) if k + 1 in byk]


def _step(a: str, b: str) -> bool:
    """Whether point a is the one-shape rung right above point b of the same family."""
    ma, mb = _RUNG.match(a), _RUNG.match(b)
    return bool(ma and mb and ma.group(1) == mb.group(1) and int(ma.group(2)) == int(mb.group(2)) + 1)


def ladder_order(comp: pd.DataFrame) -> list[str]:
    """A report paragraph: per family, whether its one-shape rungs order monotonically (each rung lower in mean
    loss than the one below, at the same tokens), and which neighbour steps are resolved (Welch p < 0.05)."""
    steps = comp[[_step(a, b) for a, b in zip(comp["a"], comp["b"], strict=True)]]
    if steps.empty:
        return []
    lines = ["## Ladder order", "",
             "Each one-shape rung against the rung below it (same tokens): a - b < 0 when the larger model is "
             "better, as a ladder should order.", "",
             "| family | steps | monotone | resolved (p < 0.05) | largest a - b |", "|---|---|---|---|---|"]
    for fam, g in steps.groupby(steps["a"].map(lambda a: _RUNG.match(a).group(1)), sort=True):
        worst = g["mean_diff"].max()
        lines.append(f"| {fam} | {len(g)} | {'yes' if (g['mean_diff'] < 0).all() else 'no'} | "
                     f"{int((g['p_mean'] < 0.05).sum())} of {len(g)} | {worst:+.4f} |")
    return lines + [""]


# ---- figures ---------------------------------------------------------------------------------------------------


def plot_spread(runs: pd.DataFrame):
    """Final val loss of every seed, one column of dots per point, one panel per corpus."""
    from analysis.plots import _figure, color  # lazy: matplotlib only for figures

    corpora = sorted(runs["corpus"].unique())
    fig, axes = _figure(len(corpora), width=6.5, height=4.2)
    for ax, corpus in zip(axes, corpora, strict=True):
        g = runs[runs.corpus == corpus]
        points = sorted(g["point"].unique(), key=lambda p: (_size_key(p), p))
        for i, p in enumerate(points):
            x = g[g.point == p]
            jitter = np.linspace(-0.15, 0.15, len(x)) if len(x) > 1 else np.zeros(1)
            ax.scatter(i + jitter, x["val_loss"], s=14, color=color(str(x["family"].iloc[0])), alpha=0.8)
            ax.hlines(x["val_loss"].median(), i - 0.25, i + 0.25, color="black", linewidth=1)
        ax.set_xticks(range(len(points)), short_labels(points), rotation=55, ha="right", fontsize=6.5)
        ax.set_ylabel("final validation loss (nats/byte)")
        ax.set_title(f"{corpus}: one dot per seed, bar = median")
    return fig


def plot_curves(runs: pd.DataFrame, curves: pd.DataFrame, corpus: str):
    """Validation loss vs step of every seed, one panel per point on `corpus` (the early plateau, seed by seed);
    `curves` as `read_runs` returns them."""
    from analysis.plots import _figure, color  # lazy: matplotlib only for figures

    g = runs[runs.corpus == corpus]
    points = sorted(g["point"].unique(), key=lambda p: (_size_key(p), p))
    ncols = min(4, len(points))
    nrows = math.ceil(len(points) / ncols)
    fig, _ = _figure(1, width=3.2 * ncols, height=2.6 * nrows)
    fig.clear()
    for k, p in enumerate(points):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for _, r in g[g.point == p].iterrows():
            c = curves[curves.run_id == r["run_id"]]
            ax.plot(c["step"], c["loss"], color=color(str(r["family"])), linewidth=0.9, alpha=0.8)
        ax.set_title(short_labels(points)[k], fontsize=7.5)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("val loss", fontsize=7)
        ax.tick_params(labelsize=6.5)
    return fig


def short_labels(points: list[str]) -> list[str]:
    """Figure labels: of a variant's `key=value` settings, those shared by at least half of its preset's variants
    (the unchanged ones) are dropped: among 'p-a=1-b=2', 'p-a=9-b=2', 'p-a=1-b=7' they read 'p-ref', 'p-a=9',
    'p-b=7'. A point without settings keeps its name."""
    split = {p: _SETTING.split(p) for p in points}  # [base, 'key=value', ...]
    out = []
    for p in points:
        base, settings = split[p][0], split[p][1:]
        siblings = [split[q][1:] for q in points if split[q][0] == base and len(split[q]) > 1]
        keep = [x for x in settings if 2 * sum(x in sib for sib in siblings) <= len(siblings)]
        out.append("-".join([base, *keep]) if keep else base + ("-ref" if settings else ""))
    return out


def _size_key(point: str) -> int:
    m = _SIZE.search(point)
    return int(m.group(1)[1:]) if m else 0


# ---- report ----------------------------------------------------------------------------------------------------


def _md_table(df: pd.DataFrame, cols: dict[str, str], digits: int = 3) -> list[str]:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.{digits}g}" if abs(v) < 1e-2 and v != 0 else f"{v:.{digits}f}"
        return str(v)
    lines = ["| " + " | ".join(cols.values()) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for _, r in df.iterrows()]
    return lines


def write_report(roots: list[str | Path], out_dir: str | Path) -> Path:
    """seeds.csv (one row per run), spread.csv (one per point), compare.csv, figures and report.md in `out_dir`."""
    from analysis.plots import save

    runs, curves = read_runs(roots)
    table = seed_table(runs)
    comp = compare_points(runs, default_pairs(runs))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "seeds.csv", index=False, float_format="%.6g")
    table.to_csv(out / "spread.csv", index=False, float_format="%.6g")
    comp.to_csv(out / "compare.csv", index=False, float_format="%.6g")
    save(plot_spread(runs), out / "figures", "spread")
    lines = ["# Seed distributions", "",
             f"{len(runs)} finished runs below {', '.join(str(r) for r in roots)}; one point = one configuration "
             "up to its seed (analysis/seeds.py has the definitions).", ""]
    for corpus in sorted(runs["corpus"].unique()):
        save(plot_curves(runs, curves, corpus), out / "figures", f"curves_{corpus}")
        lines += [f"## {corpus}", "",
                  *_md_table(table[table.corpus == corpus], {
                      "point": "point", "seeds": "seeds", "mean": "mean", "sd": "sd", "sd_lo": "sd 95% lo",
                      "sd_hi": "sd 95% hi", "min": "min", "median": "median", "max": "max", "range": "range",
                      "outlier_seeds": "late seeds", "t_half": "t_half", "t_half_max": "t_half max",
                      "rows_used": "rows used", "row_entropy": "row entropy",
                      "rho_rows_used": "rho(loss, rows used)", "p_rho": "p"}),
                  "", f"![final loss per seed](figures/spread.png)  ![curves](figures/curves_{corpus}.png)", ""]
    if len(comp):
        lines += ["## Comparisons", "",
                  "a - b: difference of the means (Welch's p), ratio of the standard deviations (Brown-Forsythe p), "
                  "difference of the mean t_half (Welch's p).", "",
                  *_md_table(comp, {"corpus": "corpus", "a": "a", "b": "b", "mean_diff": "mean a-b",
                                    "p_mean": "p", "sd_ratio": "sd a/b", "p_spread": "p",
                                    "t_half_diff": "t_half a-b", "p_t_half": "p"}), ""]
    lines += ladder_order(comp)
    lines += _schedule_section(runs, curves, out)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _schedule_section(runs: pd.DataFrame, curves: pd.DataFrame, out: Path) -> list[str]:
    """WSD vs cosine at equal steps, and branch vs trunk, when the runs hold such pairs (analysis/schedules.py)."""
    from analysis.schedules import branch_vs_trunk, summarise, wsd_vs_cosine  # lazy: only for schedule sweeps

    pairs = wsd_vs_cosine(runs)
    if pairs.empty:
        return []
    summary = summarise(pairs)
    pairs.to_csv(out / "wsd_vs_cosine.csv", index=False, float_format="%.6g")
    summary.to_csv(out / "wsd_vs_cosine_summary.csv", index=False, float_format="%.6g")
    bt = branch_vs_trunk(runs, curves)
    lines = ["## WSD vs cosine at the same budget", "",
             "Pairs of runs with the same preset, corpus, seed and steps: (L_wsd - L_cos) / L_cos, mean over seeds "
             "with a Student-t 95% interval (analysis/schedules.py). trunk = the WSD run at its own end, branch = a "
             "cooldown branch of it.", "",
             *_md_table(summary, {"preset": "preset", "corpus": "corpus", "steps": "steps", "kind": "kind",
                                  "tokens": "tokens", "pairs": "pairs", "rel_diff": "rel. diff", "lo": "95% lo",
                                  "hi": "95% hi", "max_abs": "max |diff|"}, digits=4), ""]
    if len(bt):
        lines += [f"Branch below its trunk at the same step: {int(bt.below.sum())} of {len(bt)} branches "
                  f"(mean {float((bt.branch_loss - bt.trunk_loss).mean()):+.3f} nats).", ""]
    return lines
