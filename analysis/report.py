"""One sweep's report: collect -> fit -> compare -> figures -> Markdown + HTML, all regenerated from what is on disk.

Output folder (default `<runs_dir>/../<name>_report/`):
  report.md, report.html   tables, fitted laws with CIs, the paper's claims checked against these runs, figures
  fits.json                every fitted law and estimate, machine-readable
  runs.csv, curves.csv     the collected tables (what a study commits instead of run folders)
  inference.json           copy of the inference benchmark used for the latency figure, when there is one
  figures/<name>.png|svg   every figure
Deterministic: fixed bootstrap seeds, sorted tables, figures without timestamps, so re-running on the same inputs
rewrites identical files.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import plots
from analysis.bootstrap import Estimate, LawFit, fmt_identified
from analysis.checks import FitError
from analysis.collect import (
    Collected,
    load_collected,
    merge_collected,
    read_inference_benchmark,
    save_collected,
)
from analysis.compare import (
    AXES,
    DensityLaw,
    FamilyFit,
    MemoryLaw,
    Multiplier,
    compute_multiplier,
    density_laws,
    density_vs_sparse,
    exponent_differences,
    fit_families,
    knowledge_table,
    loss_gap,
    memory_laws,
    scale_estimate,
)
from analysis.isoflop import IsoflopStudy, approach2_why, isoflop_study, lnd_why, profile_interval

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BENCH = REPO / "benchmarks" / "results" / "inference.json"
SCALING_AXES = ("flops", "active_params", "total_params")


@dataclass
class Analysis:
    collected: Collected
    scaling: dict[str, dict[str, FamilyFit]]  # x column -> family -> fit
    differences: pd.DataFrame
    multiplier: Multiplier
    gap: tuple[float, Estimate] | None  # UltraMem − MoE loss at equal compute
    memory: list[MemoryLaw]
    knowledge: pd.DataFrame
    isoflop: IsoflopStudy | None  # families with a D axis: L(N, D), IsoFLOP parabolas, frontier multipliers
    bench: pd.DataFrame | None
    level: float = 0.95
    solver: str = "lsq"  # how the family laws were fitted (analysis/fit.py SOLVERS)
    claims: list[dict[str, str]] = field(default_factory=list)
    density: list[DensityLaw] = field(default_factory=list)  # loss vs values per token at fixed total params
    density_comparison: pd.DataFrame | None = None  # 4× density vs 4× sparse parameters, per family


def analyse(collected: Collected, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
            bench: pd.DataFrame | None = None, solver: str = "lsq") -> Analysis:
    """solver: how the family laws L = E + A·x^(−α) are fitted ("lsq", or "huber" to be robust to an outlying run;
    analysis/fit.py). The memory-size laws are always least squares."""
    runs = collected.runs
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    scaling = {x: fit_families(runs, x, solver=solver, **kw) for x in SCALING_AXES}
    mult = compute_multiplier(runs, scaling["flops"].get("dense", FamilyFit("dense", "flops", 0, None,
                                                                             "no dense runs")), level=level,
                              seed=seed)
    a = Analysis(collected, scaling, exponent_differences(scaling["flops"], level=level), mult,
                 loss_gap(scaling["flops"], "ultramem", "moe", level=level), memory_laws(runs, **kw),
                 knowledge_table(runs), isoflop_study(runs, **kw), bench, level, solver)
    a.claims = claims(a)
    a.density = density_laws(runs, **kw)
    if a.density:
        a.density_comparison = density_vs_sparse(runs, a.density, **kw)
    return a


# ---- the paper's claims -----------------------------------------------------------------------------------------


def _verdict(e: Estimate, above: str, below: str, neither: str, at: float, no_ci: str | None = None) -> str:
    """no_ci: why there is no interval, when known better than "too few runs"."""
    if not e.has_ci:
        return f"not testable ({no_ci or 'no interval: too few runs for a bootstrap'})"
    return above if e.lo > at else below if e.hi < at else neither


def claims(a: Analysis) -> list[dict[str, str]]:
    """The UltraMem paper's three headline claims, each with what these runs measure and a CI-based verdict."""
    out = []
    s = a.multiplier.summary
    row = s[s["family"] == "ultramem"] if "family" in s else s.iloc[0:0]
    if len(row) and np.isfinite(row["multiplier"].iloc[0]):
        r = row.iloc[0]
        e = Estimate(r["multiplier"], r["lo"], r["hi"])
        out.append({"claim": "UltraMem beats dense at equal compute",
                    "measured": f"effective compute multiplier {e.fmt(3)} over {int(r['n_runs'])} runs",
                    "verdict": _verdict(e, "supported (interval above 1)", "contradicted (interval below 1)",
                                        "inconclusive (interval contains 1)", 1.0)})
    else:
        why = row["note"].iloc[0] if len(row) else "no UltraMem runs"
        out.append({"claim": "UltraMem beats dense at equal compute", "measured": "—",
                    "verdict": f"not testable ({why})"})
    if a.gap is not None:
        at, e = a.gap
        unfit = [f for f in ("ultramem", "moe") if not a.scaling["flops"][f].fit.boot]
        no_ci = (f"no interval: every bootstrap refit of the {' and '.join(unfit)} law failed, so these runs do not "
                 "identify it" + ("" if a.solver == "huber" else "; an outlying run? try --solver huber")
                 if unfit else None)
        out.append({"claim": "UltraMem rivals MoE (equal activated compute and total parameters)",
                    "measured": f"loss(UltraMem) − loss(MoE) at C = {at:.3g} FLOPs: {e.fmt(3)} nats/token",
                    "verdict": _verdict(e, "UltraMem worse than MoE (interval above 0)",
                                        "UltraMem better than MoE (interval below 0)",
                                        "no detectable difference (interval contains 0)", 0.0, no_ci)})
    else:
        out.append({"claim": "UltraMem rivals MoE (equal activated compute and total parameters)", "measured": "—",
                    "verdict": "not testable (needs UltraMem and MoE laws over an overlapping compute range)"})
    fitted = [m for m in a.memory if m.log_linear is not None]
    if fitted:
        m = max(fitted, key=lambda m: m.n_runs)
        e = m.log_linear.estimates["k"]
        out.append({"claim": "Loss falls log-linearly in memory size (fixed activated size)",
                    "measured": f"slope k of L = c0 − k·ln M at {m.backbone}: {e.fmt(3)} over {m.n_runs} runs",
                    "verdict": _verdict(e, "loss falls with memory size (k > 0); the log-linear form itself is "
                                           "not tested against curvature", "contradicted (loss rises, k < 0)",
                                        "inconclusive (interval for k contains 0)", 0.0)})
    else:
        why = a.memory[0].reason if a.memory else "no UltraMem memory-size sweep in these runs"
        out.append({"claim": "Loss falls log-linearly in memory size (fixed activated size)", "measured": "—",
                    "verdict": f"not testable ({why})"})
    return out


# ---- figures ------------------------------------------------------------------------------------------------------


def figures(a: Analysis) -> dict[str, Any]:
    runs = a.collected.runs
    figs = {f"loss_vs_{x}": plots.plot_scaling(runs, a.scaling[x], x) for x in SCALING_AXES}
    figs["compute_multiplier"] = plots.plot_multiplier(a.multiplier)
    if a.memory:
        figs["memory_size"] = plots.plot_memory(runs, a.memory)
    if a.density:  # some memory family has runs at >= 2 densities at one total parameter count
        figs["loss_vs_values_per_token"] = plots.plot_density(runs, a.density)
    if a.isoflop is not None:
        figs["isoflop_profiles"] = plots.plot_isoflop_families(a.isoflop)
        figs["compute_optimal_frontier"] = plots.plot_frontier(a.isoflop)
        figs["lnd_slices"] = plots.plot_lnd_slices(a.isoflop)
    figs["training_curves"] = plots.plot_curves(a.collected.curves, runs)
    if not a.knowledge.empty:
        figs["knowledge"] = plots.plot_knowledge(a.knowledge)
    if a.bench is not None:
        figs["latency_vs_batch"] = plots.plot_latency(a.bench)
    return figs


# ---- document model: a list of blocks rendered to Markdown and to HTML -----------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float | np.floating):
        if not math.isfinite(v):
            return "—"
        return f"{v:.4g}"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return str(v)


def _table(df: pd.DataFrame) -> tuple[str, list[str], list[list[str]]]:
    return ("table", list(map(str, df.columns)), [[_fmt(v) for v in row] for row in df.itertuples(index=False)])


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "table":
            head, rows = b[1], b[2]
            esc = lambda s: s.replace("|", "\\|")
            lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})\n\n*{b[2]}* ([SVG]({b[1][:-4]}.svg))")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    body = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif kind == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<figure><a href="{e(b[1][:-4])}.svg"><img src="{e(b[1])}" alt="{e(b[2])}"></a>'
                        f"<figcaption>{e(b[2])}</figcaption></figure>")
    css = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px;"
           "text-align:left}th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555;font-size:90%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _law_rows(fits: dict[str, FamilyFit], x: str) -> pd.DataFrame:
    sym = plots.SYMBOLS.get(x, "x")
    rows = []
    for fam, ff in fits.items():
        if ff.fit is None:
            rows.append({"family": fam, "runs": ff.n_runs, "law": f"— ({ff.reason})", "E": "—", "A": "—",
                         "alpha": "—", "bootstrap": "—"})
            continue
        est = ff.fit.estimates
        runs = f"{ff.n_runs} (+{ff.set_aside} at other sparsities)" if ff.set_aside else ff.n_runs
        rows.append({"family": fam, "runs": runs, "law": ff.fit.law.formula(sym),
                     "E": est["E"].fmt(4) if ff.floor else "0 (no floor)", "A": est["A"].fmt(4),
                     "alpha": est["alpha"].fmt(4), "bootstrap": f"{len(ff.fit.boot)} ok, {ff.fit.n_failed} failed"})
    return pd.DataFrame(rows)


SOLVER_TEXT = {
    "lsq": "Family laws are least-squares fits in log space (`--solver lsq`).",
    "porian": "Family laws are fitted with Porian et al.'s procedure (`--solver porian`).",
    "huber": "Family laws minimise the Huber loss (δ = 1e-3) of the log residuals (`--solver huber`), close to least "
             "absolute deviations: an outlying run moves them little.",
}


def report_blocks(a: Analysis, title: str, figure_names: list[str]) -> list[tuple]:
    runs = a.collected.runs
    pct = f"{a.level:.0%}"
    b: list[tuple] = [("h", 1, title)]
    fams = ", ".join(f"{f} ({n})" for f, n in runs["family"].value_counts(sort=False).items())
    b.append(("p", f"{len(runs)} finished runs: {fams or 'none'}. Intervals are {pct} percentile intervals from "
                   "a bootstrap over configurations (a configuration is drawn with all its seeds). Losses are validation "
                   "losses in nats/token. "
                   f"{SOLVER_TEXT[a.solver]}"))
    if a.collected.skipped:
        b.append(("p", f"Not included (not finished or unreadable): {', '.join(a.collected.skipped)}."))
    excluded = excluded_rows(runs)
    if excluded:  # (a report where every row is used reads as before)
        b.append(("p", f"Left out of the fits that need the value ({len(excluded)} of {len(runs)} rows; the `runs` "
                       f"column of each law table counts the rows it used): {'; '.join(excluded)}."))
    b.append(("h", 2, "The paper's claims, checked against these runs"))
    b.append(_table(pd.DataFrame(a.claims, columns=["claim", "measured", "verdict"])))
    b.append(("p", "A small sweep tests these claims weakly: with a few sizes per family the intervals are wide and "
                   "a law fitted without a floor extrapolates poorly. Read the verdicts with the intervals."))
    for x in SCALING_AXES:
        b.append(("h", 2, f"Loss vs {AXES[x]}"))
        b.append(_table(_law_rows(a.scaling[x], x)))
        if f"loss_vs_{x}" in figure_names:
            b.append(("img", f"figures/loss_vs_{x}.png", f"Validation loss vs {AXES[x]}, fitted laws with "
                                                          f"{pct} bootstrap bands"))
    b.append(("h", 2, "Scaling exponents relative to dense (in compute)"))
    if a.differences.empty:
        b.append(("p", "Not available: needs laws for dense and at least one other family."))
    else:
        b.append(_table(a.differences))
    b.append(("h", 2, "Effective compute multiplier over dense"))
    b.append(("p", "M = C_dense(L)/C: the dense training compute that reaches a sparse run's loss on the dense law, "
                   "divided by the sparse run's own compute. Point intervals reflect the dense law's uncertainty; "
                   "the family's geometric mean also resamples its runs."))
    b.append(_table(a.multiplier.summary))
    if not a.multiplier.points.empty:
        b.append(_table(a.multiplier.points))
    b.append(("img", "figures/compute_multiplier.png", "Effective compute multiplier per sparse run"))
    b.append(("h", 2, "UltraMem: loss vs memory size"))
    if not a.memory:
        b.append(("p", "No UltraMem runs with a memory size in this sweep."))
    for m in a.memory:
        items = [f"backbone {m.backbone}: {m.n_runs} runs"]
        if m.log_linear is not None:
            e = m.log_linear.estimates
            items.append(f"log-linear {m.log_linear.law.formula('M')}: c0 {e['c0'].fmt(4)}, k {e['k'].fmt(4)}")
        if m.power is not None:
            e = m.power.estimates
            items.append(f"power law with floor {m.power.law.formula('M')}: E {e['E'].fmt(4)}, "
                         f"alpha {e['alpha'].fmt(4)}")
        if m.reason:
            items.append(m.reason)
        b.append(("ul", items))
    if "memory_size" in figure_names:
        b.append(("img", "figures/memory_size.png", "UltraMem loss vs memory size at fixed activated size"))
    if a.density:
        b += density_blocks(a, figure_names)
    if a.isoflop is not None:
        b += isoflop_blocks(a.isoflop)
    b.append(("h", 2, "Knowledge capacity"))
    if a.knowledge.empty:
        b.append(("p", "No knowledge probe in these runs (it runs on the embedded corpus only)."))
    else:
        b.append(_table(a.knowledge))
        b.append(("img", "figures/knowledge.png", "Facts recalled vs total parameters per family"))
    if a.bench is not None:
        b.append(("h", 2, "Inference latency"))
        b.append(("img", "figures/latency_vs_batch.png", "Latency per decoding step vs batch size "
                                                          "(benchmarks/results/inference.json)"))
    b.append(("h", 2, "Training curves"))
    b.append(("img", "figures/training_curves.png", "Training and validation loss vs tokens"))
    b.append(("h", 2, "Runs"))
    cols = ["run_id", "family", "active_params", "total_params", "flops", "tokens", "val_loss", "memory_slots",
            "knowledge_recall"]
    b.append(_table(runs[cols]))
    return b


FIT_COLUMNS = ("val_loss", *SCALING_AXES)  # what the family laws read (analysis.compare.usable)


def excluded_rows(runs: pd.DataFrame) -> list[str]:
    """'run_id (reason)' for each row some family law leaves out (analysis.compare.usable): a state other than
    done, or a validation loss or scaling axis that is not a positive, finite number (NaN, inf, a diverged run)."""
    out = []
    for i in range(len(runs)):
        row = runs.iloc[i]
        reasons = []
        state = row.get("state")
        if isinstance(state, str) and state != "done":
            reasons.append(f"state {state}")
        for col in FIT_COLUMNS:
            value = pd.to_numeric(pd.Series([row.get(col)]), errors="coerce").iloc[0]
            if not (np.isfinite(value) and value > 0):
                reasons.append(f"{col} is {row.get(col)}")
        if reasons:
            out.append(f"{row.get('run_id')} ({', '.join(reasons)})")
    return out


def fit_summary(a: Analysis) -> list[str]:
    """Console lines: the rows each family law used, per axis, and the rows left out with the reason."""
    runs = a.collected.runs
    lines = []
    for x in SCALING_AXES:
        used = ", ".join(f"{fam} {ff.n_runs}" for fam, ff in a.scaling[x].items())
        lines.append(f"fit loss vs {x}: rows used per family: {used or 'none'} (of {len(runs)} rows)")
    excluded = excluded_rows(runs)
    if excluded:
        lines.append(f"left out of the fits ({len(excluded)} rows): {'; '.join(excluded)}")
    return lines


def density_blocks(a: Analysis, figure_names: list[str]) -> list[tuple]:
    """The activation-density section (only when some memory family has >= 2 densities at one total size)."""
    pct = f"{a.level:.0%}"
    b: list[tuple] = [("h", 2, "Activation density: loss vs memory values read per token")]
    b.append(("p", "Values per token v = heads × top-m × memory layers: the value rows one token reads. Each row "
                   "below is one memory family at one total parameter count (3 significant figures) and backbone, "
                   "across densities; the slope b of L = c0 + b·ln v is fitted from >= 3 densities (b < 0: reading "
                   f"more values lowers the loss), with a {pct} bootstrap interval over runs, and b·ln 4 is the loss "
                   "change from 4× the values per token."))
    rows = []
    for law in a.density:
        slope = law.slope
        rows.append({"family": law.family, "total params": f"{law.total_params:.3g}", "backbone": law.backbone,
                     "values per token": ", ".join(f"{d:g}" for d in law.densities), "runs": law.n_runs,
                     "slope b = dL/d ln v": slope.fmt(3) if slope is not None else law.reason,
                     "loss change, 4× v": scale_estimate(slope, math.log(4)).fmt(3) if slope is not None else "—"})
    b.append(_table(pd.DataFrame(rows)))
    b.append(("h", 3, "Density vs total sparse parameters (UltraMemV2's finding)"))
    b.append(("p", "UltraMemV2 (arXiv 2508.18756, §4.1): activation density (top-m) matters more than total sparse "
                   "parameters (top-768 at 60B total beats top-256 at 120B). Measured here as the loss change from "
                   "4× values per token at fixed total parameters against the loss change from 4× sparse "
                   "parameters at fixed values per token on the same backbone; difference = density − sparse "
                   f"(negative: density helps more), {pct} interval from the two bootstraps."))
    if a.density_comparison is not None:
        b.append(_table(a.density_comparison))
    if "loss_vs_values_per_token" in figure_names:
        b.append(("img", "figures/loss_vs_values_per_token.png", "Validation loss vs memory values read per token "
                                                                 "at fixed total parameters, per memory family"))
    return b


def isoflop_blocks(st: IsoflopStudy) -> list[tuple]:
    """The IsoFLOP study: L(N, D) per family (Approach 3), IsoFLOP parabolas (Approach 2), their cross-check and the
    effective compute multiplier on the frontier. A number the runs do not identify is printed as "not identified"
    with the reason, never as a result."""
    pct = f"{st.level:.0%}"
    b: list[tuple] = [("h", 2, "IsoFLOP study: L(N, D) per family and the compute-optimal frontier")]
    b.append(("p", "Compute C is the project's training FLOPs (the `flops` column: ultramem.accounting's FLOPs per "
                   "token, attention and head included, times the tokens D), not 6ND; runs within 10% of each other "
                   "in C share a budget. The independent unit is a size and seed: a WSD trunk with its cooldown "
                   "branches (which share its initialisation, data order and every step before the branch), or the "
                   "stand-alone runs of that seed; every bootstrap draws these units whole, across budgets "
                   f"({pct} percentile intervals), and refits each resample of L(N, D) from several starts (the "
                   "point estimate, floors E at 25-90% of the lowest loss, the best grid starts), keeping its best "
                   "fit. A number whose interval is unreliable, too wide, or whose fit sits at a bound is printed "
                   "as \"not identified\"."))
    b.append(("h", 3, "Approach 3: L(N, D) = E + A/N^α + B/D^β per family"))
    rows = []
    for fam in st.families.values():
        row: dict[str, Any] = {"family": fam.family, "runs": len(fam.points),
                               "(N, D) points": fam.points["cluster"].nunique(), **seed_spread(fam.points)}
        if fam.lnd is None:
            row.update({"law": f"not identified ({fam.why3})"})
        else:
            row["law"] = fam.lnd.law.formula()
            for name, label in (("E", "E"), ("alpha", "α"), ("beta", "β"), ("a", "a = β/(α+β)"),
                                ("b", "b = α/(α+β)")):
                row[label] = fmt_identified(fam.lnd.estimates[name], lnd_why(fam, name))
        rows.append(row)
    b.append(_table(pd.DataFrame(rows).fillna("—")))
    b += profile_blocks(st)
    b.append(("p", "Training FLOPs per token F(N) = k·N^p fitted per family to its runs: "
                   + "; ".join(f"{f.family} {f.flops_law.formula('N', 'F')}" for f in st.families.values()) + "."))
    b.append(("h", 3, "Approach 2: IsoFLOP parabolas"))
    for fam in st.families.values():
        if fam.optima is None:
            b.append(("p", f"{fam.family}: no IsoFLOP frontier: {fam.why2}."))
            continue
        opt = fam.optima.rename(columns={"flops": "budget C", "n_star": "N*", "d_star": "D*", "loss_star": "L*",
                                         "n_points": "runs", "n_sizes": "sizes"})
        b.append(("p", f"{fam.family}:"))
        b.append(_table(opt))
        if fam.frontier is not None:
            b.append(("p", f"{fam.family} frontier: {fam.frontier['n'].formula('C', 'N*')}, "
                           f"{fam.frontier['d'].formula('C', 'D*')}; a = "
                           f"{fmt_identified(fam.approach2.get('a'), approach2_why(fam, 'a'))}, b = "
                           f"{fmt_identified(fam.approach2.get('b'), approach2_why(fam, 'b'))}."))
        else:
            b.append(("p", f"{fam.family}: no frontier: {fam.why2}."))
    b.append(("img", "figures/isoflop_profiles.png", "IsoFLOP profiles per family: loss vs N at each budget, "
                                                     "parabolas in ln N and their vertices"))
    b.append(("h", 3, "Approach 2 vs Approach 3"))
    b.append(("p", "The exponents of N*(C) and D*(C) from the IsoFLOP vertices beside those of the L(N, D) fit's "
                   "frontier over the same budgets (the minimum of L(N, C/F(N)) over N, found numerically since F "
                   "is not proportional to N; with F = 6N they are a = β/(α+β) and b = α/(α+β))."))
    b.append(_table(st.comparison))
    b.append(("img", "figures/compute_optimal_frontier.png", "Compute-optimal N*(C) (IsoFLOP vertices and both "
                                                             "fits) and the loss on each family's frontier"))
    b.append(("h", 3, "Effective compute multiplier on the frontier"))
    b.append(("p", "M(C) = C_ref(L*_f(C)) / C: the compute the reference family (`over`) needs on its L(N, D) "
                   "frontier to reach the loss family f reaches at compute C on its own frontier, at each of f's "
                   "budgets; M > 1 means f is ahead. The interval pairs the two families' bootstrap refits."))
    m = st.multipliers
    if m.empty:
        b.append(("p", "Not available: needs dense and another family with a D axis."))
    else:
        out = pd.DataFrame({"family": m["family"], "over": m["over"], "budget C": m["budget C"],
                            "L* (family)": m["L* (family)"],
                            "M": [r.status if r.status != "identified" else
                                  Estimate(r.M, r.lo, r.hi).fmt(3) for r in m.itertuples()]})
        b.append(_table(out))
    if st.sampled is not None and not st.sampled.empty:
        b.append(("h", 3, "Lowest sampled loss per budget (no fitted law)"))
        b.append(("p", "At each budget, each family's lowest loss over the sizes it trained (the mean of that point's "
                       "seeds) against the reference family's at the same budget: ΔL = L(family) − L(over), "
                       "ΔL < 0 means the family is lower. The interval redraws each point's seeds (the two families "
                       "independently) and carries seed noise only. A sampled minimum is an upper bound on the "
                       "frontier loss, loosest where it sits at the smallest or largest size tried (column `edge`); "
                       "it needs no fitted E, α or β, so it checks the frontier multipliers above without their "
                       "law."))
        sm = st.sampled
        b.append(_table(pd.DataFrame({
            "family": sm["family"], "over": sm["over"], "budget C": sm["budget C"], "N (family)": sm["N (family)"],
            "L (family)": sm["L (family)"], "N (over)": sm["N (over)"], "L (over)": sm["L (over)"],
            "ΔL": [Estimate(r.dL, r.lo, r.hi).fmt(3) for r in sm.itertuples()], "edge": sm["edge"]})))
    b.append(("img", "figures/lnd_slices.png", "L(N, D) slices per family: loss vs tokens at each size, with the "
                                               "fitted law"))
    b += holdout_blocks(st)
    return b


def holdout_blocks(st: IsoflopStudy) -> list[tuple]:
    """Each family's L(N, D) refitted without its largest budget, then without its largest size, predicting the
    held-out points (analysis/holdout.py): predicted vs measured with the prediction interval."""
    hs = [h for f in st.families.values() for h in f.holdouts]
    if not hs:
        return []
    b: list[tuple] = [("h", 3, "Predicting what the law did not see")]
    b.append(("p", "Each family's L(N, D) is refitted as above (Huber, multi-start, trunk-unit bootstrap) without its "
                   "largest budget, and separately without its largest size, and predicts the seed mean of every "
                   "held-out (N, D) point. The interval joins, on each side in quadrature, the refits' percentile "
                   "band at that point and the noise of a k-seed mean (t x pooled seed sd / sqrt(k)). A point "
                   "outside its interval is where the law fails to extrapolate."))
    summary = [{"family": h.family, "held out": h.held_out, "fitted runs": h.fitted_points,
                "points predicted": len(h.table), "inside the interval": (f"{int(h.table['covered'].sum())} of "
                                                                          f"{len(h.table)}" if len(h.table) else "—"),
                "mean |measured − predicted|": f"{h.mean_abs_error:.4f}" if len(h.table) else "—",
                "why not": h.why or ""} for h in hs]
    b.append(_table(pd.DataFrame(summary)))
    rows = pd.concat([h.table for h in hs if len(h.table)], ignore_index=True) if any(len(h.table) for h in hs) \
        else pd.DataFrame()
    if not rows.empty:
        b.append(_table(pd.DataFrame({
            "family": rows["family"], "held out": rows["held out"], "budget C": rows["budget"], "N": rows["n"],
            "D": rows["d"], "seeds": rows["seeds"], "measured": rows["measured"].round(4),
            "predicted": rows["predicted"].round(4), "interval": [f"[{lo:.4f}, {hi:.4f}]" for lo, hi in
                                                                  zip(rows["lo"], rows["hi"], strict=True)],
            "inside": np.where(rows["covered"], "yes", "no")})))
    return b


def profile_blocks(st: IsoflopStudy) -> list[tuple]:
    """The profile of L(N, D) over its floor E: α, β (and a, b) with E held at fractions of the lowest loss, and
    the range of each over the floors a likelihood ratio admits (analysis.chinchilla.profile_over_e)."""
    fams = [f for f in st.families.values() if f.profile is not None and not f.profile.empty]
    if not fams:
        return []
    b: list[tuple] = [("h", 4, "Profile over the floor E")]
    b.append(("p", "α and β trade against the floor E: with E fitted at ~0, β is the local slope of L in D over the "
                   "tokens tried, not an exponent towards an irreducible loss. Each row refits the law with E held "
                   "at a fraction of the family's lowest loss; `ratio` is its Σ Huber over the best row's. A floor "
                   f"is admitted at {st.level:.0%} when 2·n·ln(Σ|r| / min Σ|r|) <= χ²₁ (a Laplace likelihood of the "
                   "log loss, which Huber with δ = 1e-3 nearly is, with n the number of independent units, not "
                   "runs); the profile interval of an exponent is its range over the admitted floors."))
    rows = []
    for fam in fams:
        ranges = {k: profile_interval(fam, k) for k in ("alpha", "beta", "a", "b")}
        admitted = fam.profile.loc[fam.profile["admitted"], "E"]
        rows.append({"family": fam.family, "units": int(fam.points["unit"].nunique()),
                     "E admitted": f"[{admitted.min():.3g}, {admitted.max():.3g}]" if len(admitted) else "none",
                     **{f"{k} (profile)": f"[{r[0]:.3g}, {r[1]:.3g}]" if r else "—" for k, r in ranges.items()}})
    b.append(_table(pd.DataFrame(rows)))
    long = pd.concat([f.profile.assign(family=f.family) for f in fams])
    b.append(_table(pd.DataFrame({
        "family": long["family"], "E / min L": long["floor"], "E": long["E"], "ratio": long["ratio"].round(3),
        "admitted": np.where(long["admitted"], "yes", "no"), "α": long["alpha"], "β": long["beta"],
        "a": long["a"], "b": long["b"]})))
    return b


def seed_spread(points: pd.DataFrame) -> dict[str, str]:
    """How far apart the seeds of one (N, D) point land: seeds per point and the median / largest sd of the loss
    over a point's seeds (sample sd), over the points with >= 2 seeds."""
    g = points.groupby("cluster")["loss"]
    sd = g.std(ddof=1).dropna()
    seeds = g.size()
    if sd.empty:
        return {"seeds per point": f"{seeds.min()}", "seed sd (median, max)": "—"}
    k = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    return {"seeds per point": k, "seed sd (median, max)": f"{sd.median():.3f}, {sd.max():.3f}"}


def isoflop_json(st: IsoflopStudy) -> dict[str, Any]:
    records = lambda df: json.loads(df.to_json(orient="records"))
    fams = {}
    for fam in st.families.values():
        lnd = None
        if fam.lnd is not None:
            lnd = {**fam.lnd.to_dict(), "formula": fam.lnd.law.formula(), "params": fam.lnd.law.params(),
                   "not_identified": {k: lnd_why(fam, k) for k in fam.lnd.estimates if lnd_why(fam, k)}}
        fams[fam.family] = {
            "runs": len(fam.points), "points": int(fam.points["cluster"].nunique()),
            "flops_per_token": fam.flops_law.params(), "lnd": lnd, "lnd_reason": fam.why3,
            "optima": records(fam.optima) if fam.optima is not None else [],
            "frontier": {k: v.params() for k, v in fam.frontier.items()} if fam.frontier else None,
            "approach2": {k: v.to_dict(full=True) for k, v in fam.approach2.items()},
            "approach2_reason": fam.why2,
            "approach2_not_identified": {k: approach2_why(fam, k) for k in ("a", "b") if approach2_why(fam, k)},
            "units": int(fam.points["unit"].nunique()),
            "profile_over_E": records(fam.profile) if fam.profile is not None else [],
            "profile_intervals": {k: profile_interval(fam, k) for k in ("alpha", "beta", "a", "b")},
            "holdouts": [{"held_out": h.held_out, "fitted_points": h.fitted_points, "why": h.why,
                          "coverage": h.coverage, "mean_abs_error": h.mean_abs_error,
                          "points": records(h.table)} for h in fam.holdouts]}
    sampled = records(st.sampled) if st.sampled is not None else []
    return {"families": fams, "comparison": records(st.comparison), "multipliers": records(st.multipliers),
            "sampled_minima": sampled}


def fits_json(a: Analysis) -> dict[str, Any]:
    def law(fit: LawFit | None) -> dict[str, Any] | None:
        if fit is None:
            return None
        return {**fit.to_dict(), "formula": fit.law.formula(), "params": fit.law.params()}

    scaling = {x: {f: {"n_runs": ff.n_runs, "reason": ff.reason, "fit": law(ff.fit)} for f, ff in fits.items()}
               for x, fits in a.scaling.items()}
    memory = [{"backbone": m.backbone, "x": m.x, "n_runs": m.n_runs, "reason": m.reason,
               "log_linear": law(m.log_linear), "power": law(m.power)} for m in a.memory]
    records = lambda df: json.loads(df.to_json(orient="records"))
    extra = {}
    if a.isoflop is not None:  # only with a D axis, so that the fits.json of other sweeps keep their bytes
        extra["isoflop"] = isoflop_json(a.isoflop)
    if a.density:  # only when there is a density axis, so that the fits.json of other sweeps keep their bytes
        extra["density"] = {
            "laws": [{"family": d.family, "total_params": d.total_params, "backbone": d.backbone, "n_runs": d.n_runs,
                      "values_per_token": d.densities, "reason": d.reason, "log_linear": law(d.fit),
                      "slope": d.slope.to_dict() if d.slope is not None else None} for d in a.density],
            "vs_sparse": records(a.density_comparison) if a.density_comparison is not None else []}
    return {**extra, "level": a.level, "solver": a.solver, "scaling": scaling, "exponent_differences": records(a.differences),
            "compute_multiplier": {"summary": records(a.multiplier.summary),
                                   "points": records(a.multiplier.points)},
            "memory": memory, "knowledge": records(a.knowledge), "claims": a.claims}


# ---- entry point ----------------------------------------------------------------------------------------------------


def default_out_dir(runs_dir: str | Path) -> Path:
    runs_dir = Path(runs_dir).absolute()
    return runs_dir.parent / f"{runs_dir.name}_report"


def build_report(source: str | Path | Sequence[str | Path], out_dir: str | Path | None = None, *, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95, bench: str | Path | None = None, title: str | None = None,
                 solver: str = "lsq", log: Any = None) -> Path:
    """Collect `source` (runs directory or saved runs table, or several: merged, a run id found twice taken from the
    later source), analyse, write figures, tables and the report.

    bench: the inference benchmark JSON; default `<out_dir>/inference.json` if present, else the repository's
    benchmarks/results/inference.json (copied into out_dir so that the report can be regenerated exactly).
    log: called with each line of `fit_summary` (the rows each fit used and the ones left out), e.g. print.
    Returns the path of report.md.
    """
    sources = [Path(s) for s in ([source] if isinstance(source, str | Path) else source)]
    if not sources:
        raise FitError("no source to analyse: give a runs directory or a runs table")
    first = sources[0]
    name = first.stem if first.is_file() else first.name
    if out_dir is None and len(sources) > 1:
        raise FitError("several sources: give --out, the folder the merged tables and the report go to")
    out = Path(out_dir) if out_dir is not None else (first.parent if first.is_file() else default_out_dir(first))
    collected, notes = merge_collected([(str(s), load_collected(s)) for s in sources])
    for line in notes if log is not None else []:
        log(line)
    if collected.runs.empty:  # before creating `out`: a failed call leaves no empty report folder behind
        raise FitError(f"{', '.join(map(str, sources))}: no finished runs (no final.json) to analyse"
                       + (f"; not finished: {', '.join(collected.skipped)}" if collected.skipped else ""))
    in_place = len(sources) == 1 and first.is_file() and first.parent.resolve() == out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    bench_path = Path(bench) if bench is not None else (
        out / "inference.json" if (out / "inference.json").exists() else DEFAULT_BENCH)
    bench_df = read_inference_benchmark(bench_path)
    if bench_df is not None and bench_path.resolve() != (out / "inference.json").resolve():
        shutil.copyfile(bench_path, out / "inference.json")
    if not in_place:
        save_collected(collected, out)
        # analyse what was just written, so that re-running on the saved tables reproduces every figure exactly
        collected = Collected(*_reload(out), collected.skipped)
    a = analyse(collected, n_boot=n_boot, seed=seed, level=level, bench=bench_df, solver=solver)
    for line in fit_summary(a) if log is not None else []:
        log(line)
    figs = figures(a)
    for stem, fig in figs.items():
        plots.save(fig, out / "figures", stem)
    (out / "fits.json").write_text(json.dumps(_finite(fits_json(a)), indent=2, sort_keys=True, allow_nan=False,
                                              default=_json_default) + "\n")
    sweeps = sorted({str(s) for s in collected.runs["sweep"].dropna()}) if "sweep" in collected.runs else []
    title = title or f"Scaling report: {', '.join(sweeps) or name}"
    blocks = report_blocks(a, title, list(figs))
    (out / "report.md").write_text(render_markdown(blocks))
    (out / "report.html").write_text(render_html(blocks, title))
    return out / "report.md"


def _reload(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    saved = load_collected(out / "runs.csv")
    return saved.runs, saved.curves


def _finite(o: Any) -> Any:
    """JSON has no inf/nan: an unbounded interval end or an undefined value is written as null."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    if isinstance(o, float | np.floating) and not math.isfinite(float(o)):
        return None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
