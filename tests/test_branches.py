"""WSD cooldown branches end to end (docs/sweeps.md "Cooldown branches"): the planner derives one run per branch
budget from a trunk, the trunk keeps its checkpoint where each branch's cooldown starts, a branch starts from it and
is bitwise the direct WSD run of its budget (CPU, fp32), the scheduler starts a branch only once that checkpoint
exists, on the local backend and on Ray, re-runs skip, and a killed trunk's pending branches still run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from experiments.config import TrainConfig, branch_points, run_id, wsd_cooldown_start
from experiments.scheduler import run_sweep
from experiments.sweep import plan_sweep
from experiments.trainer import lr_at
from runfolder import RunDir
from ultramem.config import ConfigError

REPO = Path(__file__).resolve().parents[1]

# Tiny: dense-tiny, 4 x 32 tokens a step (128), one eval batch, no probe; one thread per run (the scheduler's
# OMP_NUM_THREADS = cpus), so every run computes the same floats whatever the backend.
BASE = """
base:
  data: {source: embedded}
  model: {preset: dense-tiny}
  train:
    schedule: wsd
    cooldown: 0.2
    min_lr_ratio: 0.0
    batch_size: 4
    seq_len: 32
    lr: 3.0e-3
    warmup: 4
    log_every: 5
    eval_every: 5
    eval_batches: 1
    ckpt_every: 1000
    keep_checkpoints: 1
    knowledge_probe: false
"""
STEP = 4 * 32  # tokens per optimizer step


def write_sweep(tmp_path: Path, body: str, name: str = "br", out: str = "runs") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\noutput_dir: {tmp_path / out}\n" + BASE + textwrap.dedent(body))
    return path


def trunk_body(steps: int, branch_steps: list[int]) -> str:
    budgets = ", ".join(str(s * STEP) for s in branch_steps)
    return f"""
        parameters:
          train.tokens: {{value: {steps * STEP}}}
          train.branches: {{value: [{budgets}]}}
        """


def split(plan):
    trunks = [r for r in plan.runs if not r.branch_of]
    branches = [r for r in plan.runs if r.branch_of]
    return trunks, branches


def evals(rd: RunDir) -> dict[int, float]:
    return {m["step"]: m["val_loss"] for m in rd.metrics() if m.get("kind") == "eval"}


def trains(rd: RunDir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in rd.metrics() if m.get("kind") == "train"}


# ---- planning (no training) ----------------------------------------------------------------------------------------


def test_plan_derives_one_run_per_budget_with_the_trunks_schedule(tmp_path):
    plan = plan_sweep(write_sweep(tmp_path, trunk_body(40, [20, 30])))
    (trunk,), branches = split(plan)
    assert [r.run_id for r in plan.runs] == [trunk.run_id] + [b.run_id for b in branches]
    assert [b.steps for b in branches] == [20, 30] and [b.tokens for b in branches] == [20 * STEP, 30 * STEP]
    assert [b.branch_step for b in branches] == [16, 24]  # where each one's own 20% cooldown starts
    assert all(b.branch_of == trunk.run_id and b.config["train"]["branch_of"] == trunk.run_id for b in branches)
    assert all(run_id(b.config) == b.run_id for b in branches)
    # The branch's LR is the trunk's up to its branch step (warmup, then the constant peak), then its own cooldown.
    t = TrainConfig.model_validate(trunk.config["train"])
    for b in branches:
        tb = TrainConfig.model_validate(b.config["train"])
        assert [lr_at(s, tb) for s in range(b.branch_step)] == [lr_at(s, t) for s in range(b.branch_step)]
        assert lr_at(b.branch_step, tb) < lr_at(b.branch_step, t) == t.lr
        assert lr_at(b.steps - 1, tb) == 0.0
    # Costs: a branch trains only its cooldown; the plan says what independent runs would cost.
    assert branches[0].trained_flops == pytest.approx(branches[0].flops * 4 / 20)
    totals = plan.totals()
    assert totals["branches"] == 2 and totals["trunks"] == 1
    assert totals["independent_flops"] == pytest.approx(trunk.flops + branches[0].flops + branches[1].flops)
    assert totals["saved_flops"] == pytest.approx((16 + 24) * STEP * trunk.flops_per_token)


def test_branch_ids_are_a_function_of_trunk_and_budget_and_the_trunk_keeps_its_id(tmp_path):
    plan = plan_sweep(write_sweep(tmp_path, trunk_body(40, [20, 30])))
    (trunk,), (b20, b30) = split(plan)
    alone = plan_sweep(write_sweep(tmp_path, trunk_body(40, []), name="alone"))
    assert alone.runs[0].run_id == trunk.run_id  # the branch list is not part of what the trunk computes
    moved = plan_sweep(write_sweep(tmp_path, trunk_body(40, [20, 25]), name="moved"))
    assert [r.run_id for r in moved.runs][:2] == [trunk.run_id, b20.run_id] and moved.runs[2].run_id != b30.run_id
    other = plan_sweep(write_sweep(tmp_path, trunk_body(40, [20]) + "seeds: [1]\n", name="seed1"))
    assert other.runs[1].run_id != b20.run_id  # another trunk (seed): another branch
    # The trunk keeps (steps, branch step) for each budget, ascending whatever the order written.
    pts = branch_points(plan_sweep(write_sweep(tmp_path, trunk_body(40, [30, 20]), name="order")).runs[0]
                        .config["train"])
    assert pts == [(20 * STEP, 20, 16), (30 * STEP, 30, 24)]
    assert wsd_cooldown_start(40, 4, 0.2) == 32


def _value_lr(config: dict, steps: range) -> list[float]:
    """The value tables' LR at each step, through the trainer's own optimizer and set_lr, for a resolved config."""
    from experiments.config import RunConfig
    from experiments.resolve import model_config
    from experiments.trainer import build_optimizer, set_lr
    from ultramem.model import build_model

    cfg = RunConfig.model_validate(config)
    opt, fns = build_optimizer(build_model(model_config(cfg)), cfg.train)
    (values,) = [i for i, g in enumerate(opt.param_groups) if g.get("name") == "values"]
    out = []
    for s in steps:
        set_lr(opt, fns, s, cfg.train)
        out.append(opt.param_groups[values]["lr"])
    return out


def test_branch_clock_own_gives_a_branch_the_value_lr_of_a_stand_alone_run(tmp_path):
    """UltraMem's value LR (4x -> 1x over the run): with `branch_clock: own` a branch's cooldown has the value LR of
    a stand-alone WSD run of its budget (the reference: that run's plain config), with `trunk` the trunk's clock
    (the reference: the closed form 1 + 3 (1 - step / trunk steps)); the trunk's id is the same under both."""
    def body(steps: int, branches: list[int], clock: str) -> str:
        return trunk_body(steps, branches).replace("parameters:", "parameters:\n          model.preset: {value: "
                                                   f"ultramem-tiny}}\n          train.branch_clock: {{value: {clock}}}")

    (trunk_t,), (br_t,) = split(plan_sweep(write_sweep(tmp_path, body(40, [20], "trunk"), name="ct")))
    (trunk_o,), (br_o,) = split(plan_sweep(write_sweep(tmp_path, body(40, [20], "own"), name="co")))
    assert trunk_t.run_id == trunk_o.run_id and br_t.run_id != br_o.run_id
    alone = plan_sweep(write_sweep(tmp_path, body(20, [], "trunk"), name="alone")).runs[0]
    cooldown = range(br_o.branch_step, br_o.steps)
    assert _value_lr(br_o.config, cooldown) == pytest.approx(_value_lr(alone.config, cooldown), rel=1e-12)
    tb = TrainConfig.model_validate(br_t.config["train"])
    expect = [lr_at(s, tb) * (1 + 3 * (1 - s / 40)) for s in cooldown]
    assert _value_lr(br_t.config, cooldown) == pytest.approx(expect, rel=1e-12)
    assert _value_lr(br_o.config, cooldown)[0] < _value_lr(br_t.config, cooldown)[0]  # 4x at 16/20 = 1.6 vs 2.8


@pytest.mark.parametrize("body, message", [
    (trunk_body(40, [40]), "not below the trunk's own budget"),
    (trunk_body(40, [20, 20]), "round to the same"),
    (trunk_body(40, [20]).replace("parameters:", "parameters:\n          train.schedule: {value: cosine}"),
     "need train.schedule: wsd"),
])
def test_bad_branch_budgets_fail_at_plan_time(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(write_sweep(tmp_path, body))


def test_sweep_plan_cli_shows_trunks_branches_and_the_saving(tmp_path):
    path = write_sweep(tmp_path, trunk_body(40, [20, 30]))
    out = subprocess.run([sys.executable, "-m", "cli", "sweep", "plan", str(path)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    plan = plan_sweep(path)
    (trunk,), branches = split(plan)
    lines = out.stdout.splitlines()
    assert "branch of" in lines[1] and "D/N" in lines[1] and "from step" in lines[1]
    rows = {line.split()[0]: line for line in lines[3:] if line.strip()}
    assert rows[trunk.run_id].startswith(trunk.run_id)
    for b in branches:
        (row,) = [line for line in lines if line.startswith("  " + b.run_id)]
        assert trunk.run_id in row and f"{b.branch_step}/{b.steps}" in row and f"{b.tokens_per_param:.3g}" in row
    assert "2 branch(es) of 1 trunk(s)" in out.stdout and "saved" in out.stdout
    js = json.loads(subprocess.run([sys.executable, "-m", "cli", "sweep", "plan", str(path), "--format", "json"],
                                   capture_output=True, text=True, timeout=120, cwd=REPO).stdout)
    assert [r["branch_of"] for r in js["runs"]] == [None, trunk.run_id, trunk.run_id]
    assert js["totals"]["saved_flops"] > 0


def test_the_shipped_example_plans():
    plan = plan_sweep(REPO / "sweeps" / "wsd_branches_tiny.yaml")
    trunks, branches = split(plan)
    assert len(trunks) == 4 and len(branches) == 12 and plan.totals()["saved_flops"] > 0


# ---- training: local backend -------------------------------------------------------------------------------------


def test_branches_equal_direct_wsd_runs_and_reruns_skip(tmp_path):
    # 300 steps (~20 s on 2 busy cores): at 60 steps the loss is still on its early plateau (~3.1) and a branch
    # ended at step 45 is no better than the trunk there (val 3.1143 vs 3.1118); from ~150 steps on it is.
    trunk_steps, branch_steps = 300, [150, 225]
    plan = plan_sweep(write_sweep(tmp_path, trunk_body(trunk_steps, branch_steps)))
    lines: list[str] = []
    report = run_sweep(plan, backend="local", retries=0, log=lines.append)
    assert report.ok and sorted(o.state for o in report.outcomes) == ["done"] * 3, lines
    (trunk,), branches = split(plan)
    trd = RunDir(plan.runs_dir / trunk.run_id)
    assert sorted(p.name for p in trd.branch_dir.glob("step_*.pt")) == ["step_00000120.pt", "step_00000180.pt"]

    # The same budgets trained directly (from step 0, no trunk): bitwise the branches' results.
    direct = plan_sweep(write_sweep(tmp_path, f"""
        parameters:
          train.tokens: {{values: [{branch_steps[0] * STEP}, {branch_steps[1] * STEP}]}}
        """, name="direct", out="direct"))
    again = run_sweep(direct, backend="local", retries=0, log=lines.append)
    assert again.ok, lines
    measured = {}
    for b, d in zip(branches, direct.runs, strict=True):
        brd, drd = RunDir(plan.runs_dir / b.run_id), RunDir(direct.runs_dir / d.run_id)
        bf, df = brd.final(), drd.final()
        assert brd.status()["resumed_from"] == b.branch_step  # started from the trunk's checkpoint
        assert drd.status()["resumed_from"] == 0
        assert (bf["val_loss"], bf["train_loss"]) == (df["val_loss"], df["train_loss"])
        assert trains(brd) == trains(drd) and evals(brd) == evals(drd)  # the whole curve, trunk prefix included
        trunk_val = evals(trd)[b.steps]
        measured[b.steps] = (bf["val_loss"], trunk_val, bf["train_loss"], trains(trd)[b.steps])
    print("branch end vs trunk at that step (val branch, val trunk, train branch, train trunk):", measured)
    # Cooled down beats the constant-LR trunk at the same step on the training loss (the mean of the last 5 steps:
    # measured 2.698 vs 2.741 at step 150 and 2.638 vs 2.682 at 225 on one machine, 2.719 vs 2.761 and 2.668 vs
    # 2.681 on another) and, by 225 steps, on the validation loss (2.519 vs 2.550; 2.528 vs 2.563). At step 150 the
    # validation gap is within what the machine's floating-point order moves it (2.683 vs 2.689 on one machine,
    # 2.6815 vs 2.6811 on another), so it is not asserted.
    for _, _, train_b, train_t in measured.values():
        assert train_b < train_t
    val_b, val_t, _, _ = measured[branch_steps[-1]]
    assert val_b < val_t

    # A re-run trains nothing.
    rerun = run_sweep(plan_sweep(plan.path), backend="local", log=lines.append)
    assert rerun.outcomes == [] and sorted(rerun.skipped) == sorted(r.run_id for r in plan.runs)


def _trainer_pids(run_dir: Path) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z" and b"experiments.run_one" in cmd and str(run_dir).encode() in cmd:
                out.append(int(entry.name))
    return out


def test_killed_trunk_fails_only_its_pending_branches_and_a_rerun_runs_them(tmp_path):
    # Branch points at steps 40 and 300 of a 400-step trunk: the trunk is SIGKILLed between the two.
    plan = plan_sweep(write_sweep(tmp_path, trunk_body(400, [50, 375]).replace(
        "ckpt_every: 1000", "ckpt_every: 100")))
    (trunk,), (early, late) = split(plan)
    assert (early.branch_step, late.branch_step) == (40, 300)
    trd = RunDir(plan.runs_dir / trunk.run_id)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(
        r=run_sweep(plan, backend="local", retries=0, log=lambda s: None)))
    worker.start()
    try:
        end = time.time() + 300
        while not (trd.branch_point(40) and _trainer_pids(trd.path)) and time.time() < end:
            time.sleep(0.02)
        assert trd.branch_point(300) is None, "the trunk passed both branch points before it could be killed"
        for pid in _trainer_pids(trd.path):
            os.kill(pid, signal.SIGKILL)
    finally:
        worker.join(timeout=300)
    report = result["r"]
    states = {o.run_id: o for o in report.outcomes}
    assert states[trunk.run_id].state == "failed" and states[early.run_id].state == "done"
    assert states[late.run_id].state == "failed" and states[late.run_id].attempts == 0
    assert trunk.run_id in states[late.run_id].error and "step 300" in states[late.run_id].error
    assert RunDir(plan.runs_dir / late.run_id).status()["state"] == "failed"

    rerun = run_sweep(plan_sweep(plan.path), backend="local", retries=0, log=lambda s: None)
    assert rerun.ok and rerun.skipped == [early.run_id]
    assert sorted(o.run_id for o in rerun.outcomes) == sorted([trunk.run_id, late.run_id])
    assert trd.status()["resumed_from"] >= 40  # the trunk resumed, not restarted
    assert RunDir(plan.runs_dir / late.run_id).status()["resumed_from"] == 300


# ---- training: Ray -------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_branches_on_ray_start_from_the_trunk_with_one_slot(ray_local, tmp_path):
    """One slot (max_concurrent 1): a branch never holds a slot while it waits, so the trunk is never starved."""
    plan = plan_sweep(write_sweep(tmp_path, trunk_body(40, [20, 30])))
    lines: list[str] = []
    report = run_sweep(plan, backend="ray", max_concurrent=1, retries=0, log=lines.append)
    assert report.ok and len(report.outcomes) == 3, lines
    (trunk,), branches = split(plan)
    assert report.outcomes[0].run_id == trunk.run_id
    for b in branches:
        rd = RunDir(plan.runs_dir / b.run_id)
        assert rd.status()["state"] == "done" and rd.status()["resumed_from"] == b.branch_step
        assert rd.final()["steps"] == b.steps and rd.final()["tokens"] == b.tokens
