"""A real two-host Ray cluster on one machine: two network namespaces joined by a veth pair, each with its own
address, `ray start --head` in one and `ray start --address` in the other, token authentication on. A sweep runs
across both hosts; the worker host's Ray is stopped mid-run and every run still ends done, the lost run resumed
from its checkpoint on the head host.

Needs root and `ip netns`; skipped with the reason otherwise. Namespaces, links and Ray sessions carry a unique
tag and are always torn down. The worker host is stopped by signalling the processes of its own Ray session
(found by its temp dir) and their descendants: `ray stop` would stop every Ray on the machine, since network
namespaces share one process table.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from experiments.sweep import plan_sweep
from runfolder import RunDir

pytestmark = [pytest.mark.netns, pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent
PORT = 6390


def _proc_table() -> dict[int, tuple[int, bytes, str]]:
    """pid -> (ppid, cmdline, state) for every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (int(fields[1]), cmd, fields[0])
    return out


def _session_pids(marker: str) -> list[int]:
    """The processes whose command line names `marker` (a Ray session's temp dir), and all their descendants."""
    table = _proc_table()
    found = {pid for pid, (_, cmd, state) in table.items() if marker.encode() in cmd and state != "Z"}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _, state) in table.items() if ppid in found and state != "Z"} - found
        found |= kids
        grew = bool(kids)
    return sorted(found)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class TwoHosts:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns = {"head": f"umh{tag}", "worker": f"umw{tag}"}
        self.veth = {"head": f"uvh{tag}", "worker": f"uvw{tag}"}
        subnet = f"10.213.{secrets.randbelow(250) + 1}"
        self.ip = {"head": f"{subnet}.1", "worker": f"{subnet}.2"}
        self.temp = {k: f"/tmp/ray-{v}" for k, v in self.ns.items()}
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                        PATH=f"{BIN}:{os.environ.get('PATH', '')}")
        self.created: list[str] = []

    @property
    def address(self) -> str:
        return f"{self.ip['head']}:{PORT}"

    def run(self, *cmd: str, host: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
        full = ["ip", "netns", "exec", self.ns[host], *cmd] if host else list(cmd)
        out = subprocess.run(full, env=self.env, capture_output=True, text=True, timeout=180, **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(full)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def up(self) -> None:
        for ns in self.ns.values():
            self.run("ip", "netns", "add", ns)
            self.created.append(ns)
        self.run("ip", "link", "add", self.veth["head"], "type", "veth", "peer", "name", self.veth["worker"])
        for host in ("head", "worker"):
            ns, dev = self.ns[host], self.veth[host]
            self.run("ip", "link", "set", dev, "netns", ns)
            self.run("ip", "-n", ns, "addr", "add", f"{self.ip[host]}/24", "dev", dev)
            self.run("ip", "-n", ns, "link", "set", "lo", "up")
            self.run("ip", "-n", ns, "link", "set", dev, "up")
        common = ["--num-cpus=1", "--disable-usage-stats"]
        self.run(str(BIN / "ray"), "start", "--head", f"--node-ip-address={self.ip['head']}", f"--port={PORT}",
                 "--include-dashboard=false", f"--temp-dir={self.temp['head']}", *common, host="head")
        self.run(str(BIN / "ray"), "start", f"--address={self.address}", f"--node-ip-address={self.ip['worker']}",
                 f"--temp-dir={self.temp['worker']}", *common, host="worker")

    def alive_nodes(self) -> list[str]:
        code = (f"import ray, logging; ray.init(address='{self.address}', log_to_driver=False, "
                "logging_level=logging.ERROR); "
                "print(' '.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
        return self.run(sys.executable, "-c", code, host="head").stdout.split()

    def stop_host(self, host: str, grace: float = 10.0) -> None:
        """What `ray stop` does on that host only: SIGTERM its Ray processes, then SIGKILL what is left."""
        pids = _session_pids(self.temp[host])
        _signal_all(pids, signal.SIGTERM)
        end = time.time() + grace
        while time.time() < end and _session_pids(self.temp[host]):
            time.sleep(0.2)
        _signal_all(_session_pids(self.temp[host]) + pids, signal.SIGKILL)

    def down(self) -> None:
        for host in ("worker", "head"):
            self.stop_host(host, grace=5.0)
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)
        for temp in self.temp.values():
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (`ip netns`) to build two hosts in network namespaces")
    probe = f"umprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    cluster = TwoHosts()
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


def test_sweep_runs_on_both_hosts_and_survives_losing_the_worker_host(two_hosts, tmp_path):
    assert two_hosts.alive_nodes() == sorted(two_hosts.ip.values())
    path = tmp_path / "cluster.yaml"
    path.write_text(textwrap.dedent(f"""
        name: cluster
        output_dir: {tmp_path / 'runs'}
        base:
          data: {{source: embedded}}
          train: {{log_every: 5, eval_every: 1000, eval_batches: 1, knowledge_probe: false, batch_size: 4,
                  ckpt_every: 20, steps: 120}}
        parameters: {{model.preset: {{value: dense-tiny}}}}
        seeds: [0, 1, 2]
        resources: {{default: {{cpus: 1}}}}
        """))
    plan = plan_sweep(path)
    dirs = [RunDir(plan.runs_dir / r.run_id) for r in plan.runs]
    driver = subprocess.Popen(
        ["ip", "netns", "exec", two_hosts.ns["head"], sys.executable, "-m", "cli", "sweep", "run",
         str(path), "--address", two_hosts.address, "--retries", "2"],
        env=two_hosts.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = None
        end = time.time() + 400
        while victim is None and time.time() < end:
            assert driver.poll() is None, driver.stdout.read()
            for rd in dirs:
                st = rd.status()
                if st.get("node") == two_hosts.ip["worker"] and st.get("state") == "running" and rd.checkpoints():
                    victim = rd
            time.sleep(0.2)
        assert victim is not None, "no run reached a checkpoint on the worker host"
        two_hosts.stop_host("worker")
        lost_at = time.time()
        out, _ = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, out
    assert two_hosts.alive_nodes() == [two_hosts.ip["head"]]

    for rd in dirs:
        status = rd.status()
        assert status["state"] == "done", (rd.run_id, status, out)
        steps = [(m["step"], m["time"]) for m in rd.metrics() if m.get("kind") == "train"]
        assert [s for s, _ in steps] == list(range(5, 121, 5))
    # The lost run finished on the head host, resuming from the checkpoint it had written on the worker host.
    status = victim.status()
    assert status["node"] == two_hosts.ip["head"] and status["attempts"] >= 2
    steps = [(m["step"], m["time"]) for m in victim.metrics() if m.get("kind") == "train"]
    # The orphaned trainer on the worker host may log a few more steps before it notices its Ray worker is gone, so
    # the resume point is what the last attempt reports, checked against the checkpoint schedule.
    resumed_from = status["resumed_from"]
    assert resumed_from >= 20 and resumed_from % 20 == 0 and resumed_from < 120
    assert all(t > lost_at for s, t in steps if s > resumed_from)
    assert "[3/3]" in out and "3 done" in out
