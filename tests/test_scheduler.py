"""The sweep scheduler with real Ray and the real trainer on tiny presets: every run ends done, re-runs skip
finished runs, a SIGKILLed training process resumes from its checkpoint, a killed driver leaves only the remainder,
two concurrent schedulers never train a run twice, and unsatisfiable resources fail fast with a clear error."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cli.sweep import status_rows
from experiments.scheduler import ResourceError, run_sweep
from experiments.sweep import plan_sweep
from runfolder import RunDir, is_claimed

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


TINY_BASE = """
base:
  data: {source: embedded}
  train: {log_every: 5, eval_every: 1000, eval_batches: 1, knowledge_probe: false, batch_size: 4}
"""


def write_sweep(tmp_path: Path, body: str, name: str = "sched") -> Path:
    """A sweep of tiny runs on the embedded corpus, with its run folders under tmp_path."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\noutput_dir: {tmp_path / 'runs'}\n" + TINY_BASE + textwrap.dedent(body))
    return path


def processes_mentioning(*words: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains every one of `words`, found in /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if state != "Z" and all(w.encode() in cmd for w in words):
            pids.append(int(entry.name))
    return pids


def processes_of_driver(pid: int) -> list[int]:
    """Processes started by the private Ray of the sweep driver `pid` (tagged in their environment)."""
    needle = f"ULTRAMEM_RAY_OWNER={pid}-".encode()
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if any(var.startswith(needle) for var in f.read().split(b"\0")):
                    out.append(int(entry))
        except (OSError, ValueError):
            continue
    return out


def trainer_pids(run_dir: Path) -> list[int]:
    return processes_mentioning("experiments.run_one", str(run_dir))


def wait_for(cond, timeout: float, what: str, poll: float = 0.05):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def train_steps(rd: RunDir) -> list[tuple[int, float]]:
    return [(m["step"], m["time"]) for m in rd.metrics() if m.get("kind") == "train"]


def attempt_headers(rd: RunDir) -> int:
    return sum(line.startswith("=== attempt") for line in (rd.path / "train.log").read_text().splitlines())


# ---- a small sweep on the session's local Ray --------------------------------------------------------------------


@pytest.mark.slow
def test_small_sweep_on_local_ray_ends_done_and_reruns_only_new_points(ray_local, tmp_path):
    body = """
        parameters:
          model.preset: {values: [dense-tiny, moe-tiny, ultramem-tiny]}
          train.steps: {value: 10}
        seeds: [0]
        """
    path = write_sweep(tmp_path, body)
    lines: list[str] = []
    report = run_sweep(plan_sweep(path), backend="ray", log=lines.append)
    assert report.ok, lines
    assert sorted(o.state for o in report.outcomes) == ["done"] * 3
    for run in report.plan.runs:
        rd = RunDir(report.plan.runs_dir / run.run_id)
        status, final = rd.status(), rd.final()
        assert status["state"] == "done" and status["attempts"] == 1 and status["node"] == "127.0.0.1"
        assert final["run_id"] == run.run_id and final["steps"] == 10
        assert final["total_params"] == run.total_params

    # Ray is not needed to read progress: the status table comes from the run folders alone.
    out = subprocess.run([sys.executable, "-m", "cli", "sweep", "status", str(path), "--format", "json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["runs"]
    assert [r["state"] for r in rows] == ["done"] * 3 and all(r["step"] == 10 for r in rows)

    # Re-running skips every finished run; a new seed adds exactly the three new points.
    again = run_sweep(plan_sweep(path), backend="ray", log=lambda s: None)
    assert again.outcomes == [] and sorted(again.skipped) == sorted(r.run_id for r in report.plan.runs)
    path.write_text(path.read_text().replace("seeds: [0]", "seeds: [0, 1]"))
    grown = run_sweep(plan_sweep(path), backend="ray", log=lambda s: None)
    assert len(grown.plan.runs) == 6 and sorted(grown.skipped) == sorted(again.skipped)
    assert len(grown.outcomes) == 3 and all(o.state == "done" for o in grown.outcomes)
    assert {o.run_id for o in grown.outcomes}.isdisjoint(again.skipped)


def test_unsatisfiable_resources_fail_fast_with_a_clear_error(ray_local, tmp_path):
    body = """
        parameters: {model.preset: {values: [dense-tiny, moe-tiny]}, train.steps: {value: 5}}
        resources:
          default: {cpus: 1}
          rules: [{when: {model.family: moe}, gpus: 1}]
        """
    path = write_sweep(tmp_path, body)
    plan = plan_sweep(path)
    moe = next(r for r in plan.runs if r.family == "moe")
    with pytest.raises(ResourceError) as err:
        run_sweep(plan, backend="ray", log=lambda s: None)
    msg = str(err.value)
    assert str(path) in msg and moe.run_id in msg and "gpus=1" in msg and "nothing was launched" in msg
    assert "127.0.0.1: cpus=2, gpus=0" in msg  # the session's node, as Ray reports it
    assert not any((plan.runs_dir / r.run_id / "train.log").exists() for r in plan.runs)

    path.write_text(path.read_text().replace("gpus: 1", "memory_gb: 100000"))
    with pytest.raises(ResourceError, match="memory_gb=100000"):
        run_sweep(plan_sweep(path), backend="ray", log=lambda s: None)


def test_unsatisfiable_resources_cli_exit_code(tmp_path):
    path = write_sweep(tmp_path, """
        parameters: {model.preset: {value: dense-tiny}, train.steps: {value: 5}}
        resources: {default: {cpus: 4096}}
        """)
    out = subprocess.run([sys.executable, "-m", "cli", "sweep", "run", str(path), "--backend", "local"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "need more than any node of the local cluster" in out.stderr and "cpus=4096" in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_with_no_ray_fails_fast_with_exit_2(tmp_path):
    """Ray itself retries a dead address for minutes and ignores Ctrl-C meanwhile (issue 15)."""
    path = write_sweep(tmp_path, "parameters: {model.preset: {value: dense-tiny}, train.steps: {value: 5}}\n")
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "cli", "sweep", "run", str(path), "--address", address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and time.monotonic() - t0 < 30
    assert f"Ray at {address}: cannot connect" in out.stderr and "Traceback" not in out.stderr


def test_an_open_port_that_is_not_ray_gives_up_after_the_connect_timeout(tmp_path):
    path = write_sweep(tmp_path, "parameters: {model.preset: {value: dense-tiny}, train.steps: {value: 5}}\n")
    with socket.socket() as server:  # accepts TCP connections, never answers Ray's handshake
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "cli", "sweep", "run", str(path), "--address", address,
                              "--connect-timeout", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and time.monotonic() - t0 < 25
    assert f"Ray at {address}: no answer from a Ray head within 3 s" in out.stderr


@pytest.mark.slow
def test_multi_process_run_launches_torchrun_inside_its_allocation(ray_local, tmp_path):
    """nproc 2 on CPU: torchrun --standalone with 2 gloo processes in one 2-CPU Ray task (the GPU path's launch)."""
    path = write_sweep(tmp_path, """
        parameters: {model.preset: {value: dense-tiny}, train.steps: {value: 6}}
        resources: {default: {cpus: 2, nproc: 2}}
        """)
    plan = plan_sweep(path)
    report = run_sweep(plan, backend="ray", log=lambda s: None)
    rd = RunDir(plan.runs_dir / plan.runs[0].run_id)
    assert report.ok, (rd.path / "train.log").read_text()
    header = (rd.path / "train.log").read_text().splitlines()[0]
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m experiments.run_one" in header
    assert rd.read_config()["parallel"]["nproc"] == 2 and rd.final()["steps"] == 6


# ---- failures: a killed training process, a killed driver, two schedulers -------------------------------------


@pytest.mark.slow
def test_sigkilled_training_process_is_retried_and_resumes_from_its_checkpoint(ray_local, tmp_path):
    path = write_sweep(tmp_path, """
        parameters: {model.preset: {value: dense-tiny}, train.steps: {value: 120}, train.ckpt_every: {value: 20}}
        """)
    plan = plan_sweep(path)
    rd = RunDir(plan.runs_dir / plan.runs[0].run_id)
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=run_sweep(plan, backend="ray", log=lambda s: None)))
    worker.start()
    try:
        wait_for(lambda: rd.checkpoints() and trainer_pids(rd.path), 180, "a first checkpoint")
        (pid,) = trainer_pids(rd.path)
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
    finally:
        worker.join(timeout=300)
    report = result["r"]
    assert report.ok and report.outcomes[0].attempts == 2
    status = rd.status()
    assert status["state"] == "done" and status["attempts"] == 2 and attempt_headers(rd) == 2

    # The retry resumed from a checkpoint written before the kill: the steps up to it were logged by the first
    # process (before the kill) and are not redone; every later step is logged once, by the second process.
    steps = train_steps(rd)
    assert [s for s, _ in steps] == list(range(5, 121, 5))
    resumed_from = max(s for s, t in steps if t < killed_at)
    assert resumed_from >= 20 and resumed_from % 20 == 0 and status["resumed_from"] == resumed_from
    assert all(t > killed_at for s, t in steps if s > resumed_from)
    assert rd.final()["steps"] == 120 and rd.final()["tokens"] == plan.runs[0].tokens


@pytest.mark.slow
def test_killed_driver_then_rerun_finishes_only_the_remainder(ray_local, tmp_path):
    # A short and a long run side by side: the driver is killed once the short one is done and the long one is
    # past a checkpoint.
    path = write_sweep(tmp_path, """
        method: list
        parameters: {model.preset: {value: dense-tiny}, train.steps: {values: [20, 160]}}
        conditional: [{when: {train.steps: 160}, parameters: {train.ckpt_every: {value: 20}}}]
        """)
    plan = plan_sweep(path)
    short, long = (RunDir(plan.runs_dir / r.run_id) for r in sorted(plan.runs, key=lambda r: r.tokens))
    ray_tmp = Path("/tmp") / f"umdrv-{os.getpid()}"
    driver = subprocess.Popen([sys.executable, "-m", "cli", "sweep", "run", str(path)],
                              env={**os.environ, "ULTRAMEM_RAY_TMP": str(ray_tmp)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def short_done_long_halfway():
            assert driver.poll() is None, driver.stderr.read().decode()
            return short.status().get("state") == "done" and long.checkpoints()
        wait_for(short_done_long_halfway, 400, "the short run done and the long one past a checkpoint", poll=0.1)
    finally:
        driver.kill()
        driver.wait()
        # Ray should take its session down with the driver. Its processes notice the driver's death by polling
        # (not at once), so they get a grace period; what must not happen is that they outlive it for good.
        deadline = time.time() + 60
        while (leftover := processes_mentioning(str(ray_tmp))) and time.time() < deadline:
            time.sleep(0.5)
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leftover, "processes of the killed driver's Ray outlived it"
    # The private Ray dies with its driver, and the training process with its Ray worker, releasing the claim.
    wait_for(lambda: not trainer_pids(long.path) and not is_claimed(long), 60, "the training process to exit")
    # ... and so do the agents, which change their command line (ray::DashboardAgent, ray::RuntimeEnvAgent) and
    # on their own outlive the driver by more than a minute: experiments/ray_reaper.py ends them.
    wait_for(lambda: not processes_of_driver(driver.pid), 20, "the killed driver's Ray agents to exit")
    assert long.status()["state"] == "running" and long.final() is None
    assert {r["run_id"]: r["state"] for r in status_rows(plan)} == {short.run_id: "done", long.run_id: "interrupted"}
    short_final = short.final_path.stat().st_mtime
    # The orphaned trainer may log and checkpoint a little after the driver's death before it exits, so the resume
    # point is the newest checkpoint it left, read once it is gone.
    newest_ckpt = max(int(p.stem.removeprefix("step_")) for p in long.checkpoints())
    rerun_at = time.time()

    report = run_sweep(plan_sweep(path), backend="ray", log=lambda s: None)
    assert report.ok and report.skipped == [short.run_id]
    assert [o.run_id for o in report.outcomes] == [long.run_id]
    assert short.final_path.stat().st_mtime == short_final and short.status()["attempts"] == 1
    steps = train_steps(long)
    assert [s for s, _ in steps] == list(range(5, 161, 5)) and long.status()["state"] == "done"
    assert newest_ckpt >= 20 and newest_ckpt % 20 == 0 and newest_ckpt < 160
    assert long.status()["resumed_from"] == newest_ckpt
    # Steps up to that checkpoint come from the first attempt and are not redone; every later one is the rerun's.
    assert all(t < rerun_at for s, t in steps if s <= newest_ckpt)
    assert all(t > rerun_at for s, t in steps if s > newest_ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ray", "local"])
def test_ctrl_c_stops_a_sweep_promptly_and_keeps_its_checkpoints(tmp_path, backend):
    path = write_sweep(tmp_path, """
        parameters: {model.preset: {value: dense-tiny}, train.steps: {value: 100000}, train.ckpt_every: {value: 10}}
        """)
    rd = RunDir(plan_sweep(path).runs_dir / plan_sweep(path).runs[0].run_id)
    ray_tmp = Path("/tmp") / f"umint-{os.getpid()}"
    driver = subprocess.Popen([sys.executable, "-m", "cli", "sweep", "run", str(path), "--backend", backend],
                              env={**os.environ, "ULTRAMEM_RAY_TMP": str(ray_tmp)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        wait_for(lambda: rd.checkpoints(), 300, "a first checkpoint", poll=0.1)
        t0 = time.monotonic()
        driver.send_signal(signal.SIGINT)
        rc = driver.wait(timeout=60)
        stopped_after = time.monotonic() - t0
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rc == 130 and stopped_after < 30, (rc, stopped_after, driver.stderr.read().decode()[-2000:])
    wait_for(lambda: not trainer_pids(rd.path), 30, "the training process to exit")
    assert rd.checkpoints() and rd.final() is None  # what it trained is kept for the next `sweep run`


@pytest.mark.slow
def test_attempts_are_numbered_across_sweep_runs_and_a_refused_train_is_not_one(tmp_path):
    path = write_sweep(tmp_path, """
        parameters: {model.preset: {value: dense-tiny}, train.steps: {value: 400}, train.ckpt_every: {value: 10}}
        """)
    rd = RunDir(plan_sweep(path).runs_dir / plan_sweep(path).runs[0].run_id)
    cmd = [sys.executable, "-m", "cli", "sweep", "run", str(path), "--backend", "local"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: rd.checkpoints(), 300, "a first checkpoint", poll=0.1)
        # a second `ultramem train` of the same run while it trains: refused (exit 4), and not an attempt
        busy = subprocess.run([sys.executable, "-m", "cli", "train", str(rd.config_path), "--out", str(rd.path)],
                              capture_output=True, text=True, timeout=300)
        assert busy.returncode == 4 and "another process is training this run" in busy.stderr
        assert rd.status()["attempts"] == 1
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    headers = [line.split(" on ")[0] for line in rd.log_path.read_text().splitlines() if line.startswith("=== ")]
    assert headers == ["=== attempt 1", "=== attempt 2"] and rd.status()["attempts"] == 2


@pytest.mark.slow
def test_two_concurrent_sweep_runs_never_train_a_run_twice(tmp_path):
    path = write_sweep(tmp_path, """
        parameters: {model.preset: {values: [dense-tiny, moe-tiny, ultramem-tiny]}, train.steps: {value: 30}}
        """)
    cmd = [sys.executable, "-m", "cli", "sweep", "run", str(path), "--backend", "local"]
    drivers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [d.communicate(timeout=600) for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], outs
    plan = plan_sweep(path)
    for run in plan.runs:
        rd = RunDir(plan.runs_dir / run.run_id)
        assert rd.status()["state"] == "done"
        assert rd.status()["attempts"] == 1 and attempt_headers(rd) == 1  # one training process per run, ever
    launched = [sum(" attempt(s)" in line and "0 attempt(s)" not in line for line in out.splitlines())
                for out, _ in outs]
    assert sum(launched) == 3, outs
