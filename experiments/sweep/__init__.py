"""Sweep files: a W&B-sweep-shaped YAML grid -> a list of resolved runs -> a plan (params, FLOPs, GPU-hours).

A sweep file (docs/sweeps.md has the full reference):

    name: tiny-cpu
    method: grid                        # grid: cartesian product | list: the i-th run takes the i-th value of each
    base: {data: {source: embedded}}    # a RunConfig mapping, or a path to one (relative to the sweep file)
    presets: {}                         # sweep-local named models: name -> model mapping (may start from `preset:`)
    parameters:
      model.preset: {values: [dense-tiny, moe-tiny, ultramem-tiny]}
      train.tokens: {value: 20xN}
    conditional:                        # applied, in order, to the points whose values match `when`
      - when: {model.family: moe}
        parameters: {model.moe.num_experts: {values: [4, 8]}}
    seeds: [0, 1]
    resources:
      default: {cpus: 1, memory_gb: 2}
      rules: [{min_params: 1e9, gpus: 4}]    # later rules win; `when` and `min_params` (total params) select runs
    wandb: {mode: offline}
    output_dir: runs/tiny-cpu           # default: $ULTRAMEM_RUNS_DIR/<name>, or runs/<name>

One module per job, in the order a sweep flows through them:
  schema.py   the file's schema, load_sweep (errors name file and field), check_key, the runs directory
  grid.py     expand: grid (or zipped list) x conditional blocks x seeds -> Points, `when` predicates
  plan.py     plan_sweep: each Point resolved, counted, given resources, priced -> Plan of PlannedRuns
  table.py    plan_table: the plan as text
The price model and the GPU-memory fit checks are `experiments.pricing`; text formats `experiments.textfmt`.

Planning never imports torch: configs are resolved by `experiments.resolve` and counted by `ultramem.accounting`.
"""

from experiments.sweep.grid import Point, expand
from experiments.sweep.plan import Plan, PlannedRun, plan_sweep
from experiments.sweep.schema import (
    Conditional,
    ParamSpec,
    ResourceRule,
    Resources,
    ResourceSpec,
    SweepFile,
    check_key,
    load_sweep,
    runs_dir,
    sweep_runs_dir,
)
from experiments.sweep.table import plan_table

__all__ = [
    "Conditional",
    "ParamSpec",
    "Plan",
    "PlannedRun",
    "Point",
    "ResourceRule",
    "ResourceSpec",
    "Resources",
    "SweepFile",
    "check_key",
    "expand",
    "load_sweep",
    "plan_sweep",
    "plan_table",
    "runs_dir",
    "sweep_runs_dir",
]
