"""Grid expansion: a sweep file -> its points (the swept values and the run-config mapping each makes), in a stable
order. The grid (or the zipped `list`), then the conditional blocks in order, then the seeds."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from experiments.sweep.schema import ParamSpec, SweepFile
from ultramem.config import ConfigError, deep_merge, expand_dotted
from ultramem.presets import get_preset


def _grid(params: dict[str, ParamSpec], method: str) -> list[dict[str, Any]]:
    keys = list(params)
    axes = [params[k].choices() for k in keys]
    if method == "list":
        n = max(len(a) for a in axes)
        return [{k: (a[i] if len(a) == n else a[0]) for k, a in zip(keys, axes, strict=True)} for i in range(n)]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]


@dataclass
class Point:
    """One grid point before resolution: the swept values (dotted keys) and the run-config mapping they make."""

    index: int
    values: dict[str, Any]
    config: dict[str, Any]
    preset: str | None


def expand(sweep: SweepFile, base: dict[str, Any], source: str = "<sweep>") -> list[Point]:
    """Grid (or zipped list) x conditional blocks x seeds -> run-config mappings, in a stable order.

    method isoflop: the ladder's presets are a grid axis (one point per size; experiments/sweep/plan.py gives each
    its budgets)."""
    if sweep.isoflop is not None or sweep.lr_scan is not None:
        ladder = {"model.preset": ParamSpec(values=list((sweep.isoflop or sweep.lr_scan).ladder))}
        points = _grid({**ladder, **sweep.parameters}, "grid")
    else:
        points = _grid(sweep.parameters, sweep.method)
    for block in sweep.conditional:
        grown: list[dict[str, Any]] = []
        for p in points:
            if matches(block.when, p, base, sweep):
                grown.extend({**p, **q} for q in _grid(block.parameters, "grid"))
            else:
                grown.append(p)
        points = grown
    if sweep.seeds is not None:
        points = [{**p, "seed": s} for p in points for s in sweep.seeds]
    if not points:
        raise ConfigError(f"{source}: the sweep expands to no runs")
    blocks = [sweep.parameters, *(c.parameters for c in sweep.conditional)]
    axes = {k for params in blocks for k, spec in params.items() if len(spec.choices()) > 1} | {"seed"}
    return [_point(i, p, sweep, base, axes) for i, p in enumerate(points)]


def _point(index: int, values: dict[str, Any], sweep: SweepFile, base: dict[str, Any], axes: set[str]) -> Point:
    cfg = deep_merge(base, expand_dotted(values))
    model = dict(cfg.get("model") or {})
    preset = model.get("preset")
    if isinstance(preset, str) and preset in sweep.presets:  # (anything else: RunConfig validation names it)
        local = expand_dotted(sweep.presets[preset])
        model.pop("preset")
        model = deep_merge(local, model)
    cfg["model"] = model
    cfg["sweep"] = sweep.name
    if sweep.wandb is not None:
        cfg["wandb"] = deep_merge(cfg.get("wandb") or {}, sweep.wandb.model_dump(exclude_unset=True))
    cfg.setdefault("name", _run_name({k: v for k, v in values.items() if k in axes}, preset, model))
    return Point(index, values, cfg, preset)


def _run_name(values: dict[str, Any], preset: str | None, model: dict[str, Any]) -> str:
    """The preset (or family), then the swept axes: 'ultramem-t2-x6-num_keys=64-top_m=8-s0'; a swept data source
    by its short label ('dense-t1-source=tinyshakespeare-s0'). Names are labels: run ids do not hash them."""
    parts = [str(preset or model.get("family", "run"))]
    for key, value in values.items():
        if key == "model.preset":
            continue
        if key == "data.source":
            value = source_label(value)
        parts.append(f"s{value}" if key == "seed" else f"{key.rsplit('.', 1)[-1]}={value}")
    return "-".join(parts)


def source_label(source: Any) -> str:
    """A data source in a run name: a file's or folder's stem ('../shared/data/tinyshakespeare.txt' ->
    'tinyshakespeare'), a hub dataset's name ('hf:roneneldan/TinyStories' -> 'TinyStories'), a glob's folder
    ('data/*.txt' -> 'data'); the embedded corpora ('embedded', 'embedded:...') as they are."""
    text = str(source)
    if text.startswith("embedded"):
        return text
    path = PurePath(text.removeprefix("hf:").replace("\\", "/"))
    return (path.parent.name if any(c in path.stem for c in "*?[") else path.stem) or text


def describe(values: dict[str, Any]) -> str:
    """A point's swept values for error messages: 'model.preset=dense-t1, seed=0'."""
    return ", ".join(f"{k}={v}" for k, v in values.items())


# ---- predicates (`when` of conditional blocks and resource rules) ----------------------------------------------


def matches(when: dict[str, Any], values: dict[str, Any], base: dict[str, Any], sweep: SweepFile) -> bool:
    """Whether the point with swept `values` matches `when` (dotted key -> value, or a list of accepted values)."""
    for key, want in when.items():
        have = _lookup(values, base, sweep, key)
        if isinstance(want, list) and not isinstance(have, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def _lookup(values: dict[str, Any], base: dict[str, Any], sweep: SweepFile, key: str) -> Any:
    """The value of a dotted key at a grid point: swept value, else base, else the preset's (for model.*)."""
    if key in values:
        return values[key]
    found, value = _dig(base, key.split("."))
    if found:
        return value
    parts = key.split(".")
    if parts[0] != "model":
        return None
    preset = values.get("model.preset", (base.get("model") or {}).get("preset"))
    model = _preset_model(preset, sweep)
    if model is None:
        return None
    return _dig(model, parts[1:])[1]


def _dig(d: Any, parts: list[str]) -> tuple[bool, Any]:
    for p in parts:
        if not isinstance(d, dict) or p not in d:
            return False, None
        d = d[p]
    return True, d


def _preset_model(preset: str | None, sweep: SweepFile) -> dict[str, Any] | None:
    """A preset's model fields as a dict (sweep-local presets first, then ultramem.presets)."""
    if preset is None:
        return None
    if preset in sweep.presets:
        local = expand_dotted(sweep.presets[preset])
        inner = _preset_model(local.get("preset"), sweep) or {}
        return deep_merge(inner, {k: v for k, v in local.items() if k != "preset"})
    return get_preset(preset).to_dict()
