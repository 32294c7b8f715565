"""The `isoflop` sweep method: FLOP budgets x a size ladder -> the (N, D) grid of an IsoFLOP study, as WSD trunks
with cooldown branches (docs/sweeps.md "IsoFLOP grids").

For each FLOP budget C and each size of the ladder (a preset: N active parameters, F training FLOPs per token from
`ultramem.accounting.flops_per_token`, the project's own count, not 6N), the run of that budget trains
D = C / F tokens, D/N tokens per parameter. A size serves the budgets whose D/N lies in `tokens_per_param`
(default 3-100, around Chinchilla's ~20 so that each budget's loss-vs-N curve has its minimum inside the grid)
and, with `max_tokens`, whose D does not exceed it (a small corpus: at most so many epochs).
With `branches: true` (default) each size is one WSD trunk trained to the largest D it serves, and every smaller
budget is a cooldown branch of it; with `branches: false` each (size, budget) is an independent run.

`layout` is the pure part (numbers in, grid and warnings out); experiments/sweep/plan.py turns it into runs.
A budget is warned about when fewer than `min_sizes` sizes serve it, or when its sizes do not bracket its expected
optimum: none at or below `optimum / 2` tokens per parameter or none at or above `2 x optimum` (the parabola in
ln N needs sizes on both sides of its vertex; analysis/isoflop.py rejects a vertex outside the sampled sizes).

`extra` adds runs to the grid by hand (or as `ultramem sweep refine` writes them, analysis/refine.py): each entry
trains one preset, which may lie outside the ladder (a size beyond an edge), at some of the study's budgets for some
seeds, each run with D = C / F tokens and the hyperparameters and batch a grid run of that cell would get, without
the tokens/param window. An entry is a WSD trunk per seed over its own budgets (`branches: true`) or one run per
budget: never a branch of a main-grid trunk, whose checkpoint at a new branch point a finished trunk does not hold,
so the main grid's runs (and ids) are the same with and without `extra` and adding an entry only trains it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from experiments.config import Strict
from ultramem.config import ConfigError

MIN_BUDGET_RATIO = 1.25  # consecutive budgets at least this far apart (a branch must end inside its trunk's stable
#                          phase, and the analysis tells budgets apart by their FLOPs)
BRACKET = 2.0  # a budget brackets its optimum with sizes at <= optimum/BRACKET and >= optimum*BRACKET tokens/param


class IsoflopExtra(Strict):
    """One entry of `isoflop.extra`: a preset at some of the study's budgets, for some seeds, and why."""

    preset: str  # a registered or sweep-local preset of a family in the ladder
    budgets: list[float] = Field(min_length=1)  # each one of isoflop.budgets
    seeds: list[int] = Field(min_length=1)
    why: str = ""  # shown by `sweep plan --format json` (values isoflop.why)

    @field_validator("budgets")
    @classmethod
    def _budgets_once(cls, b: list[float]) -> list[float]:
        if len(set(b)) != len(b):
            raise ValueError(f"list each budget once, got {b}")
        return b

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, s: list[int]) -> list[int]:
        if any(x < 0 for x in s) or len(set(s)) != len(s):
            raise ValueError(f"each seed >= 0 and once, got {s}")
        return s


class IsoflopSpec(Strict):
    """The `isoflop:` block of a sweep file with `method: isoflop`."""

    budgets: list[float] = Field(min_length=2)  # training FLOPs C (flops_per_token x tokens), ascending
    ladder: list[str] = Field(min_length=1)  # model presets (registered or sweep-local), any families
    tokens_per_param: tuple[float, float] = (3.0, 100.0)  # the D/N window each budget's sizes are taken from
    max_tokens: float | None = Field(None, gt=0)  # no run longer than this many tokens (e.g. 4 epochs of a small
    #                                              corpus): a size whose D at a budget would exceed it skips it
    min_sizes: int = Field(5, ge=3)  # sizes per budget below which the planner warns
    optimum: float = Field(20.0, gt=0)  # tokens per parameter where the optimum is expected (bracketing check)
    branches: bool = True  # one WSD trunk per size, the other budgets as its cooldown branches
    hparams: Literal["ladder", "isoflop", "fitted"] = "ladder"  # ladder: experiments.hparams as for any run;
    #   isoflop: the IsoFLOP rule (experiments.hparams.isoflop_hparams); fitted: the IsoFLOP rule with the peak LR of
    #   each family's fitted law lr*(N) from hparams_file (`ultramem hparams` writes it; experiments.hparams.fitted_lr)
    hparams_file: str | None = None  # hparams: fitted: the fitted-rule JSON, relative to the sweep file
    # hparams: fitted: how far beyond the sizes a family's law was fitted on it may be used, as a factor in N (1:
    # not at all, a size outside is an error naming the factor it would need); `sweep plan` lists each such size
    hparams_extrapolate: float = Field(1.0, ge=1.0)
    batch: Literal["ladder", "steps"] = "ladder"  # with hparams: isoflop, the batch size from the model size
    #   (ladder: OLMo's N^(2/3), capped for >= 100 steps in the shortest run) or from each run's length (steps:
    #   about target_steps optimizer steps, a power of two sequences, at least one); a size whose budgets get
    #   different batches is one WSD trunk per batch
    target_steps: int = Field(4096, ge=100)  # batch: steps (experiments.hparams.BATCH_TARGET_STEPS; measured)
    extra: list[IsoflopExtra] = Field(default_factory=list)  # runs added beside the grid (`ultramem sweep refine`)

    @model_validator(mode="after")
    def _batch(self) -> IsoflopSpec:
        if self.batch == "steps" and self.hparams == "ladder":
            raise ValueError("batch: steps is part of the IsoFLOP rule; add hparams: isoflop (or drop batch)")
        if (self.hparams == "fitted") != (self.hparams_file is not None):
            raise ValueError("hparams: fitted and hparams_file (the fitted-rule JSON that `ultramem hparams` "
                             "writes, e.g. docs/results/hparams/lr_rule.json) go together; give both or neither")
        if self.hparams_extrapolate != 1.0 and self.hparams != "fitted":
            raise ValueError("hparams_extrapolate applies to hparams: fitted only; drop it or use the fitted rule")
        return self

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, b: list[float]) -> list[float]:
        if any(c <= 0 for c in b):
            raise ValueError(f"every budget must be a number of FLOPs > 0 (e.g. 1.0e+13), got {b}")
        for lo, hi in zip(b, b[1:], strict=False):
            if hi < MIN_BUDGET_RATIO * lo:
                raise ValueError(f"budgets {lo:g} and {hi:g}: list them ascending, each at least "
                                 f"{MIN_BUDGET_RATIO}x the one before")
        return b

    @field_validator("extra")
    @classmethod
    def _extra_budgets(cls, extra: list[IsoflopExtra], info: ValidationInfo) -> list[IsoflopExtra]:
        """Every budget of an entry is one of `budgets` (snapped to its value: 1e12 and 1.0e+12 are one budget)."""
        budgets = info.data.get("budgets")
        if budgets is None:  # budgets itself is invalid; its own error says why
            return extra
        for i, e in enumerate(extra):
            snapped = []
            for c in e.budgets:
                match = [b for b in budgets if math.isclose(b, c, rel_tol=1e-9)]
                if not match:
                    raise ValueError(f"entry {i} ({e.preset}): budget {c:g} is not one of isoflop.budgets "
                                     f"[{', '.join(f'{b:g}' for b in budgets)}]; an added run is a point of a "
                                     "budget of the study: pick one of those (or add it to budgets)")
                snapped.append(match[0])
            e.budgets = snapped
        return extra

    @field_validator("tokens_per_param")
    @classmethod
    def _window(cls, w: tuple[float, float]) -> tuple[float, float]:
        if not 0 < w[0] < w[1]:
            raise ValueError(f"give [low, high] with 0 < low < high, got {list(w)}")
        return w

    @field_validator("ladder")
    @classmethod
    def _ladder(cls, ladder: list[str]) -> list[str]:
        return unique_ladder(ladder)


def unique_ladder(ladder: list[str]) -> list[str]:
    """A method block's ladder lists each preset once (isoflop and lr_scan validate theirs with this)."""
    if len(set(ladder)) != len(ladder):
        raise ValueError("a preset is listed twice; list each once")
    return ladder


def refuse_method_keys(train: dict, keys: tuple[str, ...], method: str, how: str, where: str) -> None:
    """A grid point must not set the train fields its sweep method sets itself (`how`: from what)."""
    for key in keys:
        if key in train:
            raise ConfigError(f"{where}: train.{key} is set by the {method} method ({how}); remove it")


@dataclass(frozen=True)
class Size:
    """One rung of the ladder: a preset, its family, active parameters N and training FLOPs per token F."""

    preset: str
    family: str
    n: int
    flops_per_token: float


@dataclass
class Cell:
    """One (size, budget) point of the grid."""

    size: Size
    budget: float
    tokens: int  # D = C / F, rounded to a token (the resolver then rounds it to whole steps)

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.size.n


@dataclass
class Layout:
    """The grid: which budgets each size serves (`cells`), budgets no size serves, and warnings."""

    budgets: list[float]
    cells: list[Cell] = field(default_factory=list)
    unused: list[Size] = field(default_factory=list)  # sizes no budget's window reaches
    capped: list[Cell] = field(default_factory=list)  # cells inside the window dropped for D > max_tokens
    warnings: list[str] = field(default_factory=list)

    def served(self, preset: str) -> list[Cell]:
        """The cells of one size, ascending in budget (the last is its trunk's)."""
        return sorted((c for c in self.cells if c.size.preset == preset), key=lambda c: c.budget)

    def at(self, family: str, budget: float) -> list[Cell]:
        """The cells of one family at one budget, ascending in N."""
        return sorted((c for c in self.cells if c.size.family == family and c.budget == budget),
                      key=lambda c: c.size.n)

    def families(self) -> list[str]:
        return list(dict.fromkeys(c.size.family for c in self.cells))


def layout(spec: IsoflopSpec, sizes: list[Size]) -> Layout:
    """Lay the ladder over the budgets: size s serves budget C when C / (F_s N_s) lies in the tokens/param window."""
    lo, hi = spec.tokens_per_param
    out = Layout(budgets=list(spec.budgets))
    for s in sizes:
        cells = [Cell(s, c, round(c / s.flops_per_token)) for c in spec.budgets]
        cells = [c for c in cells if lo <= c.tokens_per_param <= hi]
        out.capped += [c for c in cells if spec.max_tokens is not None and c.tokens > spec.max_tokens]
        cells = [c for c in cells if spec.max_tokens is None or c.tokens <= spec.max_tokens]
        out.cells += cells
        if not cells:
            out.unused.append(s)
    families = list(dict.fromkeys(s.family for s in sizes))
    for fam in families:
        good = 0
        for c in spec.budgets:
            cells = out.at(fam, c)
            tpp = [x.tokens_per_param for x in cells]
            short = len(cells) < spec.min_sizes
            bracketed = bool(cells) and min(tpp) <= spec.optimum / BRACKET and max(tpp) >= spec.optimum * BRACKET
            if short or not bracketed:
                span = f"{min(tpp):.3g}-{max(tpp):.3g}" if cells else "none"
                why = [f"{len(cells)} size(s) (want >= {spec.min_sizes})"] if short else []
                if not bracketed:
                    why.append(f"does not bracket the expected optimum at {spec.optimum:g} tokens/param (want "
                               f"sizes at <= {spec.optimum / BRACKET:g} and >= {spec.optimum * BRACKET:g})")
                out.warnings.append(f"{fam} at C = {c:.3g}: tokens/param {span}: {'; '.join(why)}")
            good += len(cells) >= 3
        if good < 3:
            out.warnings.append(f"{fam}: {good} budget(s) with >= 3 sizes; the IsoFLOP frontier N*(C) "
                                "(Approach 2) needs 3 or more, so only the L(N, D) fit can use these runs")
    if any(" at C = " in w for w in out.warnings):
        out.warnings.append(f"fix: add rungs to the ladder between or around the sizes laid there, or widen "
                            f"isoflop.tokens_per_param (now [{lo:g}, {hi:g}])"
                            + (f"; {len(out.capped)} cell(s) were dropped for D > isoflop.max_tokens "
                               f"({spec.max_tokens:.3g}): lower the largest budgets" if out.capped else ""))
    for s in out.unused:
        out.warnings.append(f"{s.preset}: no budget puts it within tokens/param [{lo:g}, {hi:g}] "
                            f"(C / (F N) = {spec.budgets[0] / (s.flops_per_token * s.n):.3g} to "
                            f"{spec.budgets[-1] / (s.flops_per_token * s.n):.3g}); not trained")
    return out


# ---- isoflop.extra in a sweep file's text (`ultramem sweep refine`) ----------------------------------------------

_TOP_ISOFLOP = re.compile(r"^isoflop:[ \t]*(#.*)?$")


def yaml_float(x: float) -> str:
    """The shortest text YAML (1.1, PyYAML) reads back as the float `x`: '1.0e+12', '6.9e+10' (a mantissa with a
    point and a signed exponent; '1e12' would be read as a string)."""
    for digits in range(1, 18):
        text = f"{x:.{digits}e}"
        if float(text) == x:
            return text
    return f"{x:.17e}"


def extra_entry_text(entry: dict, comment: str) -> str:
    """One `isoflop.extra` item as YAML lines (add_extra_text indents them): a `# comment` line, then the entry
    (preset, budgets, seeds, why) as a flow mapping."""
    body = ", ".join(f"{k}: " + (json.dumps(v) if isinstance(v, str) else
                                 "[" + ", ".join(yaml_float(x) if isinstance(x, float) else str(x) for x in v) + "]")
                     for k, v in entry.items())
    return f"# {' '.join(comment.split())}\n- {{{body}}}\n"


def add_extra_text(text: str, items: list[str], source: str) -> str:
    """`text` (a sweep file) with `items` (extra_entry_text) appended to its
    `isoflop.extra` list, which is created at the end of the `isoflop:` block when it has none; every other line
    stays as it was. The block must be a block mapping (not `isoflop: {...}`), and an existing `extra:` a block
    list (or `[]`)."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    start = next((i for i, line in enumerate(lines) if _TOP_ISOFLOP.match(line.rstrip("\n"))), None)
    if start is None:
        raise ConfigError(f"{source}: no `isoflop:` block mapping at the top level (a flow mapping `isoflop: {{...}}` "
                          "cannot be extended line by line); write it as a block, one key per line")
    content = [i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
    block = []
    for i in content:
        if not lines[i].startswith((" ", "\t")):
            break
        block.append(i)
    if not block:
        raise ConfigError(f"{source}: the isoflop: block is empty")
    ind = lines[block[0]][:len(lines[block[0]]) - len(lines[block[0]].lstrip())]
    key = re.compile(rf"^{re.escape(ind)}extra:[ \t]*(\[\])?[ \t]*(#.*)?$")
    at = next((i for i in block if key.match(lines[i].rstrip("\n"))), None)
    if at is None:
        if any(lines[i].startswith(f"{ind}extra:") for i in block):
            raise ConfigError(f"{source}: isoflop.extra is a flow list; write it as a block list (one `- ` item per "
                              "line) so that entries can be appended")
        end = block[-1] + 1
        return "".join(lines[:end] + [f"{ind}extra:\n"] + [_reindent(t, ind + "  ") for t in items] + lines[end:])
    lines[at] = f"{ind}extra:\n"  # `extra: []` becomes a block list
    end, item = at + 1, ind + "  "
    for i in (i for i in block if i > at):
        line = lines[i]
        deeper = len(line) - len(line.lstrip()) > len(ind)
        if not (deeper or line.startswith(f"{ind}- ")):
            break
        if line.lstrip().startswith("- ") and end == at + 1:
            item = line[:len(line) - len(line.lstrip())]
        end = i + 1
    return "".join(lines[:end] + [_reindent(t, item) for t in items] + lines[end:])


def _reindent(item: str, indent: str) -> str:
    return "".join(indent + line.lstrip(" ") for line in item.splitlines(keepends=True))
