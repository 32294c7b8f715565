"""Log a sweep's analysis (the folder `ultramem plots` writes) to W&B, where the team already looks at its runs.

`ultramem plots SWEEP --wandb` calls `log_analysis` after writing the report. It opens one W&B run of job_type
`analysis` in the project, entity and group of the sweep's runs (their config.yaml `wandb` block; a saved runs.csv:
the default project and its `sweep` column), and logs:
  - every figure (figures/*.png) as an image under `figures/<name>`;
  - the runs table (runs.csv) as the table `runs`, the fitted laws (fits.json `scaling`: one row per x-axis and
    family, each parameter with its interval) as `fits`, and every other list of records in fits.json (claims,
    compute multipliers, IsoFLOP optima, ...) as `fits/<path>`;
  - the report (report.html) as HTML under `report`, and the whole folder (report.md/.html, fits.json, runs.csv,
    curves.csv, figures/) as the artifact `<group>-analysis` of type `analysis`.

Re-logging versions, it does not duplicate: the W&B run id is a function of the group (`<group>-analysis`), so a
second call resumes the same run (its summary, tables and images show the latest analysis) and the artifact gets a
new version (v0, v1, ..., alias `latest`; W&B keeps one version for identical files). Offline mode
($WANDB_MODE=offline) writes `<report>/wandb/offline-run-*`, which `wandb sync` uploads later.

Only the report folder and the run folders' config.yaml are read; nothing read is executed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from runfolder import RecordError, iter_run_dirs

DEFAULT_PROJECT = "ultramem-scaling"  # experiments/config.py WandbConfig.project (analysis does not import it)


def target(source: str | Path, runs: pd.DataFrame | None = None) -> dict[str, Any]:
    """project, entity, group and the configured mode of the runs analysed from `source` (a runs directory or a
    saved runs table)."""
    source = Path(source)
    if source.is_dir():
        for rd in iter_run_dirs(source):
            try:
                cfg = rd.read_config() or {}
            except RecordError:
                continue
            wb = cfg.get("wandb") or {}
            return {"project": wb.get("project") or DEFAULT_PROJECT, "entity": wb.get("entity"),
                    "group": wb.get("group") or cfg.get("sweep") or source.name, "mode": wb.get("mode")}
    sweeps = sorted({str(s) for s in runs["sweep"].dropna()}) if runs is not None and "sweep" in runs else []
    return {"project": DEFAULT_PROJECT, "entity": None, "group": "+".join(sweeps) or source.stem, "mode": None}


def run_id(group: str) -> str:
    """The analysis run's W&B id: one per group, so that a re-log resumes it (W&B ids: letters, digits, - and _)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", group)[:100] + "-analysis"


def fit_tables(fits: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """fits.json as tables: `fits` (the scaling laws) and `fits/<path>` for every list of records in it."""
    tables: dict[str, list[dict[str, Any]]] = {"fits": _law_rows(fits.get("scaling") or {})}
    _collect_lists(fits, "fits", tables)
    out = {}
    for name, rows in tables.items():
        columns = list(dict.fromkeys(k for row in rows for k in row))
        out[name] = (columns, [[_cell(row.get(c)) for c in columns] for row in rows])
    return out


def _law_rows(scaling: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for x, families in scaling.items():
        for family, entry in (families or {}).items():
            fit = entry.get("fit") or {}
            row = {"x": x, "family": family, "n_runs": entry.get("n_runs"), "law": fit.get("law"),
                   "formula": fit.get("formula"), "n_points": fit.get("n_points"), "level": fit.get("level"),
                   "reason": entry.get("reason") or fit.get("note") or ""}
            for name, est in (fit.get("estimates") or {}).items():
                row.update({name: est.get("value"), f"{name}_lo": est.get("lo"), f"{name}_hi": est.get("hi"),
                            f"{name}_reliable": est.get("reliable", True)})
            rows.append(row)
    return rows


def _collect_lists(node: Any, path: str, tables: dict[str, list[dict[str, Any]]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "scaling" or path != "fits":
                _collect_lists(value, f"{path}/{key}", tables)
    elif isinstance(node, list) and node and all(isinstance(r, dict) for r in node):
        tables[path] = [_flat(r) for r in node]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _cell(v: Any) -> Any:
    """A table cell W&B takes: numbers, strings, booleans and None as they are; lists as JSON text."""
    return json.dumps(v) if isinstance(v, list | tuple) else v


def log_analysis(report_dir: str | Path, source: str | Path, mode: str | None = None) -> str:
    """Log the analysis in `report_dir` (written by analysis.report.build_report from `source`) as one W&B run;
    returns where it went (the run's URL, or its offline directory). mode: $WANDB_MODE, else `mode`, else the runs'
    configured mode unless disabled, else online. Raises whatever W&B raises (the caller reports it)."""
    import wandb  # lazy: only with --wandb

    out = Path(report_dir)
    runs = pd.read_csv(out / "runs.csv")
    where = target(source, runs)
    mode = os.environ.get("WANDB_MODE") or mode or (where["mode"] if where["mode"] != "disabled" else None) \
        or "online"
    run = wandb.init(project=where["project"], entity=where["entity"], group=where["group"], job_type="analysis",
                     id=run_id(where["group"]), name=f"{where['group']} analysis", resume="allow", dir=str(out),
                     mode=mode, config={"source": str(source), "runs": len(runs)},
                     settings=wandb.Settings(console="off", silent=True, save_code=False))
    try:
        payload: dict[str, Any] = {f"figures/{p.stem}": wandb.Image(str(p))
                                   for p in sorted((out / "figures").glob("*.png"))}
        payload["runs"] = wandb.Table(dataframe=runs, allow_mixed_types=True)
        fits = json.loads((out / "fits.json").read_text())
        for name, (columns, rows) in fit_tables(fits).items():
            payload[name] = wandb.Table(columns=columns, data=rows, allow_mixed_types=True)
        if (out / "report.html").exists():
            payload["report"] = wandb.Html((out / "report.html").read_text())
        run.log(payload)
        artifact = wandb.Artifact(run_id(where["group"]), type="analysis",
                                  description=f"ultramem plots of {where['group']}: report, fits, runs, figures")
        for p in sorted(out.rglob("*")):
            if p.is_file() and "wandb" not in p.relative_to(out).parts:
                artifact.add_file(str(p), name=str(p.relative_to(out)))
        run.log_artifact(artifact, aliases=["latest"])
        where_to = run.url if mode == "online" else str(Path(run.dir).parent)
    finally:
        run.finish()
    return where_to
