"""Distributed training strategies: RunConfig.parallel -> a sharded model, its gradients, its checkpoints.

    par = Parallel.from_config(cfg.parallel, mcfg, env)    # ParallelLayout checked against the model
    raw = par.prepare(build_model(mcfg))                    # shard in place, move to the device
    model = par.wrap(raw)                                   # DDP when something stays replicated, else raw
    ... backward ...; par.finish_gradients(raw); par.clip_grad_norm_(raw, max_norm); opt.step()
    par.on_optimizer_step(raw)
    par.save(rd, step, raw, opt, extras, keep);  extras = par.load_latest(rd, raw, opt)

Layouts (docs/parallelism.md): with nothing sharded (`parallel: {nproc: K}`) this is the trainer's DDP path,
unchanged, with its single-file checkpoints. Otherwise memory parallelism splits the value tables of UltraMem,
Memory+ and UltraMemV2 (`memory_parallel: {mode: dim|row, size: P}`; a table shared by several layers is split once,
and its shards are ignored by DDP by their first name, `shared.*`), expert parallelism splits MoE experts (`expert_parallel: P`),
`fsdp` shards everything else with FSDP2 (DDP replicates it when false), `activation_checkpointing` recomputes
block activations; and checkpoints are sharded `torch.distributed.checkpoint` folders,
`checkpoints/step_XXXXXXXX.dcp/`, which load into any layout and any number of processes (one process with no
process group included): DCP stores each tensor's global shape and every shard's offsets, and the loader reads
the pieces its own shards overlap.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import random
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from experiments import checkpoint
from experiments.config import ParallelConfig
from runfolder import RunDir
from runfolder.atomic import fsync_dir
from ultramem.config import ConfigError, ModelConfig
from ultramem.families import get_family
from ultramem.layout import ParallelLayout, check_layout
from ultramem.parallel import (
    CommStats,
    apply_activation_checkpointing,
    apply_fsdp,
    reduce_gradients,
    refresh_rank1,
    shard_experts,
    shard_value_tables,
)
from ultramem.precision import at_least_fp32, compute_dtype


def setup_process_group(device: torch.device) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL bound to this rank's GPU on CUDA, gloo on CPU.
    Returns (rank, world size); `teardown` leaves it."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return rank, world


@dataclass
class Parallel:
    """The runtime side of a ParallelLayout for one process (rank `rank` of `layout.world_size`)."""

    layout: ParallelLayout
    device: torch.device
    rank: int = 0
    stats: CommStats = field(default_factory=CommStats)
    owned: list[tuple[list[nn.Parameter], Any]] = field(default_factory=list)  # (params, their data-parallel group)
    family: str = "dense"
    bf16: bool = False  # the run computes in bf16 (FSDP then gathers parameters in bf16 on CUDA)

    @classmethod
    def from_config(cls, parallel: ParallelConfig, mcfg: ModelConfig, device: torch.device, rank: int,
                    world_size: int, bf16: bool = False, source: str = "<config>") -> Parallel:
        layout = parallel.layout(world_size)
        try:
            check_layout(mcfg, layout)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        return cls(layout, device, rank, family=mcfg.family, bf16=bf16)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    # ---- building --------------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard `model` (built identically on every rank, on the CPU) in place and move it to the device."""
        lay, dev = self.layout, self.device.type
        if lay.memory_parallel != "none":
            P = lay.memory_parallel_size
            mesh = init_device_mesh(dev, (lay.world_size // P, P), mesh_dim_names=("mdp", "mp"))
            self.owned.append((shard_value_tables(model, lay.memory_parallel, mesh, self.stats),
                               mesh.get_group("mdp")))
        if lay.expert_parallel > 1:
            P = lay.expert_parallel
            mesh = init_device_mesh(dev, (lay.world_size // P, P), mesh_dim_names=("edp", "ep"))
            self.owned.append((shard_experts(model, mesh, None, self.stats), mesh.get_group("edp")))
        if lay.activation_checkpointing:
            apply_activation_checkpointing(model)
        if lay.fsdp:
            mesh = init_device_mesh(dev, (lay.world_size,))
            apply_fsdp(model, mesh, ignored={p for params, _ in self.owned for p in params}, bf16=self.bf16)
        return model.to(self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls: DDP over what is replicated, the model itself under FSDP."""
        if self.world_size == 1 or self.layout.fsdp:
            return model
        owned = {id(p) for params, _ in self.owned for p in params}
        if owned:
            names = [n for n, p in model.named_parameters() if id(p) in owned]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            # an expert may receive no token in a micro-batch (with expert parallelism the experts are not DDP's)
            find_unused_parameters=get_family(self.family).parallel.unused_parameters
            and self.layout.expert_parallel == 1)

    # ---- the step ----------------------------------------------------------------------------------------------

    def finish_gradients(self, model: nn.Module) -> None:
        """After the last micro-batch's backward: reduce the expert/value shards over their data-parallel groups."""
        for params, group in self.owned:
            reduce_gradients(params, group, self.world_size)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Total gradient norm (clipped to max_norm), over shards that live on different meshes."""
        if not self.layout.sharded:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return clip_grad_norm_(list(model.parameters()), max_norm)

    def on_optimizer_step(self, model: nn.Module) -> None:
        if self.layout.fsdp:
            refresh_rank1(model)
        else:
            model.on_optimizer_step()

    def take_comm(self) -> dict[str, int]:
        """Bytes this rank sent for memory/expert parallelism since the last call, by kind."""
        return self.stats.take()

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def save(self, rd: RunDir, step: int, model: nn.Module, opt: torch.optim.Optimizer, extras: dict[str, Any],
             keep: int) -> None:
        """The checkpoint of `step`: one file from rank 0 (nothing sharded) or a DCP folder from every rank."""
        if not self.layout.sharded:
            if self.rank == 0:
                checkpoint.save(rd, step, {"model": model.state_dict(), "optimizer": opt.state_dict(), **extras},
                                keep)
            _barrier(self.world_size)
            return
        save_sharded(rd, step, model, opt, extras, keep, self.rank, self.world_size)

    def load_latest(self, rd: RunDir, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Load the newest checkpoint (either kind) that verifies into model and optimizer; return its other entries.

        A damaged one (checksum mismatch, or no checksum and unreadable) is moved aside to `<name>.corrupt` with a
        warning on stderr, and the next older one is tried; None when none is left (a fresh start). Rank 0 checks
        the checksums and moves files; every rank takes the same decision."""
        touched = []  # damaged DCP folders whose failed load may have written into model / optimizer
        for path in reversed(checkpoint.all_checkpoints(rd)):
            sharded = path.suffix == checkpoint.SHARDED_SUFFIX
            if not sharded and self.layout.sharded:
                raise ConfigError(f"{path} is a single-file checkpoint (written without sharding); resume it with "
                                  "its own layout (parallel.fsdp: false, expert_parallel: 1, memory_parallel.mode: "
                                  "none) until the next checkpoint, or start a new run folder")
            # 0 verified, 1 no checksum (older checkpoint), 2 damaged
            code, reason = 0, None
            if self.rank == 0:
                try:
                    code = 0 if checkpoint.verify(path) else 1
                except checkpoint.CorruptCheckpoint as err:
                    code, reason = 2, str(err)
            code = self._agree(code)
            if code < 2:
                try:  # a checkpoint that verifies but does not load is no damaged file: that error is raised
                    state = (load_sharded(path, model, opt, verified=code == 0) if sharded
                             else self._load_file(path, model, opt, verified=code == 0))
                except checkpoint.CorruptCheckpoint as err:
                    reason, code = str(err), 2
                    touched += [path] if sharded else []
                code = self._agree(code)
                if code < 2:
                    return state
            if self.rank == 0:
                moved = checkpoint.move_aside(path)
                print(f"warning: damaged checkpoint: {reason or f'{path}: fails to load on another rank'}; moved "
                      f"it aside to {moved.name}; trying the next older checkpoint", file=sys.stderr, flush=True)
            _barrier(self.world_size)
        if touched:
            raise RuntimeError(f"{rd.ckpt_dir}: no checkpoint loads; the damaged ones were moved aside "
                               f"({', '.join(p.name for p in touched)} and any others named above), after a partial "
                               "load. Run the same command again to train the run from step 0")
        return None

    def _load_file(self, path: Any, model: nn.Module, opt: torch.optim.Optimizer, verified: bool) -> dict[str, Any]:
        state = checkpoint.load(path, verified)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        return state

    def _agree(self, code: int) -> int:
        """The largest `code` over all ranks."""
        if self.world_size == 1 or not dist.is_initialized():
            return code
        t = torch.tensor([code], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


# ---- optimizer groups and gradient norm across meshes ---------------------------------------------------------


def split_by_mesh(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split each optimizer group so that its parameters are all plain tensors or all DTensors of one mesh (the
    foreach and fused AdamW kernels take a group's tensors in one call). Groups without DTensors are unchanged."""
    out = []
    for group in groups:
        kinds: dict[Any, list[nn.Parameter]] = {}
        for p in group["params"]:
            kinds.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        out += [{**group, "params": params} for params in kinds.values()]
    return out


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a mix of plain tensors and DTensors on different meshes.

    Each gradient adds its local sum of squares to a bucket keyed by the mesh dimensions it is sharded over; a
    bucket is all-reduced over those dimensions' groups (replicated dimensions hold copies and are not summed).
    """
    buckets: dict[tuple, torch.Tensor] = {}
    locals_: list[torch.Tensor] = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            key = tuple(g.device_mesh.get_group(i) for i, pl in enumerate(g.placements) if isinstance(pl, Shard))
            g = g.to_local()
        else:
            key = ()
        locals_.append(g)
        sq = at_least_fp32(g.detach()).pow(2).sum()
        buckets[key] = buckets[key] + sq if key in buckets else sq
    total = torch.zeros((), device=locals_[0].device if locals_ else None,
                        dtype=compute_dtype(locals_[0].dtype) if locals_ else None)
    for groups, sq in buckets.items():
        for group in groups:
            dist.all_reduce(sq, group=group)
        total = total + sq
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in locals_:
        g.mul_(coef.to(g.dtype))
    return norm


# ---- sharded checkpoints (torch.distributed.checkpoint) ----------------------------------------------------------


def save_sharded(rd: RunDir, step: int, model: nn.Module, opt: torch.optim.Optimizer, extras: dict[str, Any],
                 keep: int, rank: int, world_size: int) -> None:
    """Every rank writes its shards into a temp folder; rank 0 renames it into place once all have finished (a
    kill mid-save leaves the previous checkpoint the newest complete one), then prunes to `keep`.

    `extras` (loader position, logging window, every rank's RNG, last means) is identical on all ranks and is
    stored as one opaque blob, so its shape (e.g. the number of RNG states) may differ from the loader's; like a
    single-file checkpoint it holds tensors and plain values only (`load_sharded` reads it safely).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint.sharded_path(rd, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world_size)
    msd, osd = get_state_dict(model, opt)
    blob = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT_VERSION, "step": step, **extras}, blob)
    # as `bytes`, which DCP pickles as a plain value (a BytesIO would be pickled as an object a safe load refuses)
    dcp.save({"model": msd, "optim": osd, "extras": blob.getvalue()}, checkpoint_id=tmp)
    _barrier(world_size)
    if rank == 0:
        checkpoint.write_sharded_checksums(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        checkpoint.prune(rd, keep)
    _barrier(world_size)


def load_sharded(path: os.PathLike, model: nn.Module, opt: torch.optim.Optimizer,
                 verified: bool = False) -> dict[str, Any]:
    """Load a DCP checkpoint into `model` and `opt` in their current layout; return the extras (step included).

    A folder that DCP cannot read raises CorruptCheckpoint, unless it passed its checksums (`verified`): then the
    fault is not the files' and DCP's own error is raised. Nothing in the folder runs code: DCP's `.metadata` is
    read by an unpickler that builds DCP's own metadata records only, and every non-tensor entry (the extras, the
    optimizer's hyperparameters) with torch.load(weights_only=True) (checkpoint.read: UnsafeCheckpoint otherwise).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)  # initialises the optimizer state so that it has shards to load into
    state = {"model": msd, "optim": osd, "extras": io.BytesIO()}
    refused: list[checkpoint.UnsafeCheckpoint] = []  # what the reader and planner refused (DCP rewraps errors)
    reader, planner = _safe_dcp_reader(path, refused), _safe_dcp_planner(os.fspath(path), refused)
    with contextlib.ExitStack() as stack:
        if not dist.is_initialized():  # one process reading a checkpoint that many wrote: DCP's no-dist mode
            import warnings

            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        stack.enter_context(_quiet_dcp_logs())
        try:
            dcp.load(state, storage_reader=reader, planner=planner)
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            if refused:  # not a damaged file: its content was refused (DCP reports it as another error)
                raise refused[0] from None
            if verified:
                raise
            raise checkpoint.CorruptCheckpoint(f"{os.fspath(path)}: cannot be loaded ({type(err).__name__}: "
                                               f"{str(err)[:500]})") from err
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extras = state["extras"]  # the blob's bytes (a BytesIO in folders written before safe loading, read if trusted)
    if isinstance(extras, bytes | io.BytesIO):
        extras = checkpoint.read(io.BytesIO(extras) if isinstance(extras, bytes) else extras,
                                 f"{os.fspath(path)} (extras)")
    if not isinstance(extras, dict):
        raise checkpoint.CorruptCheckpoint(f"{os.fspath(path)}: its extras are a {type(extras).__name__}, not a dict")
    if extras.get("format") != checkpoint.FORMAT_VERSION:
        raise RuntimeError(f"{path}: checkpoint format {extras.get('format')!r}, this trainer reads "
                           f"{checkpoint.FORMAT_VERSION}; delete {os.fspath(path)} to restart from an older one")
    return extras


# ---- reading DCP folders without running code from them ------------------------------------------------------------

# What DCP's `.metadata` pickle may build: its own metadata records (dataclasses and an enum), torch.Size, dtypes,
# layouts and paths. Everything else (os.system, builtins.eval, ...) is refused before it is looked up.
# Each is a record (a dataclass or an enum) or a value constructor without side effects.
_DCP_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", c) for c in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *((m, c) for m in ("pathlib", "pathlib._local")  # (Python 3.13 moved the classes)
      for c in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


def _safe_dcp_reader(path: os.PathLike, refused: list[checkpoint.UnsafeCheckpoint]) -> Any:
    """A DCP FileSystemReader whose `.metadata` is read by _MetadataUnpickler (DCP's own uses pickle.load);
    refusals are appended to `refused`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            meta_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(meta_path, "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except pickle.UnpicklingError as err:
                    refused.append(checkpoint.UnsafeCheckpoint(
                        f"{os.fspath(meta_path)}: refused: {err}; loading it could run code from the file. Delete "
                        f"{os.fspath(path)} to resume from an older checkpoint or start over"))
                    raise refused[-1] from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_dcp_planner(name: str, refused: list[checkpoint.UnsafeCheckpoint]) -> Any:
    """DCP's DefaultLoadPlanner, reading every non-tensor entry with checkpoint.read (weights_only=True) instead of
    torch.load(weights_only=False); refusals are appended to `refused`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                obj = checkpoint.read(value, f"{name} ({fqn})")
            except checkpoint.UnsafeCheckpoint as err:
                refused.append(err)
                raise
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafePlanner()


@contextlib.contextmanager
def _quiet_dcp_logs() -> Any:
    """Drop DCP's own log records: it logs a traceback on the root logger for every failed read of a metadata file
    (printed by Python's last-resort handler), while load_sharded reports the failure in one line. A filter on the
    root logger sees only records logged on it directly, so nobody else's logging changes."""
    def not_dcp(record: logging.LogRecord) -> bool:
        return "torch/distributed/checkpoint/" not in record.pathname.replace(os.sep, "/")

    root = logging.getLogger()
    root.addFilter(not_dcp)
    try:
        yield
    finally:
        root.removeFilter(not_dcp)


def restore_rng(rngs: list[dict[str, Any]], rank: int, world_size: int, seed: int, step: int,
                device: torch.device) -> None:
    """Each rank's own RNG state when the world size is unchanged; after a resize the streams cannot continue
    (there are more or fewer of them), so every rank reseeds from (seed, step, rank) instead."""
    if len(rngs) == world_size:
        checkpoint.set_rng_state(rngs[rank], device)
        return
    s = (seed * 1_000_003 + step) * 1009 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def teardown() -> None:
    """Leave the process group (after the last collective), so that the process exits cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
