"""Every figure of the analysis: pure functions of the tables and fits, one style, PNG + SVG, byte-reproducible.

Figures are `matplotlib.figure.Figure` objects drawn without pyplot (no global state, no GUI backend; files are
rendered by Agg and the SVG backend). `save` strips the date and software stamps and fixes the SVG id salt, so
re-running on the same inputs rewrites identical files. Power laws are drawn on log-log axes; the legend carries
each fitted formula, and shaded bands are the pointwise bootstrap intervals of the fitted curve.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from analysis.chinchilla import frontier
from analysis.compare import AXES, DENSITY_X, DensityLaw, FamilyFit, MemoryLaw, Multiplier, families
from analysis.isoflop import STUDY_K_NEAREST, IsoflopStudy, parabola
from ultramem.families import PlotStyle, family_names, get_family

STYLE = {
    "font.size": 9.5, "axes.titlesize": 10.5, "axes.labelsize": 9.5, "legend.fontsize": 7.5,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "axes.spines.top": False,
    "axes.spines.right": False, "lines.linewidth": 1.6, "lines.markersize": 5, "legend.frameon": False,
    "savefig.dpi": 150, "svg.hashsalt": "ultramem-analysis", "svg.fonttype": "path",
    "path.simplify": False,
}
LOSS_LABEL = "validation loss (nats/token)"
SYMBOLS = {"flops": "C", "active_params": "N", "active_non_embedding_params": "N", "total_params": "N_total",
           "non_embedding_params": "N", "tokens": "D", "memory_slots": "M", "sparse_params": "P_sparse",
           "values_per_token": "v"}


def family_style(family: str) -> PlotStyle:
    """The family's registered plot style (ultramem/families); grey circles under its own name if unregistered."""
    return get_family(family).style if family in family_names() else PlotStyle(family, "#555555", "o")


def color(family: str) -> str:
    return family_style(family).color


def marker(family: str) -> str:
    return family_style(family).marker


def family_label(family: str) -> str:
    return family_style(family).label


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0) -> tuple[Figure, list]:
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width * ncols, height), layout="constrained")
        axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write <stem>.png and <stem>.svg; identical inputs give identical bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    with matplotlib.rc_context(STYLE):
        fig.savefig(paths[0], format="png", metadata={"Software": None})
        fig.savefig(paths[1], format="svg", metadata={"Date": None, "Creator": None})
    return paths


def _tick(v: float, _pos: int | None = None) -> str:
    """Plain tick text ("3e12", "2.5"): mathtext tick labels cost most of a figure's rendering time."""
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        return f"{v:g}"
    return f"{v:.0e}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _log(ax, which: str = "xy", base: float = 10) -> None:
    """Log scale on the named axes with plain tick labels; minor ticks are labelled only on a short span."""
    for name in which:
        axis = ax.xaxis if name == "x" else ax.yaxis
        (ax.set_xscale if name == "x" else ax.set_yscale)("log", base=base)
        lo, hi = (ax.get_xlim() if name == "x" else ax.get_ylim())
        short = lo > 0 and math.log(hi / lo, base) < 1.0
        axis.set_major_formatter(FuncFormatter(_tick))
        axis.set_minor_formatter(FuncFormatter(_tick) if short else NullFormatter())


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#777777", wrap=True)


def _curve_x(lo: float, hi: float, log: bool = True, pad: float = 0.15, n: int = 200) -> np.ndarray:
    if log:
        span = math.log10(hi / lo) if hi > lo else 1.0
        return np.geomspace(lo / 10 ** (pad * span), hi * 10 ** (pad * span), n)
    return np.linspace(lo, hi, n)


def plot_scaling(runs: pd.DataFrame, fits: dict[str, FamilyFit], x: str, y: str = "val_loss",
                 title: str | None = None) -> Figure:
    """Loss against `x` per family: runs as markers, the fitted law and its bootstrap band."""
    fig, (ax,) = _figure()
    drawn = False
    ys: list[float] = []
    for fam in families(runs):
        df = runs[runs["family"] == fam]
        df = df[np.isfinite(pd.to_numeric(df[x], errors="coerce")) & np.isfinite(df[y])]
        if df.empty:
            continue
        drawn = True
        ys.extend(df[y].astype(float))
        ff = fits.get(fam)
        if ff is not None and ff.fit is not None:
            xs = _curve_x(*ff.fit.x_range)
            lo, hi = ff.fit.band(xs)
            ax.fill_between(xs, lo, hi, color=color(fam), alpha=0.15, linewidth=0)
            label = f"{family_label(fam)}: {ff.fit.law.formula(SYMBOLS.get(x, 'x'))}"
            ax.plot(xs, ff.fit.law(xs), color=color(fam), label=label)
            ax.scatter(df[x], df[y], color=color(fam), marker=marker(fam), zorder=3)
        else:
            why = ff.reason if ff is not None else ""
            ax.scatter(df[x], df[y], color=color(fam), marker=marker(fam), zorder=3,
                       label=f"{family_label(fam)} (no law: {why})" if why else family_label(fam))
    if not drawn:
        _note(ax, f"no finished runs with {x}")
    if ys:  # the runs set the view: a weakly identified law's band can span decades and would flatten the points
        ax.set_ylim(min(ys) / 1.1, max(ys) * 1.15)
    _log(ax)
    ax.set_xlabel(f"{AXES.get(x, x)}   [{SYMBOLS.get(x, 'x')}]")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title(title or f"Loss vs {AXES.get(x, x)}")
    if drawn:
        ax.legend(loc="upper right")
    return fig


def plot_multiplier(mult: Multiplier) -> Figure:
    """Effective compute multiplier of each sparse run over the dense law, with its family's geometric mean."""
    fig, (ax,) = _figure()
    m = pd.to_numeric(mult.points["multiplier"], errors="coerce")
    pts = mult.points[np.isfinite(m) & (m > 0)]  # inf: a loss at or below the dense floor
    ax.set_title("Dense compute each sparse run is worth at equal loss")
    if pts.empty:  # nothing to put on log axes (every run below the dense floor, or no dense law)
        note = "; ".join(mult.summary.get("note", pd.Series(dtype=str)).dropna().astype(str).unique())
        _note(ax, note or "no multiplier: needs a dense law in FLOPs and sparse runs")
        return fig
    for fam, g in pts.groupby("family", sort=False):
        yerr = np.vstack([g["multiplier"] - g["lo"], g["hi"] - g["multiplier"]])
        yerr = np.where(np.isfinite(yerr), np.maximum(yerr, 0), 0)
        s = mult.summary[mult.summary["family"] == fam]
        label = family_label(fam)
        if len(s) and np.isfinite(s["multiplier"].iloc[0]):
            r = s.iloc[0]
            label = f"{family_label(fam)}: geometric mean {r['multiplier']:.2f}× [{r['lo']:.2f}, {r['hi']:.2f}]"
            ax.axhline(r["multiplier"], color=color(fam), linestyle=":", linewidth=1)
        ax.errorbar(g["flops"], g["multiplier"], yerr=yerr, fmt=marker(fam), color=color(fam),
                    capsize=3, label=label)
    ax.axhline(1.0, color="#333333", linewidth=1, label="dense (1×)")
    _log(ax)
    ax.set_xlabel(f"{AXES['flops']} of the sparse run")
    ax.set_ylabel("effective compute multiplier C_dense(L) / C")
    ax.legend(loc="best")
    return fig


def plot_memory(runs: pd.DataFrame, laws: list[MemoryLaw], y: str = "val_loss") -> Figure:
    """UltraMem loss against memory size at each fixed backbone: log-linear fit and power law with a floor."""
    fig, (ax,) = _figure()
    shades = ["#3a9a5b", "#1f5f8b", "#8c564b", "#7f7f7f"]
    if not laws:
        _note(ax, "no UltraMem runs with a memory size")
    for i, ml in enumerate(laws):
        c = shades[i % len(shades)]
        g = runs[runs["run_id"].isin(ml.run_ids)]
        ax.scatter(g[ml.x], g[y], color=c, marker="^", zorder=3,
                   label=f"{ml.backbone}" + (f" ({ml.reason})" if ml.log_linear is None else ""))
        if ml.log_linear is not None:
            xs = _curve_x(*ml.log_linear.x_range)
            lo, hi = ml.log_linear.band(xs)
            k = ml.log_linear.estimates["k"]
            ax.fill_between(xs, lo, hi, color=c, alpha=0.15, linewidth=0)
            ax.plot(xs, ml.log_linear.law(xs), color=c,
                    label=f"{ml.log_linear.law.formula('M')}  (k {k.fmt(3)})")
        if ml.power is not None:
            xs = _curve_x(*ml.power.x_range)
            ax.plot(xs, ml.power.law(xs), color=c, linestyle="--", label=ml.power.law.formula("M"))
    _log(ax, "x")
    ax.set_xlabel(f"{AXES.get(laws[0].x if laws else 'memory_slots')}   [M]")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("UltraMem: loss vs memory size at fixed activated size")
    if laws:
        ax.legend(loc="upper right")
    return fig


def plot_density(runs: pd.DataFrame, laws: list[DensityLaw], y: str = "val_loss") -> Figure:
    """Loss against memory values read per token (log x) per memory family at fixed total parameters: one line per
    (family, total parameters) group through the mean loss at each density, every run as a marker, and the
    group's fitted slope dL/d ln v in the legend when it has >= 3 densities."""
    fig, (ax,) = _figure()
    styles = ["-", "--", ":", "-."]
    if not laws:
        _note(ax, "no memory family with >= 2 densities at one total parameter count")
    seen: dict[str, int] = {}
    ys: list[float] = []
    for law in laws:
        i = seen.get(law.family, 0)
        seen[law.family] = i + 1
        g = runs[runs["run_id"].isin(law.run_ids)]
        mean = g.groupby(DENSITY_X)[y].mean().sort_index()
        ys.extend(g[y].astype(float))
        label = f"{family_label(law.family)}, N_total {law.total_params:.3g}"
        label += f": slope {law.slope.fmt(3)}" if law.slope is not None else " (2 densities: no slope)"
        ax.plot(mean.index, mean.values, color=color(law.family), linestyle=styles[i % len(styles)], label=label)
        ax.scatter(g[DENSITY_X], g[y], color=color(law.family), marker=marker(law.family), zorder=3)
    if ys:
        pad = max(ys) - min(ys) or 0.1
        ax.set_ylim(min(ys) - 0.05 * pad, max(ys) + 0.25 * pad)  # room for the legend
    _log(ax, "x", base=2)
    ax.set_xlabel(f"{AXES[DENSITY_X]}   [v]")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Activation density at fixed total parameters")
    if laws:
        ax.legend(loc="best")
    return fig


def plot_isoflop_families(study: IsoflopStudy) -> Figure:
    """One panel per family: mean loss vs N at each FLOP budget (seeds averaged), the parabola in ln N of each valid
    budget, and its vertex (N*, L*)."""
    fams = list(study.families.values())
    fig, axes = _figure(ncols=len(fams), width=4.2)
    cmap = matplotlib.colormaps["viridis"]
    for ax, fam in zip(axes, fams, strict=True):
        pts = fam.points
        budgets = sorted(pts["budget"].unique())
        valid = set() if fam.optima is None else set(fam.optima.loc[fam.optima["valid"], "flops"])
        for i, c in enumerate(budgets):
            col = cmap(i / max(1, len(budgets) - 1))
            g = pts[pts["budget"] == c].groupby("n")["loss"].mean()
            ax.plot(g.index, g.to_numpy(), "o", color=col, markersize=4, label=f"C = {c:.2g}")
            if c in valid:
                coef = parabola(pts, c, flops_col="budget", n_col="n", loss_col="loss", k_nearest=STUDY_K_NEAREST)
                xs = np.geomspace(g.index.min(), g.index.max(), 100)
                ax.plot(xs, np.polyval(coef, np.log(xs)), color=col, linewidth=1)
        if fam.optima is not None:
            ok = fam.optima[fam.optima["valid"]]
            ax.scatter(ok["n_star"], ok["loss_star"], marker="*", color="black", s=50, zorder=4, label="N* (vertex)")
        else:
            _note(ax, f"no IsoFLOP frontier: {fam.why2}")
        _log(ax, "x")
        ax.set_xlabel("activated parameters N")
        ax.set_ylabel(LOSS_LABEL)
        ax.set_title(f"{family_label(fam.family)}: IsoFLOP profiles")
        ax.legend(loc="upper right", ncols=2, fontsize=6)
    return fig


def plot_frontier(study: IsoflopStudy) -> Figure:
    """Left: compute-optimal N*(C) per family, IsoFLOP vertices (markers), their power law (solid) and the L(N, D)
    fit's frontier (dashed). Right: the loss on each family's L(N, D) frontier, with the IsoFLOP minima."""
    fig, (ax, bx) = _figure(ncols=2, width=5.0)
    drawn = False
    for fam in study.families.values():
        col, mk = color(fam.family), marker(fam.family)
        cs = _curve_x(*fam.c_range) if fam.c_range[1] > fam.c_range[0] else np.array(fam.c_range)
        if fam.optima is not None:
            ok = fam.optima[fam.optima["valid"]]
            ax.scatter(ok["flops"], ok["n_star"], color=col, marker=mk, zorder=3)
            bx.scatter(ok["flops"], ok["loss_star"], color=col, marker=mk, zorder=3)
            drawn = True
        if fam.frontier is not None:
            ax.plot(cs, fam.frontier["n"](cs), color=col,
                    label=f"{family_label(fam.family)} IsoFLOP: {fam.frontier['n'].formula('C', 'N*')}")
        if fam.lnd is not None:
            n, _, loss = frontier(fam.lnd.law, fam.flops_per_token, cs, fam.n_range)
            ax.plot(cs, n, color=col, linestyle="--", label=f"{family_label(fam.family)} L(N, D) frontier")
            bx.plot(cs, loss, color=col, linestyle="--", label=f"{family_label(fam.family)} L*(C) from L(N, D)")
            drawn = True
    if not drawn:
        _note(ax, "no IsoFLOP vertices and no L(N, D) fit")
    _log(ax)
    _log(bx, "x")
    ax.set_xlabel(AXES["flops"])
    ax.set_ylabel("compute-optimal activated parameters N*")
    ax.set_title("Compute-optimal N*(C)")
    bx.set_xlabel(AXES["flops"])
    bx.set_ylabel(LOSS_LABEL)
    bx.set_title("Loss on the frontier")
    for a in (ax, bx):
        if a.get_legend_handles_labels()[0]:
            a.legend(loc="best", fontsize=6)
    return fig


def plot_lnd_slices(study: IsoflopStudy) -> Figure:
    """One panel per family: loss vs tokens D at each size N (markers: runs), and the fitted L(N, D) along D."""
    fams = list(study.families.values())
    fig, axes = _figure(ncols=len(fams), width=4.2)
    cmap = matplotlib.colormaps["plasma"]
    for ax, fam in zip(axes, fams, strict=True):
        sizes = sorted(fam.points["n"].unique())
        for i, n in enumerate(sizes):
            col = cmap(0.85 * i / max(1, len(sizes) - 1))
            g = fam.points[fam.points["n"] == n]
            ax.plot(g["d"], g["loss"], "o", color=col, markersize=3.5, label=f"N = {n:.3g}")
            if fam.lnd is not None and g["d"].nunique() > 0:
                ds = np.geomspace(g["d"].min(), g["d"].max(), 50) if g["d"].nunique() > 1 else g["d"].to_numpy()
                ax.plot(ds, fam.lnd.law(n, ds), color=col, linewidth=1)
        if fam.lnd is None:
            _note(ax, f"no L(N, D) fit: {fam.why3}")
        _log(ax, "x")
        ax.set_xlabel("training tokens D")
        ax.set_ylabel(LOSS_LABEL)
        ax.set_title(f"{family_label(fam.family)}: L(N, D) at each N")
        ax.legend(loc="upper right", fontsize=6, ncols=2)
    return fig


def plot_curves(curves: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    """Training (lines) and held-out (markers) loss against tokens for every run, coloured by family."""
    fig, (ax,) = _figure(width=6.5)
    if curves.empty:
        _note(ax, "no metrics.jsonl curves")
    order = runs.sort_values(["family", "active_params"], kind="stable")["run_id"].tolist()
    seen = set()
    for rid in [r for r in order if r in set(curves["run_id"])]:
        g = curves[curves["run_id"] == rid]
        fam = str(g["family"].iloc[0])
        tr, ev = g[g["kind"] == "train"], g[g["kind"] == "eval"]
        label = family_label(fam) if fam not in seen else None
        seen.add(fam)
        ax.plot(tr["tokens"], tr["loss"], color=color(fam), alpha=0.55, linewidth=1, label=label)
        ax.scatter(ev["tokens"], ev["loss"], color=color(fam), marker=marker(fam), s=10)
    _log(ax)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token): train — lines, validation — markers")
    ax.set_title("Training curves")
    if seen:
        ax.legend(loc="upper right")
    return fig


def plot_latency(bench: pd.DataFrame) -> Figure:
    """Inference latency against batch size per model (benchmarks/results/inference.json); with the benchmark's
    moe_ultramem_latency_ratio, a second panel shows MoE's latency over UltraMem's."""
    ratio = "moe_ultramem_latency_ratio" in bench and bench["moe_ultramem_latency_ratio"].notna().any()
    fig, axes = _figure(ncols=2 if ratio else 1, width=5.0 if ratio else 6.0)
    ax = axes[0]
    key = "model" if "model" in bench else "family"
    for name, g in bench.groupby(key, sort=True):
        g = g.sort_values("batch_size")
        fam = str(g["family"].iloc[0])
        ax.plot(g["batch_size"], g["latency_ms"], marker=marker(fam), color=color(fam), label=str(name))
    _log(ax, "x", base=2)
    _log(ax, "y")
    ax.set_xlabel("batch size (sequences decoded together)")
    ax.set_ylabel("latency per decoding step (ms)")
    ax.set_title("Inference latency vs batch size")
    ax.legend(loc="upper left")
    if ratio:
        bx = axes[1]
        r = bench.dropna(subset=["moe_ultramem_latency_ratio"]).groupby("batch_size")["moe_ultramem_latency_ratio"]
        r = r.first()
        bx.plot(r.index, r.values, marker="o", color=color("moe"))
        bx.axhline(1.0, color="#333333", linewidth=1)
        _log(bx, "x", base=2)
        bx.set_xlabel("batch size (sequences decoded together)")
        bx.set_ylabel("latency ratio MoE / UltraMem")
        bx.set_title("MoE latency relative to UltraMem")
    return fig


def plot_knowledge(table: pd.DataFrame) -> Figure:
    """Facts recalled (embedded-corpus probe) against total parameters per family; held-out recall dashed."""
    fig, (ax,) = _figure()
    if table.empty:
        _note(ax, "no knowledge probe in these runs")
    for fam in families(table):
        g = table[table["family"] == fam].sort_values("total_params")
        ax.plot(g["total_params"], g["facts_recalled"], marker=marker(fam), color=color(fam),
                label=f"{family_label(fam)}: seen facts")
        ax.plot(g["total_params"], g["knowledge_heldout_recall"] * g["knowledge_facts"], linestyle="--",
                color=color(fam), alpha=0.6, label=f"{family_label(fam)}: held-out phrasing")
    _log(ax, "x")
    ax.set_xlabel(AXES["total_params"])
    ax.set_ylabel("facts recalled (of those probed)")
    ax.set_title("Knowledge capacity: facts recalled vs parameters")
    if not table.empty:
        ax.legend(loc="upper left")
    return fig
