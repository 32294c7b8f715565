"""Run the runs of a planned sweep: backends `ray` (default) and `local`, a pre-flight resource check, retries.

The sweep's state lives in its run folders, not in the scheduler: a run whose status is done/diverged is skipped,
any other run is (re)launched and the trainer resumes it from its newest checkpoint. So re-running a sweep after a
crash finishes only the remainder, and adding grid points runs only the new ones.

One run = one `train_run` call on some node. It takes the run's `claim` lock (waiting while another scheduler holds
it), then launches `python -m experiments.run_one RUN_DIR` (or `torchrun --standalone --nproc_per_node=K ...`) as a
subprocess, up to 1 + retries times. The scheduler never imports the trainer, so a SIGKILLed training process is an
ordinary failed attempt. The training process is tied to its launcher (PR_SET_PDEATHSIG): when a node's Ray worker
dies, its training process dies with it and releases the run for the retry on another node.

Cooldown branches (a WSD trunk's `train.branches`, docs/sweeps.md) depend on their trunk: a branch job is handed to
the backend only once the trunk has kept its checkpoint of the branch step (`branch_points/`), or once the trunk
has ended (done: the branch then trains from step 0, the same run at full cost; failed or diverged: the branch
fails, naming its trunk). A branch never waits inside a slot, so no number of slots can starve its trunk.

Backends implement `nodes()` (for the pre-flight check), `run(jobs, ...)` and `close()`:
  - ray: one plain `@ray.remote` task per run with the run's CPU/GPU/memory request; Ray's `max_retries` re-runs
    a task whose worker or node died (docs/sweeps.md explains why plain tasks rather than Tune);
  - local: threads on this machine, admitting runs while their CPUs/GPUs/memory fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from experiments.ray_reaper import OWNER_ENV
from experiments.run_one import EXIT_BUSY, EXIT_CONFIG, launch_command
from experiments.sweep import Plan, PlannedRun
from runfolder import TERMINAL, RunDir, is_claimed, run_state
from ultramem.config import ConfigError

BACKENDS = ("ray", "local")
WAIT_POLL_S = 0.5  # how often the driver wakes while runs are in flight (so that Ctrl-C is handled promptly)
CLAIM_POLL_S = 1.0  # how often a task waiting for another scheduler's claim looks again
LOG_TAIL_LINES = 20  # lines of train.log kept in status.json's `error` for a failed run


class ResourceError(ConfigError):
    """Runs ask for more than any node has: they would wait forever, so nothing is started."""


@dataclass
class Job:
    """What a backend runs: one run folder and the resources its training process needs on one node."""

    run_id: str
    run_dir: str  # absolute, on storage every node sees
    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float | None = None
    nproc: int = 1
    flops: float = 0.0  # planned training FLOPs: the cost used to start the longest runs first
    trunk_id: str | None = None  # a cooldown branch: its trunk's run id (a sibling folder) ...
    branch_step: int = 0  # ... and the trunk step it starts from

    @classmethod
    def from_planned(cls, run: PlannedRun, runs_dir: Path) -> Job:
        r = run.resources
        return cls(run.run_id, str((runs_dir / run.run_id).absolute()), r.cpus, r.gpus, r.memory_gb, r.nproc or 1,
                   run.trained_flops, run.branch_of, run.branch_step)

    @property
    def trunk_dir(self) -> Path | None:
        return None if self.trunk_id is None else Path(self.run_dir).parent / self.trunk_id

    def describe(self) -> str:
        mem = "" if self.memory_gb is None else f", memory_gb={self.memory_gb:g}"
        return f"cpus={self.cpus:g}, gpus={self.gpus:g}{mem}"


@dataclass
class Outcome:
    run_id: str
    state: str  # done | diverged | failed (after every attempt) | interrupted
    attempts: int  # training processes this call launched (0: someone else finished it meanwhile)
    node: str
    wall_s: float
    error: str | None = None


@dataclass
class Node:
    name: str
    cpus: float
    gpus: float
    memory_gb: float | None  # None: unknown, not checked

    def fits(self, job: Job) -> bool:
        mem_ok = job.memory_gb is None or self.memory_gb is None or job.memory_gb <= self.memory_gb + 1e-9
        return job.cpus <= self.cpus + 1e-9 and job.gpus <= self.gpus + 1e-9 and mem_ok

    def describe(self) -> str:
        mem = "" if self.memory_gb is None else f", memory_gb={self.memory_gb:.1f}"
        return f"{self.name}: cpus={self.cpus:g}, gpus={self.gpus:g}{mem}"


class Backend(Protocol):
    name: str

    def nodes(self) -> list[Node]: ...

    def run(self, jobs: list[Job], retries: int, max_concurrent: int | None,
            report: Callable[[Outcome], None]) -> list[Outcome]: ...

    def close(self) -> None: ...


# ---- cooldown branches: start a branch once its trunk checkpoint exists -------------------------------------------


class Dependencies:
    """Which jobs may start now: every job but a branch whose trunk has neither kept the branch's checkpoint nor
    ended. A backend asks `check` for each waiting job and tells `ended` each outcome."""

    def __init__(self, jobs: list[Job]):
        self.ours = {j.run_id for j in jobs}
        self.outcomes: dict[str, Outcome] = {}

    def ended(self, outcome: Outcome) -> None:
        self.outcomes[outcome.run_id] = outcome

    def check(self, job: Job) -> str | None:
        """'run', 'wait', or why the branch cannot run (its trunk failed or diverged before the branch step)."""
        if job.trunk_id is None or RunDir(job.trunk_dir).branch_point(job.branch_step) is not None:
            return "run"
        trunk = job.trunk_id
        if trunk in self.outcomes:
            state, error = self.outcomes[trunk].state, self.outcomes[trunk].error
        elif trunk in self.ours:
            return "wait"  # queued or training in this sweep run
        else:  # finished before this sweep run, or trained by someone else
            now = run_state(RunDir(job.trunk_dir))
            if now.state in ("running", "claimed"):
                return "wait"
            state, error = now.state, now.status.error if now.status else None
        if state == "done":  # finished without keeping that checkpoint (say the budget was added later): from step 0
            return "run"
        first = f": {error.splitlines()[0]}" if error else ""
        return (f"its trunk {trunk} ended {state} before keeping its checkpoint of step {job.branch_step}{first}; "
                f"see {job.trunk_dir}/status.json and run the sweep again")

    def fail(self, job: Job, why: str, node: str) -> Outcome:
        rd = RunDir(job.run_dir)
        with rd.claim() as free:
            if free and rd.read_status().state not in TERMINAL:
                rd.update_status(state="failed", error=f"cooldown branch not started: {why}")
        return Outcome(job.run_id, "failed", 0, node, 0.0, f"cooldown branch not started: {why}")


# ---- one run: claim, launch, retry -------------------------------------------------------------------------------


def train_run(job: Job, retries: int, node: str | None = None, env: dict[str, str] | None = None) -> Outcome:
    """Train one run to a terminal state with up to `retries` relaunches; runs on the node that got the job."""
    node = node or _node_name()
    rd = RunDir(job.run_dir)
    t0 = time.time()
    while True:
        with rd.claim() as ours:
            if ours:
                return _attempts(job, rd, retries, node, env or {}, t0)
        time.sleep(CLAIM_POLL_S)


def _attempts(job: Job, rd: RunDir, retries: int, node: str, env: dict[str, str], t0: float) -> Outcome:
    state = rd.read_status().state
    if state in TERMINAL:  # finished by another scheduler while we waited for its claim
        return Outcome(job.run_id, state, 0, node, time.time() - t0)
    launches, failures, error = 0, 0, None
    while failures <= retries:
        attempt = rd.update_status(attempts=rd.read_status().attempts + 1, node=node, error=None).attempts
        launches += 1
        rc = _launch(job, rd, attempt, node, env)
        status = rd.read_status()
        state = status.state
        if state in TERMINAL:
            return Outcome(job.run_id, state, launches, node, time.time() - t0)
        if rc == EXIT_BUSY:  # trained by a process outside any scheduler (`ultramem train`): wait for it
            rd.update_status(attempts=attempt - 1)  # it never started: not an attempt
            time.sleep(CLAIM_POLL_S)
            continue
        failures += 1
        tail = _log_tail(rd)
        error = f"attempt {launches}: exit code {rc}" + (f" (state left at {state!r})" if rc == 0 else "")
        why = run_error(status.error, tail)
        if why:  # the run's own one-line error first: the console and `sweep status` show the first line
            error = f"{why} ({error})"
        error += "\n" + tail
        if rc == EXIT_CONFIG:  # the same config fails the same way: do not retry
            break
    rd.update_status(state="failed", error=error)
    return Outcome(job.run_id, "failed", launches, node, time.time() - t0, error)


def _launch(job: Job, rd: RunDir, attempt: int, node: str, env: dict[str, str]) -> int:
    cmd = launch_command(job.run_dir, job.nproc)
    threads = max(1, int(job.cpus // job.nproc))
    child_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **env}
    # torchrun must get the chance to stop its workers; a lone trainer can simply be killed.
    death_signal = signal.SIGTERM if job.nproc > 1 else signal.SIGKILL
    with open(rd.log_path, "ab") as log:
        log.write(f"=== attempt {attempt} on {node} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env, preexec_fn=_die_with_parent(death_signal))
        _LIVE.add(proc)
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:  # we are being cancelled: take the training process down with us
                proc.kill()
                proc.wait()
            _LIVE.discard(proc)


_LIVE: set[subprocess.Popen] = set()  # training processes launched from this process (killed on interrupt)
_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send `sig` to the child when the launching thread dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only makes the call
    return lambda: prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def run_error(status_error: str | None, log_tail: str) -> str | None:
    """The run's own one-line error after a failed attempt: the first line of the error the trainer wrote into
    status.json, else the last `error: ...` line the training process printed (train.log)."""
    if status_error and status_error.strip():
        return status_error.strip().splitlines()[0]
    for line in reversed(log_tail.splitlines()):
        if line.startswith(("error: ", "diverged: ")):
            return line.split(": ", 1)[1].strip() or None
    return None


def _log_tail(rd: RunDir) -> str:
    try:
        with open(rd.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _node_name() -> str:
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    return socket.gethostname()


# ---- pre-flight --------------------------------------------------------------------------------------------------


def preflight(jobs: list[Job], nodes: list[Node], backend: str, source: str) -> None:
    """Refuse to start if some run fits on no node: on Ray it would stay PENDING forever."""
    bad = [j for j in jobs if not any(n.fits(j) for n in nodes)]
    if not bad:
        return
    lines = [f"{source}: {len(bad)} run(s) need more than any node of the {backend} cluster offers, so they could "
             "never start; nothing was launched."]
    lines += [f"  {j.run_id}: {j.describe()}" for j in bad[:10]]
    if len(bad) > 10:
        lines.append(f"  ... and {len(bad) - 10} more")
    lines.append("nodes:" if nodes else "nodes: none alive")
    lines += [f"  {n.describe()}" for n in nodes]
    lines.append("fix: lower `resources` in the sweep file (resources.default / resources.rules), or run on a "
                 "cluster with such a node (--address / RAY_ADDRESS)")
    raise ResourceError("\n".join(lines))


# ---- ray backend -------------------------------------------------------------------------------------------------

CONNECT_TIMEOUT_S = 30.0  # `sweep run --connect-timeout`: how long to try to reach a Ray cluster before giving up


def probe_address(address: str, timeout: float) -> None:
    """Fail fast when nothing listens at a Ray address: Ray itself retries for minutes, ignoring Ctrl-C."""
    hostport = address.split("://", 1)[-1]
    if hostport in ("auto", "local"):
        return
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"Ray address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379) or ray://HOST:PORT; "
                          "check --address / RAY_ADDRESS")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ConfigError(f"Ray at {address}: cannot connect ({reason}, waited up to {timeout:g} s); check "
                          "--address / RAY_ADDRESS, that `ray start --head` runs on that host and that its port "
                          "(default 6379) is reachable from here (see docs/cluster.md)") from None


def start_reaper() -> subprocess.Popen:
    """Tag this driver's environment (inherited by the private Ray's processes) and start the watcher that ends
    them when the driver is gone, even after a SIGKILL (experiments/ray_reaper.py)."""
    tag = f"{os.getpid()}-{os.urandom(4).hex()}"
    os.environ[OWNER_ENV] = tag
    return subprocess.Popen([sys.executable, "-m", "experiments.ray_reaper", tag], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, start_new_session=True)


def _init_within(ray: Any, timeout: float, **kwargs: Any) -> None:
    """ray.init in a helper thread, so that the main thread can give up after `timeout` (a port that accepts
    connections but is no Ray) and Ctrl-C reaches it at any moment."""
    box: dict[str, BaseException] = {}

    def target() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as err:  # handed to the main thread
            box["err"] = err

    thread = threading.Thread(target=target, name="ray-init", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ConfigError(f"Ray at {kwargs.get('address')}: no answer from a Ray head within {timeout:g} s (the port "
                          "is open, but nothing there completed Ray's handshake); check that it is the Ray head's "
                          "GCS port (`ray status` on the head prints it) or raise --connect-timeout")
    if "err" in box:
        raise box["err"]



def ray_temp_dir() -> str:
    """Where a fresh local Ray keeps its sessions and logs (short: Ray's socket paths must stay < 108 chars)."""
    return os.environ.get("ULTRAMEM_RAY_TMP", f"/tmp/ultramem-ray-{os.getuid()}")


class RayBackend:
    """Plain Ray tasks on a fresh local Ray, an existing cluster (address / RAY_ADDRESS), or an already
    initialised Ray (tests, notebooks), which it then leaves running."""

    name = "ray"

    def __init__(self, address: str | None = None, connect_timeout: float = CONNECT_TIMEOUT_S):
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            probe_address(address, connect_timeout)
        if not address and "ray" not in sys.modules:
            # A fresh Ray binds the machine's address unless this is set when ray is imported: keep it on loopback.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        self.ray = ray
        self.owned = False
        self.reaper: subprocess.Popen | None = None
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        try:
            if address:
                _init_within(ray, connect_timeout, address=address, **kwargs)
            else:
                # A fresh, private Ray: no dashboard, small object store (runs pass no data), and a watcher that
                # stops its processes if this driver dies without shutting it down.
                self.reaper = start_reaper()
                ray.init(address="local", include_dashboard=False, _temp_dir=ray_temp_dir(),
                         object_store_memory=128 * 2**20, **kwargs)
        except ray.exceptions.AuthenticationError as err:
            raise ConfigError(f"Ray at {address}: token authentication failed ({err.message}). Run with "
                              "RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH "
                              "or RAY_AUTH_TOKEN (see docs/cluster.md)") from None
        except ConnectionError as err:
            raise ConfigError(f"Ray at {address}: cannot connect ({err}); check --address / RAY_ADDRESS and that "
                              "`ray start --head` runs there (see docs/cluster.md)") from None
        self.owned = True

    def nodes(self) -> list[Node]:
        out = []
        for n in self.ray.nodes():
            if not n.get("Alive"):
                continue
            res = n.get("Resources", {})
            mem = res.get("memory")
            out.append(Node(n.get("NodeManagerAddress", "?"), res.get("CPU", 0.0), res.get("GPU", 0.0),
                            None if mem is None else mem / 2**30))
        return out

    def run(self, jobs: list[Job], retries: int, max_concurrent: int | None,
            report: Callable[[Outcome], None]) -> list[Outcome]:
        ray = self.ray
        task = ray.remote(train_run)
        pending, inflight, outcomes = list(jobs), {}, []
        deps = Dependencies(jobs)
        limit = max_concurrent or len(jobs) or 1

        def ended(outcome: Outcome) -> None:
            deps.ended(outcome)
            outcomes.append(outcome)
            report(outcome)

        try:
            while pending or inflight:
                for job in list(pending):  # in order (longest first), skipping branches still waiting
                    if len(inflight) >= limit:
                        break
                    gate = deps.check(job)
                    if gate == "wait":
                        continue
                    pending.remove(job)
                    if gate != "run":
                        ended(deps.fail(job, gate, "-"))
                        continue
                    opts: dict[str, Any] = {"num_cpus": job.cpus, "num_gpus": job.gpus, "max_retries": retries,
                                            "retry_exceptions": False, "name": f"train:{job.run_id}"}
                    if job.memory_gb is not None:
                        opts["memory"] = int(job.memory_gb * 2**30)
                    inflight[task.options(**opts).remote(job, retries)] = job
                if not inflight:  # only branches waiting for a trunk another scheduler trains
                    time.sleep(WAIT_POLL_S)
                    continue
                # With a timeout: a wait without one blocks in Ray's C++ and Ctrl-C would not reach us until a
                # run finished.
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=WAIT_POLL_S)
                for ref in ready:
                    job = inflight.pop(ref)
                    ended(self._result(ref, job))
        except BaseException:
            for ref in inflight:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        return outcomes

    def _result(self, ref: Any, job: Job) -> Outcome:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            # The task's worker or node died more often than max_retries allows.
            error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            rd = RunDir(job.run_dir)
            with rd.claim() as free:
                if free and rd.read_status().state not in TERMINAL:
                    rd.update_status(state="failed", error=error)
            return Outcome(job.run_id, "failed", 0, "?", 0.0, error)

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()
        if self.reaper is not None:  # EOF: it stops whatever the shutdown left behind, then exits
            os.environ.pop(OWNER_ENV, None)  # processes started from now on are not this Ray's
            with contextlib.suppress(Exception):
                self.reaper.stdin.close()
                self.reaper.wait(timeout=30)


# ---- local backend -----------------------------------------------------------------------------------------------


def local_node() -> Node:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Node(socket.gethostname(), float(cpus), float(len(_local_gpu_ids())), _total_memory_gb())


def _local_gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def _total_memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except FileNotFoundError:
        pass
    return None


@dataclass
class _Pool:
    cpus: float
    memory_gb: float | None
    gpus: list[str] = field(default_factory=list)

    def take(self, job: Job) -> list[str] | None:
        n_gpu = math.ceil(job.gpus)
        mem_ok = job.memory_gb is None or self.memory_gb is None or job.memory_gb <= self.memory_gb + 1e-9
        if job.cpus > self.cpus + 1e-9 or n_gpu > len(self.gpus) or not mem_ok:
            return None
        self.cpus -= job.cpus
        if job.memory_gb is not None and self.memory_gb is not None:
            self.memory_gb -= job.memory_gb
        taken, self.gpus = self.gpus[:n_gpu], self.gpus[n_gpu:]
        return taken

    def give(self, job: Job, gpus: list[str]) -> None:
        self.cpus += job.cpus
        if job.memory_gb is not None and self.memory_gb is not None:
            self.memory_gb += job.memory_gb
        self.gpus += gpus


class LocalBackend:
    """Runs on this machine only: a thread per running job, admitted while its CPUs/GPUs/memory are free."""

    name = "local"

    def __init__(self) -> None:
        self.node = local_node()

    def nodes(self) -> list[Node]:
        return [self.node]

    def run(self, jobs: list[Job], retries: int, max_concurrent: int | None,
            report: Callable[[Outcome], None]) -> list[Outcome]:
        pool = _Pool(self.node.cpus, self.node.memory_gb, _local_gpu_ids())
        limit = max_concurrent or len(jobs) or 1
        pending, done, outcomes = list(jobs), queue.Queue(), []
        running: dict[str, tuple[Job, list[str]]] = {}
        deps = Dependencies(jobs)
        try:
            while pending or running:
                for job in list(pending):
                    if len(running) >= limit:
                        break
                    gate = deps.check(job)
                    if gate == "wait":
                        continue
                    if gate != "run":
                        pending.remove(job)
                        done.put(deps.fail(job, gate, self.node.name))
                        continue
                    gpus = pool.take(job)
                    if gpus is None:
                        continue
                    pending.remove(job)
                    running[job.run_id] = (job, gpus)
                    env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {}
                    threading.Thread(target=self._work, args=(job, retries, env, done), daemon=True).start()
                try:
                    outcome = done.get(timeout=WAIT_POLL_S)  # (a timeout keeps Ctrl-C prompt here too)
                except queue.Empty:
                    continue
                if outcome.run_id in running:  # (a branch failed before it started holds nothing)
                    job, gpus = running.pop(outcome.run_id)
                    pool.give(job, gpus)
                deps.ended(outcome)
                outcomes.append(outcome)
                report(outcome)
        except BaseException:
            for proc in list(_LIVE):
                with contextlib.suppress(Exception):
                    proc.kill()
            raise
        return outcomes

    def _work(self, job: Job, retries: int, env: dict[str, str], done: queue.Queue) -> None:
        try:
            outcome = train_run(job, retries, self.node.name, env)
        except Exception as err:
            outcome = Outcome(job.run_id, "failed", 0, self.node.name, 0.0, f"{type(err).__name__}: {err}")
        done.put(outcome)

    def close(self) -> None:
        pass


def make_backend(name: str, address: str | None = None, connect_timeout: float = CONNECT_TIMEOUT_S) -> Backend:
    if name == "ray":
        return RayBackend(address, connect_timeout)
    if name == "local":
        if address:
            raise ConfigError("--address only applies to --backend ray")
        return LocalBackend()
    raise ConfigError(f"--backend {name!r}: unknown; allowed: {' | '.join(BACKENDS)}")


# ---- a whole sweep -----------------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    plan: Plan
    skipped: list[str]  # run ids already done/diverged before this call
    outcomes: list[Outcome]
    wall_s: float

    @property
    def ok(self) -> bool:
        return all(o.state in TERMINAL for o in self.outcomes)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {"skipped": len(self.skipped)}
        for o in self.outcomes:
            out[o.state] = out.get(o.state, 0) + 1
        return out


def check_output_dir(plan: Plan) -> None:
    """ConfigError (one line: the sweep file, output_dir and the reason) unless the sweep's runs folder can be
    created and written; what this creates to find out is removed again."""
    root = plan.runs_dir
    created = [p for p in (root, *root.parents) if not p.exists() and not p.is_symlink()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-") as f:
            f.write(b"ultramem write test\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        for p in created:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        reason = err.strerror or str(err)
        if isinstance(err, NotADirectoryError | FileExistsError):
            reason = "a part of the path is a file, not a folder"
        raise ConfigError(f"{plan.path}: output_dir: cannot create or write the runs folder {root} ({reason}); set "
                          "output_dir in the sweep file to a writable folder") from None


def prepare(plan: Plan) -> tuple[list[Job], list[str]]:
    """Create the run folders (resolved config.yaml, pending status); return the runs still to train."""
    jobs, skipped = [], []
    for run in plan.runs:
        rd = RunDir(plan.runs_dir / run.run_id)
        now = run_state(rd)
        if now.finished:
            skipped.append(run.run_id)
            continue
        # (Re)written unless another scheduler trains the run: bookkeeping edits (log_every, eval_every, ...)
        # reach unfinished runs, whose id and checkpoints they do not change.
        if not rd.config_path.exists() or now.state not in ("claimed", "running"):
            rd.write_config(run.config, run.run_id)
        if not rd.status_path.exists() or now.state == "unreadable":
            rd.update_status(state="pending", attempts=0, name=run.name)
        jobs.append(Job.from_planned(run, plan.runs_dir))
    return jobs, skipped


def run_sweep(plan: Plan, backend: str | Backend = "ray", address: str | None = None,
              max_concurrent: int | None = None, retries: int = 2,
              log: Callable[[str], None] = print, connect_timeout: float = CONNECT_TIMEOUT_S) -> SweepReport:
    """Train every unfinished run of `plan`; returns when each has reached done/diverged/failed."""
    if retries < 0:
        raise ConfigError(f"--retries {retries}: must be >= 0")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {max_concurrent}: must be >= 1")
    t0 = time.time()
    if any(not run_state(RunDir(plan.runs_dir / r.run_id)).finished for r in plan.runs):
        # refuse a bad flag, a dead cluster or an unwritable output_dir before any run folder is written
        if isinstance(backend, str) and backend == "local" and address:
            raise ConfigError("--address only applies to --backend ray")
        if isinstance(backend, str) and backend == "ray" and (address or os.environ.get("RAY_ADDRESS")):
            probe_address(address or os.environ["RAY_ADDRESS"], connect_timeout)
        check_output_dir(plan)
    jobs, skipped = prepare(plan)
    # Longest runs first (LPT: the makespan is then at most 4/3 of the optimum on identical slots); runs another
    # scheduler is training go last, so ours start with work nobody else is doing.
    jobs.sort(key=lambda j: (is_claimed(RunDir(j.run_dir)), -j.flops))
    if not jobs:  # nothing to train: no backend (and no Ray start-up) needed
        log(f"sweep {plan.sweep.name}: all {len(plan.runs)} runs already finished -> {plan.runs_dir}")
        return SweepReport(plan, skipped, [], time.time() - t0)
    runner = make_backend(backend, address, connect_timeout) if isinstance(backend, str) else backend
    try:
        nodes = runner.nodes()
        preflight(jobs, nodes, runner.name, str(plan.path))
        cpus, gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
        log(f"sweep {plan.sweep.name}: {len(plan.runs)} runs, {len(skipped)} already finished, {len(jobs)} to run "
            f"on {runner.name} ({len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs) -> {plan.runs_dir}")
        names = {r.run_id: r.name for r in plan.runs}
        done = [0]

        def report(o: Outcome) -> None:
            done[0] += 1
            extra = f" - {o.error.splitlines()[0]}" if o.error else ""
            log(f"[{done[0]}/{len(jobs)}] {o.state:<8} {o.run_id} ({names.get(o.run_id, '')}) "
                f"{o.wall_s:.1f}s, {o.attempts} attempt(s), node {o.node}{extra}")

        outcomes = runner.run(jobs, retries, max_concurrent, report)
    finally:
        runner.close()
    result = SweepReport(plan, skipped, outcomes, time.time() - t0)
    counts = ", ".join(f"{v} {k}" for k, v in result.counts().items())
    log(f"sweep {plan.sweep.name}: {counts} in {result.wall_s:.1f}s")
    return result
