"""Sharding a ultramem Transformer over several processes (torch.distributed; gloo on CPU, NCCL on GPU).

    memory_parallel   memory value tables split by columns (dim, the official code) or rows (row)  paper §5;
                      UltraMem, Memory+ (dim, row) and UltraMemV2 (dim: values and pre-values)
    expert_parallel   MoE experts split over ranks, tokens moved by all-to-all, balance loss over the global batch
    fsdp              FSDP2 fully_shard per block / memory layer / root, bf16 compute with fp32 reductions on CUDA
    comm              differentiable all-to-all and all-gather that count the bytes each rank sends

Each function changes the model in place and returns the parameters it now owns; `experiments.distributed` picks
them from RunConfig.parallel, in the order memory/expert parallelism, activation checkpointing, then FSDP (which
ignores what the first two own). Which layouts a model accepts, what they send and what they need per GPU is in
`ultramem.layout` (ParallelLayout, check_layout, memory_parallel_bytes, train_memory). Which modules expert and
memory parallelism split comes from the family registry (`Family.parallel`, ultramem/families).
"""

from ultramem.parallel.comm import CommStats, reduce_gradients
from ultramem.parallel.expert_parallel import shard_experts
from ultramem.parallel.fsdp import apply_activation_checkpointing, apply_fsdp, refresh_rank1
from ultramem.parallel.memory_parallel import shard_value_tables

__all__ = [
    "CommStats",
    "apply_activation_checkpointing",
    "apply_fsdp",
    "reduce_gradients",
    "refresh_rank1",
    "shard_experts",
    "shard_value_tables",
]
