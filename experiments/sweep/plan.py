"""Planning: every point of a sweep resolved (`experiments.resolve`), counted (`ultramem.accounting`), given its
resources (`resources.default` + rules) and priced and checked against its GPUs (`experiments.pricing`).

Fast and torch-free: a 1,000-run sweep plans in about a second (benchmarks/bench_scheduler.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from experiments import hparams, pricing
from experiments.config import (
    branch_config,
    branch_points,
    canonical_json,
    format_validation_error,
    run_config_from_dict,
    run_id,
)
from experiments.resolve import resolve_run_config
from experiments.sweep.grid import Point, describe, expand, matches
from experiments.sweep.isoflop import Cell, IsoflopSpec, Layout, Size, layout, refuse_method_keys
from experiments.sweep.lr_scan import lr_points
from experiments.sweep.schema import Resources, SweepFile, load_sweep, runs_dir
from ultramem.accounting import count_params, flops_per_token
from ultramem.config import ConfigError, ModelConfig, deep_merge


@dataclass
class PlannedRun:
    """One run of a sweep: identity, the resolved config, size, cost and resources."""

    index: int
    run_id: str
    name: str
    values: dict[str, Any]  # the swept values that made this run (dotted keys)
    config: dict[str, Any]  # the resolved RunConfig as plain data (what config.yaml holds)
    family: str
    preset: str | None
    total_params: int
    active_params: int
    non_embedding_params: int
    tokens: int
    flops_per_token: float
    resources: Resources
    strategy: str = "single"  # ParallelLayout.describe(): 'mp-dim8+fsdp', 'ddp', ...
    memory_per_gpu_gb: float | None = None  # ultramem.accounting.train_memory, for runs with GPUs
    branch_of: str | None = None  # a cooldown branch: its trunk's run id
    branch_step: int = 0  # a branch: the trunk step it starts from (the first step of its cooldown)

    @property
    def flops(self) -> float:
        """Training FLOPs of the run as a data point (a branch: as if trained on its own from step 0)."""
        return self.flops_per_token * self.tokens

    @property
    def steps(self) -> int:
        return int(self.config["train"]["steps"])

    @property
    def trained_flops(self) -> float:
        """FLOPs this run trains itself: a branch only its cooldown, the rest is its trunk's."""
        return self.flops * (self.steps - self.branch_step) / self.steps

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.active_params if self.active_params else float("nan")

    def gpu_hours(self, gpu: str, mfu: float) -> float:
        return pricing.gpu_hours(self.trained_flops, gpu, mfu)

    def fits(self) -> bool:
        """False when the estimated memory per GPU (runs with GPUs) exceeds the usable part of its GPUs."""
        need = self.memory_per_gpu_gb
        return not (need is not None and need > pricing.usable_gb(self.resources.gpu_memory_gb))

    def row(self) -> dict[str, Any]:
        out = {
            "run_id": self.run_id, "name": self.name, "family": self.family, "preset": self.preset,
            "total_params": self.total_params, "active_params": self.active_params,
            "non_embedding_params": self.non_embedding_params, "tokens": self.tokens,
            "flops_per_token": self.flops_per_token, "flops": self.flops, "trained_flops": self.trained_flops,
            "tokens_per_param": self.tokens_per_param, "branch_of": self.branch_of, "branch_step": self.branch_step,
        }
        for column, gpu, mfu in pricing.price_columns():
            out[column] = self.gpu_hours(gpu, mfu)
        out["strategy"] = self.strategy
        out["memory_per_gpu_gb"] = self.memory_per_gpu_gb
        out["resources"] = self.resources.model_dump()
        out["values"] = self.values
        return out


@dataclass
class Plan:
    path: Path
    sweep: SweepFile
    runs_dir: Path
    runs: list[PlannedRun] = field(default_factory=list)
    isoflop: Layout | None = None  # method isoflop: the (size, budget) grid and its warnings

    @property
    def warnings(self) -> list[str]:
        return list(self.isoflop.warnings) if self.isoflop is not None else []

    def only_seeds(self, seeds: list[int]) -> Plan:
        """The same plan with only the runs of `seeds` (a study run in parts; run ids do not change). A branch
        keeps its trunk, which has the branch's seed."""
        known = sorted({int(r.config["seed"]) for r in self.runs})
        if unknown := [s for s in seeds if s not in known]:
            raise ConfigError(f"{self.path}: --seeds {','.join(map(str, unknown))}: not among the seeds of this "
                              f"sweep ({', '.join(map(str, known))}); pick from those or add them to `seeds`")
        return dataclasses.replace(self, runs=[r for r in self.runs if int(r.config["seed"]) in seeds])

    def without_done(self, done: set[str]) -> Plan:
        """The same plan without the runs whose ids are in `done` (finished elsewhere: a study continued in a new
        session from its committed runs table, whose run folders are gone). A trunk is dropped only with all of its
        branches: a branch still to train needs its trunk's checkpoint, so that trunk trains again (its own row in
        the table is then replaced by the new one when the tables are merged)."""
        pending_branches = {r.branch_of for r in self.runs if r.branch_of and r.run_id not in done}
        keep = [r for r in self.runs if r.run_id not in done or r.run_id in pending_branches]
        return dataclasses.replace(self, runs=keep)

    def totals(self) -> dict[str, Any]:
        """Sums over the runs; `flops` and the GPU-hours count what is trained (a branch: its cooldown only).
        With cooldown branches: `branches` and their `trunks`, `independent_flops` (every run trained from step 0)
        and `saved_flops` = independent_flops - flops."""
        out: dict[str, Any] = {"runs": len(self.runs), "tokens": sum(r.tokens for r in self.runs),
                               "flops": sum(r.trained_flops for r in self.runs)}
        for column, gpu, mfu in pricing.price_columns():
            out[column] = sum(r.gpu_hours(gpu, mfu) for r in self.runs)
        branches = [r for r in self.runs if r.branch_of]
        out["branches"] = len(branches)
        out["trunks"] = len({r.branch_of for r in branches})
        out["independent_flops"] = sum(r.flops for r in self.runs)
        out["saved_flops"] = out["independent_flops"] - out["flops"]
        if self.isoflop is not None:  # only for isoflop sweeps, so that other plans keep their JSON
            out["isoflop"] = {"budgets": self.isoflop.budgets, "warnings": self.warnings,
                              "unused": [s.preset for s in self.isoflop.unused],
                              "capped": [{"preset": c.size.preset, "budget": c.budget, "tokens": c.tokens}
                                         for c in self.isoflop.capped]}
        return out


def plan_sweep(path: str | Path) -> Plan:
    """Expand, resolve and price every run of a sweep file. Fast (no torch, no data); errors name file and field."""
    path = Path(path)
    sweep, base = load_sweep(path)
    plan = Plan(path=path, sweep=sweep, runs_dir=runs_dir(sweep, Path(path).parent))
    planner = _Planner(sweep, base)
    seen: dict[str, PlannedRun] = {}
    too_big: list[str] = []
    points = expand(sweep, base, str(path))
    budgets: dict[int, list[float]] = {}  # isoflop: point index -> the budgets of its run and its branches
    if sweep.isoflop is not None:
        points, budgets, plan.isoflop = _isoflop_points(points, sweep.isoflop, planner, str(path))
    if sweep.lr_scan is not None:
        points = lr_points(points, sweep.lr_scan, planner.resolve,
                           lambda m, seq: _count(planner.count(m, seq)[0], "active"), str(path))
    for point in points:
        run = planner.plan(point, f"{path} (run {point.index}: {describe(point.values)})")
        if not run.fits():
            too_big.append(pricing.does_not_fit(
                f"run {run.index} ({run.name})", planner.model_config(run.config["model"]), run.config,
                run.resources.nproc, run.resources.gpu_memory_gb, run.memory_per_gpu_gb, run.strategy))
        if run.run_id in seen:
            first = seen[run.run_id]
            raise ConfigError(f"{path}: runs {first.index} ({describe(first.values)}) and {point.index} "
                              f"({describe(point.values)}) resolve to the same run {run.run_id}; the keys that "
                              "differ do not change what is trained (see experiments.config.run_id); drop one")
        seen[run.run_id] = run
        plan.runs.append(run)
        branches = planner.branches(run, f"{path} (run {point.index}: {describe(point.values)}, a branch)")
        for branch, budget in zip(branches, budgets.get(point.index, []), strict=False):
            branch.values["isoflop.budget"] = budget
        for branch in branches:
            seen[branch.run_id] = branch
            plan.runs.append(branch)
    if too_big:
        raise ConfigError(f"{path}: {len(too_big)} run(s) do not fit their GPUs (estimated peak per GPU from "
                          "ultramem.accounting.train_memory, at most "
                          f"{pricing.USABLE_GPU_MEMORY:.0%} of resources.gpu_memory_gb):\n  " + "\n  ".join(too_big))
    check_data_sources(plan)
    return plan


def check_data_sources(plan: Plan) -> None:
    """Before anything trains: every local data source the grid names exists, is readable, holds text the
    trainer can read (UTF-8, not empty or blank; experiments.data.loading) and at least one sequence of its runs'
    longest `train.seq_len`. The embedded corpus is generated and hub datasets ('hf:') are not fetched here."""
    from experiments.config import DataConfig
    from experiments.data.loading import Source, _builder, _expand_local, check_local_files

    longest: dict[str, tuple[int, PlannedRun]] = {}
    for run in plan.runs:
        data = run.config["data"]
        key = canonical_json({k: data.get(k) for k in ("source", "format", "text_field")})
        seq_len = int(run.config["train"]["seq_len"])
        if key not in longest or seq_len > longest[key][0]:
            longest[key] = (seq_len, run)
    for seq_len, run in longest.values():
        cfg = DataConfig.model_validate(run.config["data"])
        src = cfg.source.strip()
        if src == "embedded" or src.startswith("hf:"):
            continue
        where = f"{plan.path} (run {run.index}: {run.name or run.run_id})"
        try:
            files = _expand_local(src)
            check_local_files(Source("local", "", src, {}, _builder(files, cfg.format), files, cfg.text_field), cfg)
            size = sum(os.path.getsize(f) for f in files)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        except OSError as err:
            raise ConfigError(f"{where}: data.source={src!r}: cannot read {err.filename or src} "
                              f"({err.strerror or err}); check the path and its permissions") from None
        if size < seq_len + 1:
            raise ConfigError(f"{where}: data.source={src!r} holds {size} bytes, fewer than one sequence of "
                              f"train.seq_len {seq_len} (+1) tokens; point data.source at more text or lower "
                              "train.seq_len")


_SET_BY_ISOFLOP = ("tokens", "steps", "branches", "branch_of")
_ISOFLOP_RULE = ("batch_size", "lr", "warmup", "beta2")  # what isoflop.hparams: isoflop sets, unless given


def _isoflop_points(points: list[Point], spec: IsoflopSpec, planner: _Planner,
                    path: str) -> tuple[list[Point], dict[int, list[float]], Layout]:
    """One point per size of the ladder (and seed) -> its runs: a WSD trunk at the largest budget it serves with
    the others as cooldown branches (`branches: true`), or one run per budget; then the runs of `isoflop.extra`.
    Returns the points, each point's budgets (its branches' first, ascending, then its own) and the layout of the
    main grid with its warnings."""
    sizes: dict[str, Size] = {}
    for p in points:
        where = f"{path} (run {p.index}: {describe(p.values)})"
        _check_train(p, spec, where)
        if p.preset not in sizes:
            sizes[p.preset] = _size(planner, p, where)
    grid = layout(spec, list(sizes.values()))
    fitted = hparams.load_fitted_rule(Path(path).parent / spec.hparams_file) if spec.hparams_file else None
    for s in sizes.values() if fitted is not None else []:
        factor = hparams.extrapolation(fitted, s.family, s.n) if s.family in fitted["families"] else 1.0
        if factor > 1 and grid.served(s.preset):
            grid.warnings.append(f"{s.preset}: LR extrapolated {factor:.3g}x in N beyond the {s.family} law's fitted "
                                 f"range in {spec.hparams_file} (isoflop.hparams_extrapolate: "
                                 f"{spec.hparams_extrapolate:g})")
    out: list[Point] = []
    budgets: dict[int, list[float]] = {}
    for p in points:
        runs = _cell_runs(p, grid.served(str(p.preset)), spec, planner, fitted, path)
        for config, group in runs:
            if len(runs) > 1:
                config["name"] = f"{config.get('name') or p.preset}@C={group[-1].budget:.3g}"
            index = len(out)
            out.append(Point(index, {**p.values, "isoflop.budget": group[-1].budget}, config, p.preset))
            budgets[index] = [c.budget for c in group[:-1]]
    if not out:
        raise ConfigError(f"{path}: isoflop: no size of the ladder serves any budget within tokens_per_param "
                          f"{list(spec.tokens_per_param)}:\n  " + "\n  ".join(grid.warnings))
    taken = {_cell_key(p, c.budget, planner.resolve(p.config, path)["seed"]): "the main grid"
             for p in points for c in grid.served(str(p.preset))}
    families = {s.family for s in sizes.values()}
    for i, entry in enumerate(spec.extra):
        where = f"{path}: isoflop.extra[{i}] ({entry.preset})"
        for p in _preset_points(planner, entry.preset, entry.seeds, path):
            _check_train(p, spec, where)
            size = _size(planner, p, where)
            if size.family not in families:
                raise ConfigError(f"{where}: preset: family {size.family} is not in isoflop.ladder (families "
                                  f"{', '.join(sorted(families))}); add a preset of one of those")
            cells = [Cell(size, c, round(c / size.flops_per_token)) for c in entry.budgets]
            seed = planner.resolve(p.config, where)["seed"]
            for c in cells:
                if spec.max_tokens is not None and c.tokens > spec.max_tokens:
                    raise ConfigError(f"{where}: at budget {c.budget:g} it trains {c.tokens:,} tokens, more than "
                                      f"isoflop.max_tokens ({spec.max_tokens:g}); drop that budget")
                key = _cell_key(p, c.budget, seed)
                if key in taken:
                    raise ConfigError(f"{where}: budget {c.budget:g}, seed {seed} is already a run of "
                                      f"{taken[key]}; drop that budget or seed")
                taken[key] = f"isoflop.extra[{i}]"
            for config, group in _cell_runs(p, cells, spec, planner, fitted, path,
                                            _grid_shortest(p, grid.served(str(p.preset)), spec, planner, path)):
                config["name"] = f"{config.get('name') or p.preset}@C={group[-1].budget:.3g}@extra{i}"
                index = len(out)
                out.append(Point(index, {**p.values, "isoflop.budget": group[-1].budget, "isoflop.extra": i,
                                         "isoflop.why": entry.why}, config, p.preset))
                budgets[index] = [c.budget for c in group[:-1]]
    return out, budgets, grid


def _grid_shortest(p: Point, cells: list[Cell], spec: IsoflopSpec, planner: _Planner, path: str) -> dict[int, int]:
    """batch -> the shortest run (tokens) of the main grid's trunk of that batch for this point's size (none when
    the size is not in the main grid)."""
    if not cells:
        return {}
    seq_len = planner.resolve(p.config, path)["train"]["seq_len"]
    nproc = int((p.config.get("parallel") or {}).get("nproc", 1))
    batch = {c.budget: _cell_batch(spec, c, seq_len, nproc) for c in cells}
    groups = _trunks(cells, batch) if spec.branches else [[c] for c in cells]
    out: dict[int, int] = {}
    for g in groups:
        b = batch[g[-1].budget]
        out[b] = min(out.get(b, g[0].tokens), g[0].tokens)
    return out


def _cell_key(p: Point, budget: float, seed: int) -> tuple[str, float, int, str]:
    """A grid cell: preset, budget, seed and the point's other swept values (a sweep with `parameters` axes lays
    each cell once per combination)."""
    rest = {k: v for k, v in p.values.items() if k not in ("model.preset", "seed")}
    return str(p.preset), budget, seed, canonical_json(rest)


def _check_train(p: Point, spec: IsoflopSpec, where: str) -> None:
    """A point's train block must leave the method's fields to it (and be WSD when the method branches)."""
    train = p.config.get("train") or {}
    refuse_method_keys(train, _SET_BY_ISOFLOP, "isoflop",
                       "isoflop.budgets and the ladder give every run its tokens and branches", where)
    if spec.branches and train.get("schedule", "wsd") != "wsd":
        raise ConfigError(f"{where}: train.schedule is {train['schedule']!r} but isoflop.branches is true "
                          "(cooldown branches of one WSD trunk per size); remove train.schedule or set "
                          "isoflop.branches: false")


def _size(planner: _Planner, point: Point, where: str) -> Size:
    """The rung a point trains: its preset, family, active parameters N and training FLOPs per token F."""
    data = planner.resolve(point.config, where)
    params, fpt = planner.count(data["model"], data["train"]["seq_len"])
    return Size(str(point.preset), data["model"]["family"], _count(params, "active"), fpt)


def _preset_points(planner: _Planner, preset: str, seeds: list[int], path: str) -> list[Point]:
    """The grid points of one preset for `seeds`, expanded as the ladder's are (base, parameters, conditional
    blocks, sweep-local presets), so that an added run is configured as a grid run of that preset would be."""
    sweep = planner.sweep
    assert sweep.isoflop is not None
    one = sweep.model_copy(update={"isoflop": sweep.isoflop.model_copy(update={"ladder": [preset], "extra": []}),
                                   "seeds": seeds})
    return expand(one, planner.base, path)


def _cell_runs(p: Point, cells: list[Cell], spec: IsoflopSpec, planner: _Planner, fitted: Any,
               path: str, shortest: dict[int, int] | None = None) -> list[tuple[dict[str, Any], list[Cell]]]:
    """The run configs of one point over its cells (ascending in budget), each with the cells it serves: WSD
    trunks (the last cell its own, the others cooldown branches) or one run per cell, with the method's tokens and,
    unless `hparams: ladder`, the IsoFLOP rule's hyperparameters (a value the file sets itself wins). The rule's
    warmup depends on the trunk's shortest run: `shortest` (batch -> tokens) gives an extra entry's runs the
    shortest run of the main-grid trunk of their size and batch, so that its added seeds train as the grid's did."""
    seq_len = planner.resolve(p.config, path)["train"]["seq_len"]
    nproc = int((p.config.get("parallel") or {}).get("nproc", 1))
    batch = {c.budget: _cell_batch(spec, c, seq_len, nproc) for c in cells}
    groups = _trunks(cells, batch) if spec.branches else [[c] for c in cells]
    out = []
    for group in groups:
        own = group[-1]
        train = {"tokens": own.tokens}
        if spec.branches:
            train.update(schedule="wsd", branches=[c.tokens for c in group[:-1]])
        if spec.hparams != "ladder":
            short = min(group[0].tokens, (shortest or {}).get(batch[own.budget], group[0].tokens))
            rule = hparams.isoflop_hparams(own.size.n, seq_len, short, nproc, batch[own.budget])
            if fitted is not None:
                rule["lr"] = hparams.fitted_lr(fitted, own.size.family, own.size.n, f"{path}: {own.size.preset}",
                                               spec.hparams_extrapolate)
            given = p.config.get("train") or {}
            train.update({k: v for k, v in rule.items() if given.get(k, "auto") == "auto"})
        out.append((deep_merge(p.config, {"train": train}), group))
    return out


def isoflop_sizes(path: str | Path, presets: list[str]) -> dict[str, Size]:
    """N (active) and F of presets as the isoflop sweep at `path` would train them (its base, parameters, data
    and seq_len), for the presets that resolve there: the rungs `isoflop.extra` can add (analysis/refine.py)."""
    sweep, base = load_sweep(path)
    planner = _Planner(sweep, base)
    out = {}
    for name in presets:
        try:
            out[name] = _size(planner, _preset_points(planner, name, [0], str(path))[0], f"{path}: {name}")
        except ConfigError:
            continue  # not a model this sweep can train (e.g. another vocabulary's preset): not a rung of it
    return out


def _cell_batch(spec: IsoflopSpec, cell: Cell, seq_len: int, nproc: int) -> int | None:
    """The batch (sequences) of one (size, budget) cell under `isoflop.batch: steps`; None: the ladder's."""
    if spec.hparams == "ladder" or spec.batch != "steps":
        return None
    return hparams.steps_batch_size(cell.tokens, seq_len, spec.target_steps, nproc)


def _trunks(cells: list[Cell], batch: dict[float, int | None]) -> list[list[Cell]]:
    """A size's cells (ascending in budget) as WSD trunks: consecutive cells with one batch share a trunk (a
    trunk and its branches take the same steps), so a size whose budgets get different batches has several."""
    out: list[list[Cell]] = []
    for c in cells:
        if out and batch[out[-1][-1].budget] == batch[c.budget]:
            out[-1].append(c)
        else:
            out.append([c])
    return out


def _model_fields(model: dict[str, Any]) -> dict[str, Any]:
    """A resolved model block as ModelConfig fields (the preset name is a label, not a field)."""
    return {k: v for k, v in model.items() if k != "preset"}


class _Planner:
    """Resolves, counts and prices grid points, computing once what seeds and repeated models share."""

    def __init__(self, sweep: SweepFile, base: dict[str, Any]):
        self.sweep, self.base = sweep, base
        self.resolved: dict[str, dict[str, Any]] = {}
        self.models: dict[str, ModelConfig] = {}
        self.counts: dict[tuple[int, int], tuple[Any, float]] = {}

    def plan(self, point: Point, where: str) -> PlannedRun:
        data = self.resolve(point.config, where)
        params, fpt = self.count(data["model"], data["train"]["seq_len"])
        resources = _resources(point, self.sweep, self.base, data, _count(params, "total"), where)
        if resources.nproc != data["parallel"]["nproc"]:
            # torchrun's process count is the run's parallel.nproc too (batch rounding, data sharding)
            data = self.resolve(deep_merge(point.config, {"parallel": {"nproc": resources.nproc}}), where)
        model = data["model"]
        cfg = self.model_config(model)
        try:
            layout = pricing.check_run_layout(cfg, data, resources.nproc)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        return PlannedRun(
            index=point.index, run_id=run_id(data), name=data.get("name") or "", values=point.values,
            config=data, family=model["family"], preset=point.preset, total_params=_count(params, "total"),
            active_params=_count(params, "active"), non_embedding_params=_count(params, "non_embedding"),
            tokens=int(data["train"]["tokens"]), flops_per_token=fpt, resources=resources,
            strategy=layout.describe(),
            memory_per_gpu_gb=pricing.memory_gb(cfg, data, resources.nproc) if resources.gpus >= 1 else None,
        )

    def branches(self, trunk: PlannedRun, where: str) -> list[PlannedRun]:
        """The cooldown branches of a WSD trunk (`train.branches`), each a run of its own right after it."""
        out = []
        for tokens, _steps, step in branch_points(trunk.config["train"]):
            data = branch_config(trunk.config, tokens)
            data["name"] = f"{trunk.name}@{tokens / trunk.active_params:.3g}xN" if trunk.name else None
            resolved = self.resolve(data, where)  # validates it, and resolving a resolved config is the identity
            resolved["name"] = data["name"]
            out.append(PlannedRun(
                index=trunk.index, run_id=run_id(resolved), name=resolved["name"] or "",
                values={**trunk.values, "train.tokens": tokens}, config=resolved, family=trunk.family,
                preset=trunk.preset, total_params=trunk.total_params, active_params=trunk.active_params,
                non_embedding_params=trunk.non_embedding_params, tokens=int(resolved["train"]["tokens"]),
                flops_per_token=trunk.flops_per_token, resources=trunk.resources, strategy=trunk.strategy,
                memory_per_gpu_gb=trunk.memory_per_gpu_gb, branch_of=trunk.run_id, branch_step=step))
        return out

    def resolve(self, config: dict[str, Any], where: str) -> dict[str, Any]:
        cfg = run_config_from_dict(config, where)
        # Resolution never reads `seed` or `name` (they pass through), so the seeds of a point resolve once.
        content = canonical_json({k: v for k, v in config.items() if k not in ("seed", "name")})
        if content not in self.resolved:
            try:
                self.resolved[content] = resolve_run_config(cfg).model_dump(mode="json")
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        data = _copy_tree(self.resolved[content])
        data["seed"], data["name"] = cfg.seed, cfg.name
        return data

    def model_config(self, model: dict[str, Any]) -> ModelConfig:
        """The ModelConfig of a resolved model block, built once per distinct model."""
        key = canonical_json(_model_fields(model))
        if key not in self.models:
            self.models[key] = ModelConfig.from_dict(_model_fields(model))
        return self.models[key]

    def count(self, model: dict[str, Any], seq_len: int) -> tuple[Any, float]:
        cfg = self.model_config(model)
        key = (id(cfg), seq_len)  # configs stay in self.models, so their ids are stable keys
        if key not in self.counts:
            self.counts[key] = (count_params(cfg), float(flops_per_token(cfg, seq_len, training=True)))
        return self.counts[key]


def _copy_tree(x: Any) -> Any:
    """A copy of plain JSON-like data (dicts and lists are copied, leaves shared); 10x faster than deepcopy."""
    if isinstance(x, dict):
        return {k: _copy_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy_tree(v) for v in x]
    return x


def _count(params: Any, name: str) -> int:
    return int(params[name] if isinstance(params, dict) else getattr(params, name))


def _resources(point: Point, sweep: SweepFile, base: dict[str, Any], data: dict[str, Any], total_params: int,
               where: str) -> Resources:
    spec = sweep.resources.default.model_dump()
    for rule in sweep.resources.rules:
        if rule.min_params is not None and total_params < rule.min_params:
            continue
        if rule.when and not matches(rule.when, point.values, base, sweep):
            continue
        spec.update(rule.model_dump(exclude={"when", "min_params"}, exclude_none=True))
    nproc = data["parallel"]["nproc"]
    if spec["nproc"] is not None and spec["nproc"] != nproc and nproc != 1:
        raise ConfigError(f"{where}: resources give nproc={spec['nproc']} but the run config sets "
                          f"parallel.nproc={nproc}; set it in one place")
    spec["nproc"] = spec["nproc"] or nproc
    try:
        return Resources.model_validate(spec)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{where}: resources")) from None
