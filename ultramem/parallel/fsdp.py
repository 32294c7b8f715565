"""FSDP2 for the dense part of the model: `fully_shard` per transformer block, per memory layer and at the root.

Each unit's parameters are sharded (dim 0) over all ranks and all-gathered just before its forward/backward;
gradients are reduce-scattered after its backward (every micro-batch). Units: each `Block` (attention + MLP or MoE
router, plus the experts unless expert parallelism owns them), each memory layer (queries, keys, cores, value
projection, plus the value table unless memory parallelism owns it) and the root (embedding, final norm and the
tied head, which must stay in one unit).

Mixed precision on CUDA with bf16 training (`MixedPrecisionPolicy`): parameters all-gathered and computed in bf16,
gradients reduced in fp32 into the fp32 master shards that AdamW updates (the paper trains bf16 with fp32 master
weights). On CPU, or with train.dtype fp32, everything stays fp32, which is what makes the gloo tests exact.

Parameters owned by expert/memory parallelism are `ignored_params` of every unit: they are already split their own
way and their gradients are finished by `reduce_gradients`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def mixed_precision(device_type: str, bf16: bool) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 reductions for bf16 training on CUDA, plain fp32 otherwise."""
    if device_type == "cuda" and bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, ignored: set[nn.Parameter] | None = None,
               bf16: bool = False) -> nn.Module:
    """Shard `model` (a ultramem Transformer) in place: one FSDP unit per block, per memory layer, and the root."""
    policy = mixed_precision(mesh.device_type, bf16)
    ignored = set(ignored or ())
    # A memory layer returns a view ([B*T, d] -> [B, T, d]); FSDP warns that an in-place op on it would skip its
    # backward hook. The Transformer adds memory outputs out of place (x = x + y), so the warning does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w+Layer\) returned a view tensor")
    for unit in [*model.blocks, *model.memories]:
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    # The root's forward ends the step: keeping its parameters gathered saves an all-gather before the backward.
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored, reshard_after_forward=False)
    return model


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in the backward instead of keeping them (composable checkpoint: no
    wrapper module, so parameter names and checkpoints are unchanged). Memory layers are not recomputed: under
    memory parallelism that would repeat their communication."""
    for block in model.blocks:
        checkpoint(block)
    return model


def refresh_rank1(model: nn.Module) -> None:
    """`model.on_optimizer_step()` for sharded Tucker cores: the TDQKR SVD needs the whole fp32 cores, so each
    layer refreshes against the gathered master copy (FSDP's own unshard would hand it the bf16 compute copy)."""
    for layer in model.memories:
        retrieval = getattr(layer, "retrieval", None)
        if retrieval is None:
            layer.on_optimizer_step()
            continue
        with _full_parameter(retrieval, "cores"):
            layer.on_optimizer_step()


@contextlib.contextmanager
def _full_parameter(module: nn.Module, name: str) -> Iterator[None]:
    sharded = module._parameters[name]
    full = sharded.full_tensor() if hasattr(sharded, "full_tensor") else sharded
    module._parameters[name] = full
    try:
        yield
    finally:
        module._parameters[name] = sharded
