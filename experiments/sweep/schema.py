"""The sweep file: its schema (pydantic, strict), loading, and the check that every swept key names a RunConfig field.

Errors are ConfigError naming the file and the field to fix. The format is documented in docs/sweeps.md and in
`experiments.sweep`'s docstring.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from experiments.config import RunConfig, Strict, WandbConfig, format_validation_error, load_yaml
from experiments.pricing import GPU_MEMORY_GB
from experiments.sweep.isoflop import IsoflopSpec
from experiments.sweep.lr_scan import LrScanSpec
from ultramem.config import BLOCKS, ConfigError, ModelConfig, expand_dotted

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
        if "values" in self.model_fields_set and not self.values:  # [] or null
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
    method: Literal["grid", "list", "isoflop", "lr_scan"] = "grid"
    base: dict[str, Any] | str = Field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)  # isoflop: optional (the ladder is the grid)
    isoflop: IsoflopSpec | None = None  # method isoflop: budgets and the size ladder (experiments/sweep/isoflop.py)
    lr_scan: LrScanSpec | None = None  # method lr_scan: sizes x LR factors (experiments/sweep/lr_scan.py)
    conditional: list[Conditional] = Field(default_factory=list)
    seeds: list[int] | None = Field(None, min_length=1)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    wandb: WandbConfig | None = None
    output_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SweepFile:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '-', '_' and '.' (it names the output dir)")
        if (self.method == "isoflop") != (self.isoflop is not None):
            raise ValueError("method: isoflop and the isoflop: block (budgets, ladder) go together; give both or "
                             "neither")
        if (self.method == "lr_scan") != (self.lr_scan is not None):
            raise ValueError("method: lr_scan and the lr_scan: block (ladder, lr_factors) go together; give both "
                             "or neither")
        if not self.parameters and self.method not in ("isoflop", "lr_scan"):
            raise ValueError("parameters: empty grid; give at least one key with 'values: [...]' or 'value: x'")
        if self.isoflop is not None or self.lr_scan is not None:
            swept = [*self.parameters, *(k for c in self.conditional for k in c.parameters)]
            for key in swept:
                if key.split(".")[0] == "model":
                    raise ValueError(f"parameters {key}: the {self.method} method takes its models from "
                                     f"{self.method}.ladder; list presets there (a changed model is a sweep-local "
                                     "preset under presets:)")
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


def runs_dir(sweep: SweepFile, sweep_dir: str | Path | None = None) -> Path:
    """The folder holding the sweep's run folders: `output_dir`, else $ULTRAMEM_RUNS_DIR/<name>, else runs/<name>.

    A relative `output_dir` is relative to the sweep file's folder `sweep_dir` (like `base:`), so every command
    finds the same runs from any working directory; the default `runs/<name>` is relative to the current
    directory (the repository root for `make demo`), and $ULTRAMEM_RUNS_DIR pins it.
    """
    if sweep.output_dir:
        out = Path(os.path.expandvars(sweep.output_dir)).expanduser()
        return (Path(sweep_dir or ".") / out).absolute() if not out.is_absolute() else out
    root = os.environ.get("ULTRAMEM_RUNS_DIR", "runs")
    return (Path(root).expanduser() / sweep.name).absolute()


def sweep_runs_dir(path: str | Path) -> Path:
    """`runs_dir` of the sweep file at `path`."""
    sweep, _ = load_sweep(path)
    return runs_dir(sweep, Path(path).parent)


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
        return out | dict(BLOCKS)
    if node in BLOCKS.values():
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
