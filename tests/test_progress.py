"""Live sweep progress (experiments/progress.py): the plain line's format, the ETA on synthetic run folders at known
rates (closed form), the watch loop's end, and a real `ultramem sweep run` without a terminal."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from experiments import progress
from experiments.progress import ProgressView, RunSpec, Tracker, eta, throughput, watch
from runfolder import Final, RunDir

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0  # a fixed epoch second for synthetic metrics


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def running(runs: Path, spec: RunSpec, steps_at: dict[int, float], loss: float = 2.5) -> None:
    """A run in training: status running written by this (live) process, train lines at {step: time}."""
    rd = RunDir(runs / spec.run_id)
    rd.update_status(state="running", step=max(steps_at), total_steps=spec.steps)
    for step, t in steps_at.items():
        rd.append_metrics({"kind": "train", "step": step, "time": t, "loss": loss, "tokens": step, "flops": 0.0})


def finished(runs: Path, spec: RunSpec) -> None:
    rd = RunDir(runs / spec.run_id)
    rd.update_status(state="done", step=spec.steps, total_steps=spec.steps)
    rd.write_final(Final(run_id=spec.run_id, name=spec.name, sweep="syn", family="dense", preset=None, seed=0,
                         train_loss=2.0, val_loss=2.1, params={"total": 1}, total_params=1, active_params=1,
                         non_embedding_params=1, flops_per_token=1.0, tokens=1, flops=spec.flops,
                         steps=spec.steps, batch_size=1, seq_len=1, lr=1e-3))


def failed(runs: Path, spec: RunSpec) -> None:
    RunDir(runs / spec.run_id).update_status(state="failed", error="attempt 1: exit code 1")


SPECS = [RunSpec("dense-aaaaaaaaaa", "a-done", 1e12, 100), RunSpec("dense-bbbbbbbbbb", "b-run", 1e12, 100),
         RunSpec("dense-cccccccccc", "c-pending", 1e12, 100), RunSpec("dense-dddddddddd", "d-failed", 1e12, 100)]


def test_the_plain_line_names_counts_flops_throughput_eta_and_running_runs(tmp_path):
    a, b, _, d = SPECS
    finished(tmp_path, a)
    # b: steps 20..60, 10 steps every 5 s -> 2 steps/s x 1e10 FLOPs/step = 2e10 FLOP/s; 60 of 100 steps done
    running(tmp_path, b, {s: T0 + s / 2 for s in range(10, 61, 10)}, loss=2.5)
    failed(tmp_path, d)
    out = io.StringIO()
    with ProgressView("syn", Tracker(SPECS, tmp_path, Clock()), every=3600, out=out):
        pass
    lines = out.getvalue().splitlines()
    # done 1e12 + 0.6e12 of 4e12 (40%); left: c 1e12 + b 0.4e12 = 1.4e12 at 2e10 FLOP/s = 70 s
    assert lines[0] == ("[0m00s] sweep syn: 1 done, 1 running, 1 pending, 1 failed | FLOPs 1.6T/4T (40%), "
                        "20G FLOP/s, ETA 1m10s | running: b-run 60/100 loss 2.500")
    assert lines[-1].startswith("sweep syn: 1 done, 1 running, 1 pending, 1 failed; FLOPs 1.6T/4T")
    assert "\x1b" not in out.getvalue()  # never an escape sequence without a terminal


def test_eta_from_the_running_runs_rates_is_closed_form(tmp_path):
    specs = [RunSpec("moe-1111111111", "fast", 3e12, 300), RunSpec("ultramem-2222222222", "slow", 1e12, 200),
             RunSpec("dense-3333333333", "queued", 5e11, 50),
             # a cooldown branch: steps 150..200 are its own, 2e11 FLOPs (4e9 per step)
             RunSpec("dense-4444444444", "branch", 2e11, 200, start_step=150)]
    running(tmp_path, specs[0], {s: T0 + s / 4 for s in range(0, 121, 20)})  # 4 steps/s x 1e10 = 4e10 FLOP/s
    running(tmp_path, specs[1], {s: T0 + s for s in range(10, 51, 10)})  # 1 step/s x 5e9 = 5e9 FLOP/s
    running(tmp_path, specs[3], {s: T0 + (s - 150) / 5 for s in range(160, 181, 10)})  # 5 steps/s x 4e9 = 2e10
    snap = Tracker(specs, tmp_path, Clock(T0 + 30)).snapshot()
    assert [r.flops_done for r in snap.runs] == pytest.approx([1.2e12, 2.5e11, 0.0, 1.2e11])
    rate = 4e10 + 5e9 + 2e10
    left = (3e12 - 1.2e12) + (1e12 - 2.5e11) + 5e11 + (2e11 - 1.2e11)
    assert throughput(snap, snap) == pytest.approx(rate)
    assert eta(snap, snap) == pytest.approx(left / rate)


def test_eta_from_the_observed_throughput_once_the_window_is_long_enough(tmp_path):
    a, b, c, _ = SPECS
    clock = Clock()
    tracker = Tracker(SPECS[:3], tmp_path, clock)
    running(tmp_path, a, {0: T0, 10: T0 + 1})  # 10 steps/s: its own rate would say 1e11 FLOP/s
    first = tracker.snapshot()
    clock.t = T0 + progress.WINDOW_S / 2
    running(tmp_path, b, {0: T0, 10: T0 + 1})
    assert throughput(tracker.first, tracker.snapshot()) == pytest.approx(2e11)  # too early: the runs' own rates
    clock.t = T0 + 100
    finished(tmp_path, a)  # a done (1e12), b at 50 steps (5e11): 1.5e12 - 1e11 done since the first snapshot
    running(tmp_path, b, {50: T0 + 99})
    now = tracker.snapshot()
    observed = (1.5e12 - 1e11) / 100
    assert throughput(first, now) == pytest.approx(observed)
    assert eta(first, now) == pytest.approx((5e11 + 1e12) / observed)  # b's rest and c


def test_watch_returns_when_every_run_has_ended(tmp_path):
    a, b, _, _ = SPECS
    finished(tmp_path, a)
    running(tmp_path, b, {10: T0, 20: T0 + 5})
    sleeps = []

    def sleep(s: float) -> None:  # the sweep moves on while the watcher sleeps: b finishes at the third look
        sleeps.append(s)
        if len(sleeps) == 3:
            finished(tmp_path, b)

    out = io.StringIO()
    view = ProgressView("syn", Tracker(SPECS[:2], tmp_path), every=3600, out=out, background=False)
    with view:
        last = watch(view, sleep=sleep)
    assert len(sleeps) == 3 and last.ended and last.counts()["done"] == 2
    assert out.getvalue().splitlines()[-1].startswith("sweep syn: 2 done, 0 running, 0 pending, 0 failed")


def test_watch_returns_when_nothing_runs_or_is_queued_for_a_while(tmp_path):
    clock = Clock()
    finished(tmp_path, SPECS[0])  # the others pending: a sweep stopped midway (or run in parts)

    def sleep(s: float) -> None:
        clock.t += 1.0

    view = ProgressView("syn", Tracker(SPECS[:3], tmp_path, clock), every=5, out=io.StringIO(), background=False)
    with view:
        last = watch(view, idle_exit_s=10, sleep=sleep)
    assert not last.ended and not last.active
    assert last.time - T0 == pytest.approx(10.0)  # the first look that had seen nothing active for 10 s


def test_a_terminal_gets_a_view_redrawn_in_place(tmp_path):
    a, b, _, _ = SPECS
    finished(tmp_path, a)
    running(tmp_path, b, {10: T0, 20: T0 + 5}, loss=3.25)
    master, slave = pty.openpty()
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: _drain(master, chunks), daemon=True)
    reader.start()
    with open(slave, "w", closefd=True) as tty:
        view = ProgressView("syn", Tracker(SPECS[:2], tmp_path), out=tty, background=False)
        with view:
            assert view.tty
            view.draw()
            view.log("a message above the view")
    reader.join(timeout=30)
    text = b"".join(chunks).decode()
    assert "\x1b[1A" in text and "\x1b[2K" in text  # cursor up + erase line: the frame is redrawn, not appended
    assert "b-run" in text and "20/100" in text and "3.250" in text and "a message above the view" in text
    last = text.rstrip().splitlines()[-1].replace("\x1b[?25h", "")  # (the cursor shown again)
    assert last.startswith("sweep syn: 1 done, 1 running")  # the view ends with the summary


def _drain(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # the other side closed
            return
        if not data:
            return
        chunks.append(data)


SWEEP = """\
name: progress-test
base:
  data: {source: embedded}
  train: {tokens: 2.0e4, batch_size: 4, seq_len: 64, log_every: 10, eval_every: 1000, ckpt_every: 1000,
          knowledge_probe: false}
parameters:
  model.preset: {values: [dense-t1]}
wandb: {mode: disabled}
output_dir: runs
"""


def test_sweep_run_without_a_terminal_prints_progress_lines_from_the_start(tmp_path):
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    cmd = [sys.executable, "-m", "cli", "sweep", "run", str(tmp_path / "sweep.yaml"), "--backend", "local",
           "--progress-every", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "\x1b" not in proc.stdout
    # the first line is progress, before the scheduler has said anything
    assert lines[0] == ("[0m00s] sweep progress-test: 0 done, 0 running, 1 pending, 0 failed | FLOPs 0/"
                        + lines[0].split("FLOPs 0/")[1].split(" ")[0] + " (0%), - FLOP/s, ETA -")
    ticks = [line for line in lines if line.startswith("[") and "sweep progress-test:" in line]
    assert len(ticks) >= 2
    assert "[1/1] done" in proc.stdout
    assert lines[-1].startswith("sweep progress-test: 1 done, 0 running, 0 pending, 0 failed; FLOPs ")


def test_the_throughput_forgets_what_is_older_than_the_horizon(tmp_path):
    """A slow start (say Ray starting) stops weighing on the ETA once it is HORIZON_S in the past."""
    spec = RunSpec("dense-5555555555", "long", 1e13, 1000)
    clock = Clock()
    tracker = Tracker([spec], tmp_path, clock)
    tracker.snapshot()  # t = 0: nothing yet
    clock.t = T0 + progress.HORIZON_S / 2
    running(tmp_path, spec, {100: clock.t})
    middle = tracker.snapshot()  # 1e12 done after the slow start
    clock.t = T0 + progress.HORIZON_S + 60
    running(tmp_path, spec, {400: clock.t})
    now = tracker.snapshot()  # 4e12 done
    assert tracker.reference(now) is middle
    assert throughput(tracker.reference(now), now) == pytest.approx(3e12 / (progress.HORIZON_S / 2 + 60))
