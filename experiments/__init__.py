"""Experiment orchestration: data, trainer, run store, W&B mirror, sweeps, Ray scheduler and the `ultramem` CLI."""
