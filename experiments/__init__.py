"""Experiment orchestration: run configs and their resolution, data, the trainer and its checkpoints, W&B mirror,
sweeps (schema, grid, plan, pricing) and the Ray scheduler (docs/architecture.md). The run folder's records are
`runfolder/`; the `ultramem` command is `cli/`, which nothing here imports."""
