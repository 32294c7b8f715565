"""Sweep files: a W&B-sweep-shaped YAML grid -> a list of resolved runs -> a plan (params, FLOPs, GPU-hours).

A sweep file (docs/sweeps.md has the full reference):

    name: tiny-cpu
    method: grid                        # grid: cartesian product | list: the i-th run takes the i-th value of each
    base: {data: {source: embedded}}    # a RunConfig mapping, or a path to one (relative to the sweep file)
    presets: {}                         # sweep-local named models: name -> model mapping (may start from `preset:`)
    parameters:
      model.preset: {values: [dense-tiny, moe-tiny, ultramem-tiny]}
      train.tokens: {value: 20xN}
    conditional:                        # applied, in order, to the points whose values match `when`
      - when: {model.family: moe}
        parameters: {model.moe.num_experts: {values: [4, 8]}}
    seeds: [0, 1]
    resources:
      default: {cpus: 1, memory_gb: 2}
      rules: [{min_params: 1e9, gpus: 4}]    # later rules win; `when` and `min_params` (total params) select runs
    wandb: {mode: offline}
    output_dir: runs/tiny-cpu           # default: $ULTRAMEM_RUNS_DIR/<name>, or runs/<name>

Planning never imports torch: configs are resolved by `experiments.resolve` and counted by `ultramem.accounting`.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from experiments.config import (
    ParallelConfig,
    RunConfig,
    Strict,
    WandbConfig,
    canonical_json,
    format_validation_error,
    load_yaml,
    run_config_from_dict,
    run_id,
)
from ultramem.config import ConfigError, MemoryConfig, ModelConfig, MoEConfig, deep_merge, expand_dotted

# Peak dense bf16 FLOP/s per GPU (torchtitan `get_peak_flops`) and the MFUs the plan prices runs at.
PEAK_FLOPS = {"a100": 312e12, "h100": 989e12}
PLAN_MFUS = (0.3, 0.5)
GPU_MEMORY_GB = 80.0  # default per-GPU memory (A100-80GB, H100-80GB); resources.gpu_memory_gb overrides
USABLE_GPU_MEMORY = 0.9  # the rest is left to the CUDA context, NCCL buffers and allocator fragmentation
MAX_PLANNED_GPUS = 4096  # how far the planner looks for a GPU count that fits

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---- schema ------------------------------------------------------------------------------------------------------


class ParamSpec(Strict):
    """One swept key, in W&B's shape: `{values: [...]}` (a grid axis) or `{value: x}` (a constant)."""

    values: list[Any] | None = None
    value: Any = None

    @model_validator(mode="after")
    def _one_of(self) -> ParamSpec:
        given = {"values", "value"} & self.model_fields_set
        if len(given) != 1:
            raise ValueError("give exactly one of 'values: [...]' (a grid axis) or 'value: x' (a constant); "
                             "random/bayes distributions are not supported")
        if self.values is not None and not self.values:
            raise ValueError("empty grid: 'values' must list at least one value")
        return self

    def choices(self) -> list[Any]:
        return list(self.values) if "values" in self.model_fields_set else [self.value]


class Conditional(Strict):
    """Parameters swept only for the points whose values match `when` (e.g. expert counts only for MoE)."""

    when: dict[str, Any] = Field(min_length=1)  # dotted key -> value, or a list of accepted values
    parameters: dict[str, ParamSpec] = Field(min_length=1)


class Resources(Strict):
    """What one run needs on one node. `nproc` processes are launched with torchrun when > 1 (one per GPU)."""

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)  # None: no memory reservation
    nproc: int | None = Field(None, ge=1)  # None: the run config's parallel.nproc
    gpu_memory_gb: float = Field(GPU_MEMORY_GB, gt=0)  # memory of one GPU, for the plan's fit check

    @model_validator(mode="after")
    def _gpus_fit_processes(self) -> Resources:
        if self.gpus > 1 and not float(self.gpus).is_integer():
            raise ValueError(f"gpus={self.gpus}: fractional GPUs are only allowed below 1")
        if self.nproc and self.gpus >= 1 and self.nproc > self.gpus:
            raise ValueError(f"nproc={self.nproc} needs one GPU per process but gpus={self.gpus}")
        return self


class ResourceRule(Strict):
    """Overrides `resources.default` for the runs it selects. Every given selector must match."""

    when: dict[str, Any] = Field(default_factory=dict)  # same predicate as conditional blocks
    min_params: float | None = Field(None, ge=0)  # selects runs with total params >= this
    cpus: float | None = Field(None, gt=0)
    gpus: float | None = Field(None, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    nproc: int | None = Field(None, ge=1)
    gpu_memory_gb: float | None = Field(None, gt=0)


class ResourceSpec(Strict):
    default: Resources = Field(default_factory=Resources)
    rules: list[ResourceRule] = Field(default_factory=list)


class SweepFile(Strict):
    name: str
    description: str | None = None
    method: Literal["grid", "list"] = "grid"
    base: dict[str, Any] | str = Field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    parameters: dict[str, ParamSpec]
    conditional: list[Conditional] = Field(default_factory=list)
    seeds: list[int] | None = Field(None, min_length=1)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    wandb: WandbConfig | None = None
    output_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SweepFile:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '-', '_' and '.' (it names the output dir)")
        if not self.parameters:
            raise ValueError("parameters: empty grid; give at least one key with 'values: [...]' or 'value: x'")
        if self.seeds is not None and "seed" in self.parameters:
            raise ValueError("seeds: given twice (top-level 'seeds' and parameters.seed); keep one")
        return self


# ---- loading and key validation ----------------------------------------------------------------------------------


def load_sweep(path: str | Path) -> tuple[SweepFile, dict[str, Any]]:
    """The validated sweep file and its base run-config mapping. Errors name the file and the field."""
    path = Path(path)
    try:
        data = load_yaml(path)
    except yaml.YAMLError as err:  # includes python/* tags, which safe_load refuses to construct
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        sweep = SweepFile.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
    base = _load_base(sweep.base, path)
    src = str(path)
    for key in sweep.parameters:
        check_key(key, f"{src}: parameters.{key}")
    for i, block in enumerate(sweep.conditional):
        for key in block.when:
            check_key(key, f"{src}: conditional[{i}].when.{key}")
        for key in block.parameters:
            check_key(key, f"{src}: conditional[{i}].parameters.{key}")
    for i, rule in enumerate(sweep.resources.rules):
        for key in rule.when:
            check_key(key, f"{src}: resources.rules[{i}].when.{key}")
    for name, model in sweep.presets.items():
        for key in expand_dotted(model):
            check_key(f"model.{key}", f"{src}: presets.{name}.{key}")
    if sweep.method == "list":
        lengths = {k: len(v.choices()) for k, v in sweep.parameters.items() if v.values is not None}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"{src}: method 'list' zips the 'values' lists, so they must have equal lengths; "
                              f"got {', '.join(f'{k}: {n}' for k, n in lengths.items())}")
    return sweep, base


def _load_base(base: dict[str, Any] | str, sweep_path: Path) -> dict[str, Any]:
    if isinstance(base, dict):
        return expand_dotted(base)
    base_path = Path(base) if Path(base).is_absolute() else sweep_path.parent / base
    if not base_path.exists():
        raise ConfigError(f"{sweep_path}: base: file {base!r} not found (looked at {base_path}); "
                          "give a path relative to the sweep file or an inline mapping")
    return expand_dotted(load_yaml(base_path))


def check_key(key: str, where: str) -> None:
    """Fail unless `key` is a dotted path into RunConfig (model fields via ModelConfig and its sub-configs)."""
    parts = key.split(".")
    node: Any = RunConfig
    for i, part in enumerate(parts):
        children = _children(node)
        if children is _FREE:
            return
        prefix = ".".join(parts[:i])
        if not children:
            raise ConfigError(f"{where}: {prefix!r} is a value, not a mapping, so it has no key {part!r}")
        if part not in children:
            raise ConfigError(f"{where}: unknown key {part!r} under {prefix or 'the run config'}; "
                              f"allowed: {', '.join(sorted(children))}")
        node = children[part]


_FREE: dict[str, Any] = {"*": None}  # a free-form mapping (data.embedded): any key below is allowed
_LEAF: dict[str, Any] = {}


def _children(node: Any) -> dict[str, Any]:
    if node is ModelConfig:
        out = {f: _LEAF for f in ModelConfig.__dataclass_fields__} | {"preset": _LEAF}
        return out | {"moe": MoEConfig, "memory": MemoryConfig}
    if node in (MoEConfig, MemoryConfig):
        return {f: _LEAF for f in node.__dataclass_fields__}
    if isinstance(node, type) and issubclass(node, BaseModel):
        out = {}
        for name, info in node.model_fields.items():
            ann = info.annotation
            if node is RunConfig and name == "model":
                out[name] = ModelConfig
            elif isinstance(ann, type) and issubclass(ann, BaseModel):
                out[name] = ann
            else:
                out[name] = _FREE if "dict" in str(ann) else _LEAF
        return out
    return node


# ---- expansion ---------------------------------------------------------------------------------------------------


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
    """Grid (or zipped list) x conditional blocks x seeds -> run-config mappings, in a stable order."""
    points = _grid(sweep.parameters, sweep.method)
    for block in sweep.conditional:
        grown: list[dict[str, Any]] = []
        for p in points:
            if _matches(block.when, p, base, sweep):
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
    if preset in sweep.presets:
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
    """The preset (or family), then the swept axes: 'ultramem-t2-x6-num_keys=64-top_m=8-s0'."""
    parts = [str(preset or model.get("family", "run"))]
    for key, value in values.items():
        if key == "model.preset":
            continue
        parts.append(f"s{value}" if key == "seed" else f"{key.rsplit('.', 1)[-1]}={value}")
    return "-".join(parts)


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
    from ultramem.presets import get_preset

    return get_preset(preset).to_dict()


def _matches(when: dict[str, Any], values: dict[str, Any], base: dict[str, Any], sweep: SweepFile) -> bool:
    for key, want in when.items():
        have = _lookup(values, base, sweep, key)
        if isinstance(want, list) and not isinstance(have, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


# ---- planning ----------------------------------------------------------------------------------------------------


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

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    def gpu_hours(self, gpu: str, mfu: float) -> float:
        return self.flops / (PEAK_FLOPS[gpu] * mfu) / 3600.0

    def row(self) -> dict[str, Any]:
        out = {
            "run_id": self.run_id, "name": self.name, "family": self.family, "preset": self.preset,
            "total_params": self.total_params, "active_params": self.active_params,
            "non_embedding_params": self.non_embedding_params, "tokens": self.tokens,
            "flops_per_token": self.flops_per_token, "flops": self.flops,
        }
        for gpu in PEAK_FLOPS:
            for mfu in PLAN_MFUS:
                out[f"gpu_hours_{gpu}_mfu{round(mfu * 100)}"] = self.gpu_hours(gpu, mfu)
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

    def totals(self) -> dict[str, Any]:
        out: dict[str, Any] = {"runs": len(self.runs), "tokens": sum(r.tokens for r in self.runs),
                               "flops": sum(r.flops for r in self.runs)}
        for gpu in PEAK_FLOPS:
            for mfu in PLAN_MFUS:
                out[f"gpu_hours_{gpu}_mfu{round(mfu * 100)}"] = sum(r.gpu_hours(gpu, mfu) for r in self.runs)
        return out


def sweep_runs_dir(path: str | Path) -> Path:
    """The folder holding the sweep's run folders: `output_dir`, else $ULTRAMEM_RUNS_DIR/<name>, else runs/<name>.

    Relative paths are relative to the current directory (the repository root for `make demo`).
    """
    sweep, _ = load_sweep(path)
    return _runs_dir(sweep)


def _runs_dir(sweep: SweepFile) -> Path:
    if sweep.output_dir:
        return Path(os.path.expandvars(sweep.output_dir)).expanduser().absolute()
    root = os.environ.get("ULTRAMEM_RUNS_DIR", "runs")
    return (Path(root).expanduser() / sweep.name).absolute()


def plan_sweep(path: str | Path) -> Plan:
    """Expand, resolve and price every run of a sweep file. Fast (no torch, no data); errors name file and field."""
    path = Path(path)
    sweep, base = load_sweep(path)
    plan = Plan(path=path, sweep=sweep, runs_dir=_runs_dir(sweep))
    planner = _Planner(sweep, base)
    seen: dict[str, PlannedRun] = {}
    too_big: list[str] = []
    for point in expand(sweep, base, str(path)):
        run = planner.plan(point, f"{path} (run {point.index}: {_describe(point.values)})")
        if run.memory_per_gpu_gb is not None and run.memory_per_gpu_gb > _usable(run.resources):
            too_big.append(_does_not_fit(run))
        if run.run_id in seen:
            first = seen[run.run_id]
            raise ConfigError(f"{path}: runs {first.index} ({_describe(first.values)}) and {point.index} "
                              f"({_describe(point.values)}) resolve to the same run {run.run_id}; the keys that "
                              "differ do not change what is trained (see experiments.config.run_id); drop one")
        seen[run.run_id] = run
        plan.runs.append(run)
    if too_big:
        raise ConfigError(f"{path}: {len(too_big)} run(s) do not fit their GPUs (estimated peak per GPU from "
                          "ultramem.accounting.train_memory, at most "
                          f"{USABLE_GPU_MEMORY:.0%} of resources.gpu_memory_gb):\n  " + "\n  ".join(too_big))
    return plan


def _usable(resources: Resources) -> float:
    return USABLE_GPU_MEMORY * resources.gpu_memory_gb


def _layout(config: dict[str, Any], nproc: int) -> Any:
    return ParallelConfig.model_validate(config["parallel"]).layout(nproc)


def _model_fields(model: dict[str, Any]) -> dict[str, Any]:
    """A resolved model block as ModelConfig fields (the preset name is a label, not a field)."""
    return {k: v for k, v in model.items() if k != "preset"}


def _memory_gb(cfg: ModelConfig, config: dict[str, Any], nproc: int) -> float:
    """Estimated peak GB per GPU of the resolved run config `config` (model `cfg`) on `nproc` GPUs (its
    micro-batch, capped by the sequences each GPU gets; bf16 compute unless train.dtype is fp32)."""
    from ultramem.accounting import train_memory

    t = config["train"]
    micro = min(t["micro_batch_size"], t["batch_size"] // nproc)
    return train_memory(cfg, _layout(config, nproc), micro, t["seq_len"],
                        compute_bytes=4 if t["dtype"] == "fp32" else 2).gb


def _does_not_fit(run: PlannedRun) -> str:
    """The error line of a run that does not fit: what it needs, and the smallest GPU count where it would."""
    lay = _layout(run.config, run.resources.nproc)
    cfg = ModelConfig.from_dict(_model_fields(run.config["model"]))
    head = (f"run {run.index} ({run.name}): {run.memory_per_gpu_gb:.1f} GB per GPU with {run.strategy} on "
            f"{run.resources.nproc} GPUs > {_usable(run.resources):.0f} GB usable of {run.resources.gpu_memory_gb:g}")
    step = math.lcm(lay.expert_parallel, lay.memory_parallel_size)
    batch = run.config["train"]["batch_size"]
    for n in range(run.resources.nproc + 1, MAX_PLANNED_GPUS + 1):
        if n % step or batch % n:
            continue
        gb = _memory_gb(cfg, run.config, n)
        if gb <= _usable(run.resources):
            return (f"{head}; it needs {n} GPUs ({gb:.1f} GB each): set resources gpus and nproc to {n}, or shard "
                    "more (parallel.fsdp, memory_parallel, expert_parallel, activation_checkpointing)")
    return (f"{head}; no GPU count up to {MAX_PLANNED_GPUS} that divides train.batch_size fits this layout: shard "
            "more (parallel.fsdp, memory_parallel, expert_parallel, activation_checkpointing) or lower "
            "train.micro_batch_size")


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
            layout = _layout(data, resources.nproc)
            from ultramem.accounting import check_layout

            check_layout(cfg, layout)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        return PlannedRun(
            index=point.index, run_id=run_id(data), name=data.get("name") or "", values=point.values,
            config=data, family=model["family"], preset=point.preset, total_params=_count(params, "total"),
            active_params=_count(params, "active"), non_embedding_params=_count(params, "non_embedding"),
            tokens=int(data["train"]["tokens"]), flops_per_token=fpt, resources=resources,
            strategy=layout.describe(),
            memory_per_gpu_gb=_memory_gb(cfg, data, resources.nproc) if resources.gpus >= 1 else None,
        )

    def resolve(self, config: dict[str, Any], where: str) -> dict[str, Any]:
        from experiments.resolve import resolve_run_config

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
        from ultramem.accounting import count_params, flops_per_token

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


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _count(params: Any, name: str) -> int:
    return int(params[name] if isinstance(params, dict) else getattr(params, name))


def _resources(point: Point, sweep: SweepFile, base: dict[str, Any], data: dict[str, Any], total_params: int,
               where: str) -> Resources:
    spec = sweep.resources.default.model_dump()
    for rule in sweep.resources.rules:
        if rule.min_params is not None and total_params < rule.min_params:
            continue
        if rule.when and not _matches(rule.when, point.values, base, sweep):
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


# ---- tables ------------------------------------------------------------------------------------------------------


def human(n: float | None, unit: str = "") -> str:
    """1.23e9 -> '1.23G' (SI prefixes up to Z; plain below 1000)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for prefix, scale in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale * 0.9995:  # 999.96k prints as 1M, not 1e+03k
            return f"{n / scale:.3g}{prefix}{unit}"
    return f"{n:.3g}{unit}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def plan_table(plan: Plan) -> str:
    headers = ["run_id", "family", "preset", "total", "active", "tokens", "FLOPs",
               "A100 h@30%", "A100 h@50%", "H100 h@30%", "H100 h@50%", "cpus", "gpus", "mem GB", "nproc",
               "strategy", "GB/GPU", "name"]
    rows = [[
        r.run_id, r.family, r.preset or "-", human(r.total_params), human(r.active_params), human(r.tokens),
        human(r.flops), _hours(r.gpu_hours("a100", 0.3)), _hours(r.gpu_hours("a100", 0.5)),
        _hours(r.gpu_hours("h100", 0.3)), _hours(r.gpu_hours("h100", 0.5)), f"{r.resources.cpus:g}",
        f"{r.resources.gpus:g}", "-" if r.resources.memory_gb is None else f"{r.resources.memory_gb:g}",
        str(r.resources.nproc), r.strategy, "-" if r.memory_per_gpu_gb is None else f"{r.memory_per_gpu_gb:.1f}",
        r.name,
    ] for r in plan.runs]
    t = plan.totals()
    rows.append(["TOTAL", f"{t['runs']} runs", "", "", "", human(t["tokens"]), human(t["flops"]),
                 _hours(t["gpu_hours_a100_mfu30"]), _hours(t["gpu_hours_a100_mfu50"]),
                 _hours(t["gpu_hours_h100_mfu30"]), _hours(t["gpu_hours_h100_mfu50"]), "", "", "", "", "", "", ""])
    return f"sweep {plan.sweep.name} -> {plan.runs_dir}\n" + format_table(headers, rows)


def _hours(h: float) -> str:
    if h >= 100:
        return f"{h:,.0f}"
    return f"{h:.3g}"
