"""The `lr_scan` sweep method: a size ladder x a grid of peak LRs, each a factor of the current rule's LR at that
size (docs/sweeps.md "LR scans"; analysed by `ultramem hparams`, analysis/hparams.py).

For each preset of `lr_scan.ladder` (N active parameters) and seed, one run per factor f of `lr_factors`, all at
D = tokens_per_param x N tokens, with peak LR f x lr(N): lr(N) is the rule of experiments/hparams.py
(`hparams: ladder`, the rule every run gets) or the IsoFLOP rule (`hparams: isoflop`, which also sets the batch,
warmup and beta2 that a study with `isoflop.hparams: isoflop` uses, so that the scan measures that study's
recipe). Everything but the LR is the same across a size's factors, so the loss-vs-LR curve is the rule's own.

`extra` adds runs to the grid, each entry a ladder preset at some LR factors for some seeds (more seeds near an
optimum, LRs beyond an edge): `ultramem hparams SWEEP --refine OUT.yaml` writes them (analysis/hparams.py
`scan_additions`), each with why. An entry that repeats a grid run is an error; the grid's run ids do not change.

`lr_points` is the pure part: points in, points out; experiments/sweep/plan.py resolves and prices them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from experiments import hparams as rules
from experiments.config import Strict
from experiments.sweep.isoflop import refuse_method_keys, unique_ladder
from ultramem.config import ConfigError, deep_merge

MIN_FACTORS = 3  # a parabola in log LR needs three LRs (analysis/hparams.py MIN_LRS)


class LrScanExtra(Strict):
    """One entry of `lr_scan.extra`: runs of a ladder preset at these LR factors for these seeds."""

    preset: str
    lr_factors: list[float] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    why: str = ""  # the reason `ultramem hparams --refine` gives (a label: not in the run id)

    @field_validator("lr_factors")
    @classmethod
    def _positive(cls, f: list[float]) -> list[float]:
        if any(x <= 0 for x in f) or len(set(f)) != len(f):
            raise ValueError(f"each factor > 0 and once, got {f}")
        return f

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, s: list[int]) -> list[int]:
        if any(x < 0 for x in s) or len(set(s)) != len(s):
            raise ValueError(f"each seed >= 0 and once, got {s}")
        return s


class LrScanSpec(Strict):
    """The `lr_scan:` block of a sweep file with `method: lr_scan`."""

    ladder: list[str] = Field(min_length=1)  # model presets (registered or sweep-local), any families
    lr_factors: list[float]  # peak LR = factor x the rule's LR at the size; ascending, >= 3 values
    tokens_per_param: float = Field(20.0, gt=0)  # D = tokens_per_param x N (N: active parameters)
    hparams: Literal["ladder", "isoflop"] = "ladder"  # the rule whose LR the factors multiply (and, for
    #                                                   isoflop, whose batch, warmup and beta2 every run takes)
    batch: Literal["ladder", "steps"] = "ladder"  # with hparams: isoflop, as isoflop.batch
    target_steps: int = Field(rules.BATCH_TARGET_STEPS, ge=100)  # batch: steps
    extra: list[LrScanExtra] = Field(default_factory=list)  # runs added to the grid (`ultramem hparams --refine`)

    @field_validator("lr_factors")
    @classmethod
    def _factors(cls, f: list[float]) -> list[float]:
        if len(set(f)) < MIN_FACTORS:
            raise ValueError(f"{len(set(f))} distinct LR factor(s) {f}: a parabola in log LR needs at least "
                             f"{MIN_FACTORS}; give >= 5 a factor ~2 apart, e.g. [0.25, 0.5, 1, 2, 4]")
        if any(x <= 0 for x in f) or f != sorted(set(f)):
            raise ValueError(f"list the factors ascending, each > 0 and once, got {f}")
        return f

    @field_validator("ladder")
    @classmethod
    def _ladder(cls, ladder: list[str]) -> list[str]:
        return unique_ladder(ladder)

    @model_validator(mode="after")
    def _batch(self) -> LrScanSpec:
        if self.batch == "steps" and self.hparams != "isoflop":
            raise ValueError("batch: steps is part of the IsoFLOP rule; add hparams: isoflop (or drop batch)")
        for i, e in enumerate(self.extra):
            if e.preset not in self.ladder:
                raise ValueError(f"extra[{i}].preset {e.preset!r} is not in lr_scan.ladder; an extra entry adds "
                                 "LRs or seeds to a size of the ladder (add the preset to the ladder for a new size)")
        return self


_SET_BY_SCAN = ("lr", "tokens", "steps", "branches", "branch_of")


def lr_points(points: list[Any], spec: LrScanSpec, resolve: Any, active: Any, path: str) -> list[Any]:
    """One point per (size, seed) -> one per (size, seed, factor), then the `extra` entries' runs.
    `resolve(config, where)` gives the resolved config as data and `active(model, seq_len)` the activated
    parameter count, as the planner's."""
    out = _scan_points(points, spec, resolve, active, path, spec.lr_factors)
    grid = {(p.preset, p.values.get("seed"), p.values["lr_scan.factor"]) for p in out}
    for i, e in enumerate(spec.extra):
        template = next(p for p in points if p.preset == e.preset)
        for seed in e.seeds:
            for factor in e.lr_factors:
                if (e.preset, seed, factor) in grid:
                    raise ConfigError(f"{path}: lr_scan.extra[{i}] ({e.preset}, seed {seed}, factor {factor:g}) "
                                      "is already a run of the grid (or of an earlier entry); drop it from the entry")
                grid.add((e.preset, seed, factor))
        clones = [_with_seed(template, seed, i) for seed in e.seeds]
        for q in _scan_points(clones, spec, resolve, active, path, e.lr_factors):
            out.append(type(q)(len(out), q.values, q.config, q.preset))
    return out


def _with_seed(p: Any, seed: int, entry: int) -> Any:
    """A copy of a ladder point at another seed (the name says the seed, as the grid's do), marked with the index
    of its `extra` entry."""
    config = {**p.config, "seed": seed, "name": f"{p.preset}-s{seed}"}
    values = {**p.values, "seed": seed, "lr_scan.extra": entry}
    return type(p)(p.index, values, config, p.preset)


def _scan_points(points: list[Any], spec: LrScanSpec, resolve: Any, active: Any, path: str,
                 factors: list[float]) -> list[Any]:
    # imported here: grid imports the schema, which imports this module
    from experiments.sweep.grid import Point, describe

    out: list[Point] = []
    for p in points:
        where = f"{path} (run {p.index}: {describe(p.values)})"
        given = p.config.get("train") or {}
        refuse_method_keys(given, _SET_BY_SCAN, "lr_scan",
                           "lr_scan.lr_factors and tokens_per_param give every run its LR and tokens", where)
        data = resolve(p.config, where)
        n = active(data["model"], data["train"]["seq_len"])
        tokens = round(spec.tokens_per_param * n)
        seq_len = int(data["train"]["seq_len"])
        nproc = int((p.config.get("parallel") or {}).get("nproc", 1))
        train: dict[str, Any] = {"tokens": tokens}
        if spec.hparams == "isoflop":
            batch = (rules.steps_batch_size(tokens, seq_len, spec.target_steps, nproc) if spec.batch == "steps"
                     else None)
            rule = rules.isoflop_hparams(n, seq_len, tokens, nproc, batch)
            train.update({k: v for k, v in rule.items() if k != "lr" and given.get(k, "auto") == "auto"})
        base_lr = rules.learning_rate(n)
        for factor in factors:
            config = deep_merge(p.config, {"train": {**train, "lr": factor * base_lr}})
            config["name"] = f"{config.get('name') or p.preset}@lr={factor:g}x"
            out.append(Point(len(out), {**p.values, "lr_scan.factor": factor}, config, p.preset))
    return out
