"""The one place the memory layers get their value retrieval (gather, weight by score, pool by IVE group).

`ultramem/kernels/retrieval.py` (the fused kernel with the same semantics) is being written in parallel; until it
lands the layers use the naive reference, which materialises [tokens, K, D_v]. Switch this import when it does.
"""

from ultramem.kernels.reference import gather_pool_reference as gather_pool

__all__ = ["gather_pool"]
