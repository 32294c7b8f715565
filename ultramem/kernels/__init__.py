"""Compute kernels for memory layers: value retrieval (gather-weight-pool) and its reference."""
