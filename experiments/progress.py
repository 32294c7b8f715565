"""Live progress of a sweep, read from its run folders: the view `ultramem sweep run` shows while it trains and
`ultramem sweep status --watch` shows for a sweep started elsewhere (another terminal, a Ray job).

A snapshot holds, per run of the plan, its state (`runfolder.run_state`), step/total, latest training loss and the
planned FLOPs it has trained: its planned FLOPs times the fraction of its steps that metrics.jsonl reports done (a
cooldown branch counts from its branch step, as `sweep plan` does). Summed: runs done / running / pending / failed
and FLOPs done of planned.

ETA = FLOPs left / throughput, where FLOPs left are the planned FLOPs of the runs not yet ended (pending, queued,
running, interrupted) minus what they have done. The throughput is the sweep's own: the planned FLOPs that got done
per second of wall clock over the last HORIZON_S seconds the view has watched, from the first moment a run was
training (process start-ups, evaluations and idle slots included; a slow start drops out once the horizon has
passed), so the estimate settles as runs finish. Until the view has watched for WINDOW_S seconds and seen FLOPs get done, it is the
sum of the running runs' own FLOP/s (each from its last metrics.jsonl lines); with neither, there is no ETA yet.

Display: on a terminal a rich Live view redraws in place (counts, a FLOPs bar with throughput and ETA, a table of
the running runs); anywhere else (CI, nohup, a Ray job's log) one plain line every `every` seconds, first at once,
never an escape sequence. Both end with one summary line.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from experiments.textfmt import duration, human
from runfolder import RunDir, run_state

WINDOW_S = 20.0  # the observed throughput is used once the view has watched this long ...
HORIZON_S = 300.0  # ... over at most the last this many seconds
RATE_LINES = 5  # a running run's FLOP/s: over its last this many train lines
EVERY_S = 30.0  # without a terminal: a progress line this often (`--progress-every`)
POLL_S = 2.0  # how often a terminal view reads the run folders
IDLE_EXIT_S = 15.0  # `status --watch` ends once no run has been running or queued for this long
SHOWN_RUNS = 4  # running runs named on a plain line (the rest: "+N more")

ACTIVE = ("running", "claimed", "pending", "interrupted", "unreadable")  # not ended: will (or may) still train
GROUP = {"done": "done", "diverged": "diverged", "running": "running", "failed": "failed",
         "claimed": "pending", "pending": "pending", "interrupted": "pending", "unreadable": "pending"}


@dataclass(frozen=True)
class RunSpec:
    """What the plan says about one run."""

    run_id: str
    name: str
    flops: float  # planned FLOPs this run trains itself (a cooldown branch: its cooldown only)
    steps: int  # its last step
    start_step: int = 0  # a cooldown branch starts at its trunk's step

    @classmethod
    def from_planned(cls, run: Any) -> RunSpec:
        return cls(run.run_id, run.name, float(run.trained_flops), int(run.steps), int(run.branch_step))

    def fraction(self, step: int) -> float:
        return min(1.0, max(0.0, (step - self.start_step) / max(1, self.steps - self.start_step)))


@dataclass(frozen=True)
class RunProgress:
    spec: RunSpec
    state: str  # runfolder.STATES
    step: int = 0
    loss: float | None = None
    flops_done: float = 0.0
    flops_per_s: float | None = None  # running runs: from the last metrics.jsonl lines

    @property
    def group(self) -> str:
        return GROUP.get(self.state, "pending")


@dataclass(frozen=True)
class Snapshot:
    time: float
    runs: tuple[RunProgress, ...]

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "running": 0, "pending": 0, "failed": 0, "diverged": 0}
        for r in self.runs:
            out[r.group] += 1
        return out

    @property
    def planned_flops(self) -> float:
        return sum(r.spec.flops for r in self.runs)

    @property
    def flops_done(self) -> float:
        return sum(r.flops_done for r in self.runs)

    @property
    def flops_left(self) -> float:
        return sum(r.spec.flops - r.flops_done for r in self.runs if r.state in ACTIVE)

    @property
    def running(self) -> list[RunProgress]:
        return [r for r in self.runs if r.state == "running"]

    @property
    def active(self) -> bool:
        """Whether some run is training or queued by a scheduler."""
        return any(r.state in ("running", "claimed") for r in self.runs)

    @property
    def ended(self) -> bool:
        """Every run done, diverged or failed."""
        return not any(r.state in ACTIVE for r in self.runs)


# ---- reading the run folders -------------------------------------------------------------------------------------


def read_run(spec: RunSpec, runs_dir: Path) -> RunProgress:
    """One run's progress from its folder (a missing folder is a pending run)."""
    rd = RunDir(runs_dir / spec.run_id)
    now = run_state(rd)
    if now.state in ("done", "diverged"):
        return RunProgress(spec, now.state, spec.steps, None, spec.flops)
    train = [m for m in rd.metrics() if m.get("kind") == "train" and isinstance(m.get("step"), int)
             and isinstance(m.get("time", 0.0), int | float)] if rd.metrics_path.exists() else []
    step = max((now.status.step or 0) if now.status else 0, train[-1]["step"] if train else 0)
    loss = train[-1].get("loss") if train and isinstance(train[-1].get("loss"), int | float) else None
    rate = _flops_per_s(spec, train[-RATE_LINES:]) if now.state == "running" else None
    return RunProgress(spec, now.state, step, loss, spec.flops * spec.fraction(step), rate)


def _flops_per_s(spec: RunSpec, rows: list[dict[str, Any]]) -> float | None:
    """Planned FLOPs per second of wall clock over these train lines (None if they span no time or steps)."""
    if len(rows) < 2:
        return None
    dt = rows[-1].get("time", 0.0) - rows[0].get("time", 0.0)
    dstep = rows[-1]["step"] - rows[0]["step"]
    if dt <= 0 or dstep <= 0:  # (lines of two attempts around a resume, or no time recorded)
        return None
    return spec.flops * (spec.fraction(rows[-1]["step"]) - spec.fraction(rows[0]["step"])) / dt


class Tracker:
    """Snapshots of one sweep's run folders; runs that ended done/diverged are not read again."""

    def __init__(self, specs: Sequence[RunSpec], runs_dir: str | Path, clock: Callable[[], float] = time.time):
        self.specs, self.runs_dir, self.clock = list(specs), Path(runs_dir), clock
        self._final: dict[str, RunProgress] = {}
        self.first: Snapshot | None = None
        self._recent: list[Snapshot] = []  # the snapshots of the last HORIZON_S seconds (and the one before)

    def snapshot(self) -> Snapshot:
        runs = []
        for spec in self.specs:
            r = self._final.get(spec.run_id) or read_run(spec, self.runs_dir)
            if r.state in ("done", "diverged"):
                self._final[spec.run_id] = r
            runs.append(r)
        snap = Snapshot(self.clock(), tuple(runs))
        self.first = self.first or snap
        if self._recent or snap.running:  # (the window opens when the first run trains: Ray's start-up is not in it)
            self._recent.append(snap)
        while len(self._recent) > 2 and snap.time - self._recent[1].time >= HORIZON_S:
            self._recent.pop(0)
        return snap

    def reference(self, now: Snapshot) -> Snapshot | None:
        """The snapshot the throughput is measured from: the oldest within HORIZON_S of `now`."""
        return next((s for s in self._recent if now.time - s.time <= HORIZON_S), None)


def throughput(ref: Snapshot | None, now: Snapshot) -> float | None:
    """Planned FLOPs per second (module docstring): observed since `ref`, else the running runs' own rates."""
    if ref is not None and now.time - ref.time >= WINDOW_S and now.flops_done > ref.flops_done:
        return (now.flops_done - ref.flops_done) / (now.time - ref.time)
    rates = [r.flops_per_s for r in now.running if r.flops_per_s]
    return sum(rates) if rates else None


def eta(ref: Snapshot | None, now: Snapshot) -> float | None:
    """Seconds until the runs not yet ended are done, at `throughput`."""
    if now.ended or now.flops_left <= 0:
        return 0.0
    rate = throughput(ref, now)
    return now.flops_left / rate if rate else None


# ---- rendering ---------------------------------------------------------------------------------------------------


def _counts_text(snap: Snapshot) -> str:
    c = snap.counts()
    text = f"{c['done']} done, {c['running']} running, {c['pending']} pending, {c['failed']} failed"
    return text + (f", {c['diverged']} diverged" if c["diverged"] else "")


def _flops_text(tracker: Tracker, snap: Snapshot) -> str:
    planned = snap.planned_flops
    pct = 100.0 * snap.flops_done / planned if planned else 100.0
    ref = tracker.reference(snap)
    rate = throughput(ref, snap)
    return (f"FLOPs {human(snap.flops_done)}/{human(planned)} ({pct:.0f}%), "
            f"{'-' if rate is None else human(rate)} FLOP/s, ETA {duration(eta(ref, snap))}")


def _elapsed(tracker: Tracker, snap: Snapshot) -> str:
    return duration(snap.time - tracker.first.time if tracker.first else 0.0)


def _run_text(r: RunProgress) -> str:
    loss = "-" if r.loss is None else f"{r.loss:.3f}"
    return f"{r.spec.name or r.spec.run_id} {r.step}/{r.spec.steps} loss {loss}"


def plain_line(name: str, tracker: Tracker, snap: Snapshot) -> str:
    """One compact line (no TTY): elapsed, counts, FLOPs, throughput, ETA and the running runs."""
    line = f"[{_elapsed(tracker, snap)}] sweep {name}: {_counts_text(snap)} | {_flops_text(tracker, snap)}"
    running = snap.running
    if running:
        more = f", +{len(running) - SHOWN_RUNS} more" if len(running) > SHOWN_RUNS else ""
        line += " | running: " + ", ".join(_run_text(r) for r in running[:SHOWN_RUNS]) + more
    return line


def summary_line(name: str, tracker: Tracker, snap: Snapshot) -> str:
    first = tracker.first
    elapsed = snap.time - first.time if first else 0.0
    done = snap.flops_done - (first.flops_done if first else 0.0)
    rate = f", {human(done / elapsed)} FLOP/s" if elapsed >= 1 and done > 0 else ""
    return (f"sweep {name}: {_counts_text(snap)}; FLOPs {human(snap.flops_done)}/{human(snap.planned_flops)}; "
            f"{human(done)} FLOPs trained in {duration(elapsed)}{rate}")


def rich_view(name: str, tracker: Tracker, snap: Snapshot) -> Any:
    """The terminal view: a header, the FLOPs bar, and the running runs."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    header = Text.assemble((f"sweep {name}", "bold"), f"  {_counts_text(snap)}  [{_elapsed(tracker, snap)}]")
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=max(snap.planned_flops, 1.0), completed=snap.flops_done, width=40),
                Text(_flops_text(tracker, snap)))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col, justify in (("running", "left"), ("run_id", "left"), ("step", "right"), ("loss", "right"),
                         ("FLOP/s", "right")):
        table.add_column(col, justify=justify)
    for r in snap.running:
        table.add_row(r.spec.name, r.spec.run_id, f"{r.step}/{r.spec.steps}",
                      "-" if r.loss is None else f"{r.loss:.3f}", human(r.flops_per_s))
    return Group(header, bar, table) if snap.running else Group(header, bar)


# ---- the view ----------------------------------------------------------------------------------------------------


@dataclass
class ProgressView:
    """Shows a sweep's progress: `with ProgressView(...) as view: run_sweep(..., log=view.log)`.

    With `background` (sweep run) a thread reads the run folders and draws, every POLL_S on a terminal and every
    `every` seconds otherwise; without it (`watch`) the caller draws. `log` prints a message above a terminal view,
    or as a line of its own. Leaving the block draws the last state and, unless an exception left it, the summary."""

    name: str
    tracker: Tracker
    every: float = EVERY_S
    out: TextIO = field(default_factory=lambda: sys.stdout)
    tty: bool | None = None  # None: whether `out` is a terminal
    background: bool = True
    last: Snapshot | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _live: Any = None
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        if self.tty is None:
            self.tty = bool(getattr(self.out, "isatty", lambda: False)())

    def __enter__(self) -> ProgressView:
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            # (other prints and warnings of this process appear above the view rather than through it)
            self._live = Live(console=Console(file=self.out), auto_refresh=False, transient=False)
            self._live.start()
        self.draw()
        if self.background:
            self._thread = threading.Thread(target=self._loop, name="sweep-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._live is not None:  # the last frame stays on the terminal; a plain log ends with the summary
            self.draw()
            self._live.stop()
            self._live = None
        if exc_type is None:
            self.log(summary_line(self.name, self.tracker, self.tracker.snapshot()))

    def log(self, message: str) -> None:
        with self._lock:
            if self._live is not None:
                self._live.console.print(message, markup=False, highlight=False, soft_wrap=True)
            else:
                print(message, file=self.out, flush=True)

    def draw(self, snap: Snapshot | None = None) -> Snapshot:
        snap = snap or self.tracker.snapshot()
        with self._lock:
            self.last = snap
            if self._live is not None:
                self._live.update(rich_view(self.name, self.tracker, snap), refresh=True)
            else:
                print(plain_line(self.name, self.tracker, snap), file=self.out, flush=True)
        return snap

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S if self.tty else self.every):
            self.draw()


def watch(view: ProgressView, idle_exit_s: float = IDLE_EXIT_S, sleep: Callable[[float], None] = time.sleep
          ) -> Snapshot:
    """`sweep status --watch`, inside `with view` (background=False): read the folders every POLL_S, draw on a
    terminal each time and otherwise every `view.every` s, until every run has ended, or until no run has been
    running or queued for `idle_exit_s` seconds (a sweep stopped midway, or run in parts with --seeds)."""
    idle_since: float | None = None
    last_drawn = view.last.time if view.last else -float("inf")
    while True:
        snap = view.tracker.snapshot()
        view.last = snap
        if snap.ended:
            return snap
        idle_since = None if snap.active else (snap.time if idle_since is None else idle_since)
        if idle_since is not None and snap.time - idle_since >= idle_exit_s:
            return snap
        if view.tty or snap.time - last_drawn >= view.every:
            view.draw(snap)
            last_drawn = snap.time
        sleep(POLL_S if view.tty else max(0.0, min(POLL_S, last_drawn + view.every - snap.time)))
