"""Typed run configuration: one `RunConfig` describes one training run completely.

The resolved form (preset expanded into every model field, vocabulary size taken from the tokenizer, budgets turned
into numbers) is what the run folder saves as `config.yaml`, what the run id hashes, and what the trainer reads.
Unknown keys anywhere are errors that name the file, the dotted field and the allowed keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ultramem.config import ConfigError, ModelConfig, deep_merge, expand_dotted
from ultramem.layout import ParallelLayout


class Strict(BaseModel):
    """Unknown keys are errors; a number field refuses a boolean (pydantic would read `steps: true` as 1) and a
    float field refuses NaN and infinity (`lr: .nan` validates as a float but cannot train)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, bool) and info.field_name is not None and \
                _takes_number_not_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got the boolean {str(v).lower()}; write the number itself")
        return v

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number (NaN and infinity cannot train)")
        return v


def _takes_number_not_bool(annotation: Any) -> bool:
    """Whether a field's type admits int or float but not bool (unions, Optional and Annotated looked through)."""
    leaves, todo = set(), [annotation]
    while todo:
        t = todo.pop()
        if typing.get_origin(t) is Literal:
            continue
        args = typing.get_args(t)
        if args and typing.get_origin(t) is not None and typing.get_origin(t) not in (list, dict, tuple, set):
            todo += list(args)
        else:
            leaves.add(t)
    return bool(leaves & {int, float}) and bool not in leaves and Any not in leaves


class DataConfig(Strict):
    """Where tokens come from. `source` is 'embedded', a local file/dir/glob, or 'hf:<dataset>' for the hub."""

    source: str = "embedded"
    format: Literal["auto", "text", "json", "jsonl", "parquet"] = "auto"  # for local files; auto = by extension
    text_field: str = "text"  # column holding the text (json/jsonl/parquet/hub)
    hf_config: str | None = None  # hub dataset config name (e.g. 'sample-10BT')
    hf_split: str = "train"
    streaming: bool = False  # read documents lazily (hub: no full download); same tokens, one process
    max_documents: int | None = Field(None, ge=1)  # cap on documents read (useful with streaming)
    tokenizer: str = "byte"  # byte | bpe | hf:<name>
    vocab_size: int | None = Field(None, ge=1)  # bpe: size to train (default 4096); byte (257) / hf: None or padded
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)  # held-out fraction of documents for validation
    cache_dir: str | None = None  # token-shard cache; default $ULTRAMEM_CACHE or ~/.cache/ultramem
    num_proc: int = Field(2, ge=1)  # tokenisation worker processes
    embedded: dict[str, Any] = Field(default_factory=dict)  # options of the embedded corpus generator


class TrainConfig(Strict):
    """Optimisation and bookkeeping. Defaults follow the paper's Table 4 (AdamW 0.9/0.95, wd 0.1, cosine to 10%)."""

    tokens: float | str = "20xN"  # budget: a number of tokens ('5e6') or a multiple of active params ('20xN')
    steps: int | None = Field(None, ge=1)  # if set, overrides `tokens` (tokens = steps * batch_size * seq_len)
    batch_size: int | Literal["auto"] = "auto"  # sequences per optimizer step (global)
    micro_batch_size: int | None = Field(None, ge=1)  # sequences per forward/backward; None = batch_size
    seq_len: int | None = Field(None, ge=1)  # training context; None = model.seq_len
    lr: float | Literal["auto"] = "auto"  # peak LR; auto = derived from model size (see experiments.hparams)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # the schedule ends at lr * min_lr_ratio (its floor)
    warmup: float = Field(0.01, ge=0.0)  # fraction of steps (< 1) or a number of steps (>= 1)
    # LR after warmup: cosine to the floor (paper Table 4); wsd: constant ("stable"), then a cooldown over the
    # last `cooldown` fraction of the steps to the floor, shaped `cooldown_shape`; linear: straight to the floor
    schedule: Literal["cosine", "wsd", "linear"] = "cosine"
    cooldown: float = Field(0.2, gt=0.0, le=1.0)  # wsd: fraction of all steps spent cooling down
    cooldown_shape: Literal["linear", "1-sqrt"] = "linear"  # wsd: linear, or 1 - sqrt (Hagele et al. 2024)
    # wsd trunk: budgets (tokens '2e5' or 'KxN') at which cooldown branches end; the trunk keeps a checkpoint where
    # each branch's cooldown starts, and a sweep adds one run per budget (docs/sweeps.md "Cooldown branches")
    branches: list[float | str] = Field(default_factory=list)
    # a branch: the run id of its trunk, a sibling folder in the same sweep folder (never a path); set by the planner
    branch_of: str | None = None
    lr_mult_steps: int | None = Field(None, ge=1)  # steps the group LR multipliers' progress runs over; None: steps
    # wsd trunk: the clock of its branches' group LR multipliers (UltraMem's value LR, 4x -> 1x over the run): trunk
    # (each branch keeps the trunk's clock: the trunk's run cooled down) or own (from its branch step on, a branch
    # takes the multiplier a stand-alone run of its own budget has there; issue 26 item 3). Branch ids differ between
    # the two; the trunk's does not (like `branches`, it changes only which runs follow the trunk)
    branch_clock: Literal["trunk", "own"] = "trunk"
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables
    # AdamW's kernel: auto = torch's fused one wherever it has one (CUDA, CPU), for_loop = one tensor at a time
    # (torch's CPU default, and this suite's before issue 23). The same update up to fp32 rounding, so not in the
    # run id (like `threads`); a study trained in parts pins one so that all its runs share it
    adamw: Literal["auto", "fused", "for_loop"] = "auto"
    # the memory value tables: dense (AdamW visits every row every step, as the papers) or rows_read (only the rows
    # read in the step get a gradient and an AdamW update; unread rows keep their moments and skip weight decay:
    # Lample et al. 2019's sparse updates, ultramem.row_sparse; one process only). Changes training, so in the id
    value_updates: Literal["dense", "rows_read"] = "dense"
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1)
    ckpt_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    threads: int | None = Field(None, ge=1)  # torch intra-op threads on CPU (None = torch default)
    knowledge_probe: bool = True  # evaluate fact recall at the end when the corpus has facts

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not v > 0:
            raise ValueError("must be a number > 0 (a peak LR such as 3e-4) or 'auto'")
        return v

    @field_validator("tokens")
    @classmethod
    def _tokens_positive(cls, v: float | str) -> float | str:
        if not _positive_budget(v):
            raise ValueError("must be a number of tokens > 0 ('5e6') or 'KxN' with K > 0 (e.g. '20xN')")
        return v

    @field_validator("branches")
    @classmethod
    def _branches_positive(cls, v: list[float | str]) -> list[float | str]:
        for b in v:
            if not _positive_budget(b):
                raise ValueError(f"budget {b!r}: must be a number of tokens > 0 ('2e5') or 'KxN' with K > 0 "
                                 "(e.g. '10xN')")
        return v

    @field_validator("branch_of")
    @classmethod
    def _branch_of_is_a_run_id(cls, v: str | None) -> str | None:
        if v is not None and not RUN_ID.fullmatch(v):
            raise ValueError("must be the run id of the trunk, a sibling run folder (e.g. 'dense-0123456789'), not "
                             "a path; remove it unless this run is a cooldown branch (the sweep planner sets it)")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a number of sequences >= 1 or 'auto'")
        return v


class WandbConfig(Strict):
    mode: Literal["disabled", "offline", "online"] = "disabled"  # env WANDB_MODE overrides when set
    project: str = "ultramem-scaling"
    entity: str | None = None
    group: str | None = None  # default: the sweep name
    job_type: str | None = None  # default: the model family
    tags: list[str] = Field(default_factory=list)


class MemoryParallelConfig(Strict):
    mode: Literal["none", "dim", "row"] = "none"
    size: int = Field(1, ge=1)


class ParallelConfig(Strict):
    nproc: int = Field(1, ge=1)  # processes per run (torchrun --nproc_per_node)
    fsdp: bool = False
    activation_checkpointing: bool = False
    expert_parallel: int = Field(1, ge=1)
    memory_parallel: MemoryParallelConfig = Field(default_factory=MemoryParallelConfig)

    def layout(self, world_size: int) -> ParallelLayout:
        """This block on `world_size` processes, in the layout memory model's terms (torch-free)."""
        return ParallelLayout(world_size=world_size, fsdp=self.fsdp,
                              activation_checkpointing=self.activation_checkpointing,
                              expert_parallel=self.expert_parallel, memory_parallel=self.memory_parallel.mode,
                              memory_parallel_size=self.memory_parallel.size)


class RunConfig(Strict):
    name: str | None = None  # human-readable name; the run id is derived from the content
    sweep: str | None = None  # sweep this run belongs to (W&B group)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # NumPy's seed range: larger seeds would alias smaller ones
    model: dict[str, Any] = Field(default_factory=lambda: {"preset": "dense-tiny"})
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @field_validator("model")
    @classmethod
    def _model_has_preset_or_family(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "preset" in v and not (isinstance(v["preset"], str) and v["preset"].strip()):
            raise ValueError("'preset' is empty; name a preset (see `ultramem models`), or remove it and give a "
                             "full model with 'family'")
        if "preset" not in v and "family" not in v:
            raise ValueError("needs 'preset: <name>' (see `ultramem models`) or a full model with 'family'")
        return v


# A run id, `experiments.config.run_id`: the family (a registry name, or 'run') and 10 hex digits of the hash. It
# names a run folder, so it never holds a path separator or '..' (train.branch_of is checked against it).
RUN_ID = re.compile(r"[a-z][a-z0-9_]*-[0-9a-f]{10}")


def _positive_budget(v: float | str) -> bool:
    """A token budget > 0: a number, a numeric string, or 'KxN' with K > 0 (`parse_token_budget` reads it)."""
    if isinstance(v, str):
        m = _MULTIPLE.match(v)
        try:
            v = float(m.group(1) if m else v)
        except ValueError:
            return True  # not a number at all: parse_token_budget names the allowed forms when it is resolved
    return math.isfinite(v) and v > 0


# ---- loading ---------------------------------------------------------------------------------------------------


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per error: `SOURCE: FIELD: what is wrong and the fix (got VALUE)`; several errors follow a header."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{loc}: {msg} (got {e.get('input')!r})")
    if len(lines) == 1:
        return f"{source}: {lines[0]}"
    return "\n".join([f"{source}: invalid configuration", *(f"  {line}" for line in lines)])


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:  # the keys written here; those merged in by `<<:` may be overridden
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if key in first:
                    raise DuplicateKeyError(key, first[key].start_mark, key_node.start_mark)
                first[key] = key_node
        return super().construct_mapping(node, deep)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark):
        super().__init__(None, None, f"duplicate key {key!r}", second)
        self.key, self.first_line, self.second_line = key, first.line + 1, second.line + 1


def safe_load(stream: Any, source: str = "<string>") -> Any:
    """yaml.safe_load that refuses duplicate keys: ConfigError naming `source`, the key and both lines."""
    try:
        return yaml.load(stream, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except DuplicateKeyError as err:
        raise ConfigError(f"{source}: key {err.key!r} is given twice, at line {err.first_line} and at line "
                          f"{err.second_line}; keep one (YAML would silently use the last)") from None
    except yaml.YAMLError as err:  # syntax errors; python/* tags, which a SafeLoader refuses to construct
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the path of a YAML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML text file (byte {err.start:,} is not UTF-8: {err.reason}); give the "
                          "path of a UTF-8 YAML file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err}); check the path and its permissions") from None
    data = safe_load(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """['train.lr=1e-3', 'model.memory.top_m=8'] -> nested dict. Values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value (e.g. train.lr=1e-3)")
        key, value = pair.split("=", 1)
        out = deep_merge(out, expand_dotted({key.strip(): safe_load(value, f"--set {pair!r}")}))
    return out


def run_config_from_dict(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    data = deep_merge(load_yaml(path), parse_set(overrides or []))
    return run_config_from_dict(data, str(path))


# ---- resolution --------------------------------------------------------------------------------------------------

_MULTIPLE = re.compile(r"^\s*([0-9.eE+-]+)\s*x\s*N\s*$")


def resolve_model(model: dict[str, Any], vocab_size: int | None, source: str = "<config>") -> ModelConfig:
    """Preset + field-by-field overrides -> a validated ModelConfig (vocab from the tokenizer when known)."""
    from ultramem.presets import get_preset

    spec = expand_dotted(dict(model))
    preset = spec.pop("preset", None)
    try:
        base = get_preset(preset) if preset else ModelConfig(family=spec.get("family", "dense"))
        if vocab_size is not None:
            spec.setdefault("vocab_size", vocab_size)
        return base.override(spec)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def parse_token_budget(tokens: float | str, active_params: int, source: str = "train.tokens") -> int:
    """'20xN' -> 20 * active params; '5e6' or 5e6 -> 5,000,000."""
    if isinstance(tokens, int | float):
        return int(tokens)
    m = _MULTIPLE.match(tokens)
    if m:
        return int(float(m.group(1)) * active_params)
    try:
        return int(float(tokens))
    except ValueError:
        raise ConfigError(f"{source}: invalid token budget {tokens!r}; allowed: a number ('5e6') or 'KxN' "
                          "(K times the active parameter count, e.g. '20xN')") from None


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


# Fields that never change what a run computes, and so are left out of its id.
_NOT_IN_ID = ("name", "sweep", "wandb", "parallel")  # the layout changes how a run is computed, not what
_TRAIN_NOT_IN_ID = ("log_every", "ckpt_every", "keep_checkpoints", "device", "compile", "threads", "adamw",
                    "branches", "branch_clock")  # a trunk's branch list changes which checkpoints it keeps, not what it computes
# Fields added after the first run ids were issued enter the id only when set away from their default, so that
# every earlier run keeps its id (and a finished sweep is still skipped): block path -> {field: default}.
_ID_SINCE_V1: dict[tuple[str, ...], dict[str, Any]] = {
    ("train",): {"schedule": "cosine", "cooldown": 0.2, "cooldown_shape": "linear", "branch_of": None,
                 "lr_mult_steps": None, "value_updates": "dense"},
    ("model", "memory"): {"balance_loss_weight": 0.0, "value_weight_decay": None},
    ("model", "memory_plus"): {"value_lr_schedule": "constant", "value_clip": "joint"},
}


def run_id(resolved: dict[str, Any]) -> str:
    """<family>-<short hash of the resolved config>, stable across key order and bookkeeping-only fields."""
    content = json.loads(canonical_json({k: v for k, v in resolved.items() if k not in _NOT_IN_ID}))
    content["train"] = {k: v for k, v in content.get("train", {}).items() if k not in _TRAIN_NOT_IN_ID}
    for path, defaults in _ID_SINCE_V1.items():
        block = content
        for key in path:
            block = block.get(key) if isinstance(block, dict) else None
        if isinstance(block, dict):
            for k, default in defaults.items():
                if k in block and block[k] == default:
                    del block[k]
    content.get("data", {}).pop("cache_dir", None)
    content.get("data", {}).pop("num_proc", None)
    digest = hashlib.sha256(canonical_json(content).encode()).hexdigest()[:10]
    family = resolved.get("model", {}).get("family", "run")
    return f"{family}-{digest}"


# ---- WSD cooldown branches ---------------------------------------------------------------------------------------


def wsd_cooldown_start(steps: int, warmup: int, cooldown: float) -> int:
    """The first cooldown step (0-based) of a WSD schedule of `steps` steps: the last `cooldown` fraction of the
    steps (at least one) cools down, never before warmup ends. experiments.trainer.lr_at uses it."""
    return max(int(warmup), int(steps) - max(1, round(cooldown * int(steps))))


def branch_points(train: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(tokens, steps, branch step) of each cooldown branch of a resolved trunk's `train` block, in budget order.

    A branch of budget D runs steps_b = D / (batch_size * seq_len) steps with the trunk's WSD schedule computed for
    its own length; its cooldown starts at `wsd_cooldown_start(steps_b)`, the branch step, where it leaves the
    trunk (whose LR is still the constant peak there). The trunk keeps its checkpoint of that step."""
    per_step = int(train["batch_size"]) * int(train["seq_len"])
    out = []
    for tokens in train.get("branches") or []:
        steps = int(tokens) // per_step
        out.append((steps * per_step, steps, wsd_cooldown_start(steps, int(train["warmup"]), train["cooldown"])))
    return out


def branch_config(trunk: dict[str, Any], tokens: int) -> dict[str, Any]:
    """The resolved config of the trunk's cooldown branch to `tokens` (a budget from `branch_points`): the trunk's
    config with that budget, no branches of its own, `branch_of` = the trunk's run id, and the group LR multipliers
    kept on the trunk's clock (`lr_mult_steps`), so the branch is the trunk's run cooled down at its branch step;
    with the trunk's `branch_clock: own` they run over the branch's own steps instead (a stand-alone run's value LR
    from the branch step on)."""
    t = trunk["train"]
    steps = int(tokens) // (int(t["batch_size"]) * int(t["seq_len"]))
    out = json.loads(json.dumps(trunk))
    own = t.get("branch_clock", "trunk") == "own"
    out["train"].update(tokens=int(tokens), steps=steps, branches=[], branch_of=run_id(trunk),
                        lr_mult_steps=None if own else t.get("lr_mult_steps") or int(t["steps"]))
    return out
