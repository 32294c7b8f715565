"""Typed run configuration: one `RunConfig` describes one training run completely.

The resolved form (preset expanded into every model field, vocabulary size taken from the tokenizer, budgets turned
into numbers) is what the run folder saves as `config.yaml`, what the run id hashes, and what the trainer reads.
Unknown keys anywhere are errors that name the file, the dotted field and the allowed keys.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ultramem.config import ConfigError, ModelConfig, deep_merge, expand_dotted

if TYPE_CHECKING:
    from ultramem.accounting import ParallelLayout


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    """Where tokens come from. `source` is 'embedded', a local file/dir/glob, or 'hf:<dataset>' for the hub."""

    source: str = "embedded"
    format: Literal["auto", "text", "json", "jsonl", "parquet"] = "auto"  # for local files; auto = by extension
    text_field: str = "text"  # column holding the text (json/jsonl/parquet/hub)
    hf_config: str | None = None  # hub dataset config name (e.g. 'sample-10BT')
    hf_split: str = "train"
    streaming: bool = False  # read documents lazily (hub: no full download); same tokens, one process
    max_documents: int | None = None  # cap on documents read (useful with streaming)
    tokenizer: str = "byte"  # byte | bpe | hf:<name>
    vocab_size: int | None = None  # bpe: size to train (default 4096); byte (257) / hf: None or a padded size
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)  # held-out fraction of documents for validation
    cache_dir: str | None = None  # token-shard cache; default $ULTRAMEM_CACHE or ~/.cache/ultramem
    num_proc: int = Field(2, ge=1)  # tokenisation worker processes
    embedded: dict[str, Any] = Field(default_factory=dict)  # options of the embedded corpus generator


class TrainConfig(Strict):
    """Optimisation and bookkeeping. Defaults follow the paper's Table 4 (AdamW 0.9/0.95, wd 0.1, cosine to 10%)."""

    tokens: float | str = "20xN"  # budget: a number of tokens ('5e6') or a multiple of active params ('20xN')
    steps: int | None = None  # if set, overrides `tokens` (tokens = steps * batch_size * seq_len)
    batch_size: int | Literal["auto"] = "auto"  # sequences per optimizer step (global)
    micro_batch_size: int | None = None  # sequences per forward/backward; None = batch_size (no accumulation)
    seq_len: int | None = None  # training context; None = model.seq_len
    lr: float | Literal["auto"] = "auto"  # peak LR; auto = derived from model size (see experiments.hparams)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # cosine ends at lr * min_lr_ratio
    warmup: float = Field(0.01, ge=0.0)  # fraction of steps (< 1) or a number of steps (>= 1)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1)
    ckpt_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    threads: int | None = None  # torch intra-op threads on CPU (None = torch default)
    knowledge_probe: bool = True  # evaluate fact recall at the end when the corpus has facts


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
        """This block on `world_size` processes, in the accounting module's terms (torch-free)."""
        from ultramem.accounting import ParallelLayout

        return ParallelLayout(world_size=world_size, fsdp=self.fsdp,
                              activation_checkpointing=self.activation_checkpointing,
                              expert_parallel=self.expert_parallel, memory_parallel=self.memory_parallel.mode,
                              memory_parallel_size=self.memory_parallel.size)


class RunConfig(Strict):
    name: str | None = None  # human-readable name; the run id is derived from the content
    sweep: str | None = None  # sweep this run belongs to (W&B group)
    seed: int = 0
    model: dict[str, Any] = Field(default_factory=lambda: {"preset": "dense-tiny"})
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @field_validator("model")
    @classmethod
    def _model_has_preset_or_family(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "preset" not in v and "family" not in v:
            raise ValueError("needs 'preset: <name>' (see `ultramem models`) or a full model with 'family'")
        return v


# ---- loading ---------------------------------------------------------------------------------------------------


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
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
        out = deep_merge(out, expand_dotted({key.strip(): yaml.safe_load(value)}))
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
_TRAIN_NOT_IN_ID = ("log_every", "ckpt_every", "keep_checkpoints", "device", "compile", "threads")


def run_id(resolved: dict[str, Any]) -> str:
    """<family>-<short hash of the resolved config>, stable across key order and bookkeeping-only fields."""
    content = json.loads(canonical_json({k: v for k, v in resolved.items() if k not in _NOT_IN_ID}))
    content["train"] = {k: v for k, v in content.get("train", {}).items() if k not in _TRAIN_NOT_IN_ID}
    content.get("data", {}).pop("cache_dir", None)
    content.get("data", {}).pop("num_proc", None)
    digest = hashlib.sha256(canonical_json(content).encode()).hexdigest()[:10]
    family = resolved.get("model", {}).get("family", "run")
    return f"{family}-{digest}"
