"""Is the machine running the drill itself saturated? Then latency figures say nothing about
the cluster.

On one machine every "region" of ``discovery dev`` shares the same cores: a fault's catch-up
work, or anything else running there, slows every region at once, in a way separate regions
would not feel. The drill samples the host's CPU while it runs and its own load generator's
punctuality; the latency verdict of a phase spent saturated is ``inconclusive``, not failed.

Sources, sampled every half second:
- ``/proc/stat``: CPU time busy (user, nice, system, irq, softirq, steal) of all time, and
  ``procs_running`` (tasks runnable at that instant, the reader included);
- ``/proc/pressure/cpu`` when the kernel has it (PSI): the time at least one runnable task
  waited for a CPU ("some").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROC_STAT = Path("/proc/stat")
PROC_PRESSURE = Path("/proc/pressure/cpu")


@dataclass(frozen=True)
class CpuSample:
    """Cumulative counters at one instant (monotonic seconds)."""

    at: float
    busy: int  # jiffies busy, all CPUs (steal included: time the hypervisor took away)
    total: int  # jiffies of every kind, all CPUs
    running: int  # procs_running at that instant (the reader itself included)
    waited_us: int | None = None  # PSI cpu "some" total, microseconds; None without PSI


def parse_proc_stat(text: str) -> tuple[int, int, int]:
    """(busy, total, procs_running) from the text of /proc/stat.

    The ``cpu`` line: user nice system idle iowait irq softirq steal guest guest_nice (guest
    time is already inside user and nice, so it is not added again)."""
    busy = total = running = 0
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "cpu":
            values = [int(v) for v in parts[1:9]] + [0] * (8 - len(parts[1:9]))
            user, nice, system, idle, iowait, irq, softirq, steal = values
            busy = user + nice + system + irq + softirq + steal
            total = busy + idle + iowait
        elif parts[0] == "procs_running":
            running = int(parts[1])
    if total == 0:
        raise ValueError("no cpu line in /proc/stat")
    return busy, total, running


def parse_pressure(text: str) -> int | None:
    """The ``some`` line's total (microseconds) from /proc/pressure/cpu; None if absent."""
    for line in text.splitlines():
        if line.startswith("some "):
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                if key == "total":
                    return int(value)
    return None


def read_sample(stat: Path = PROC_STAT, pressure: Path = PROC_PRESSURE) -> CpuSample | None:
    """One sample now; None where /proc/stat cannot be read (not Linux)."""
    at = time.monotonic()
    try:
        busy, total, running = parse_proc_stat(stat.read_text())
    except (OSError, ValueError):
        return None
    waited: int | None = None
    with contextlib.suppress(OSError, ValueError):
        waited = parse_pressure(pressure.read_text())
    return CpuSample(at, busy, total, running, waited)


@dataclass(frozen=True)
class HostFigures:
    """The host over one stretch of time."""

    seconds: float
    samples: int
    busy: float | None  # share of all CPUs' time busy, 0..1
    cpu_wait: float | None  # PSI: share of the time some runnable task waited for a CPU, 0..1
    runnable: float | None  # mean runnable tasks per CPU (the sampler excluded)
    cpus: int


def host_figures(samples: Sequence[CpuSample], start: float, end: float, cpus: int) -> HostFigures:
    """Figures over [start, end] from the samples taken within it (the first and last of
    them bound the counters' differences)."""
    inside = [s for s in samples if start <= s.at <= end]
    if len(inside) < 2:
        return HostFigures(end - start, len(inside), None, None, None, cpus)
    first, last = inside[0], inside[-1]
    total = last.total - first.total
    busy = (last.busy - first.busy) / total if total > 0 else None
    wait: float | None = None
    if first.waited_us is not None and last.waited_us is not None and last.at > first.at:
        wait = min(1.0, (last.waited_us - first.waited_us) / ((last.at - first.at) * 1e6))
    runnable = sum(max(0, s.running - 1) for s in inside) / len(inside) / cpus
    return HostFigures(end - start, len(inside), busy, wait, runnable, cpus)


@dataclass
class HostMonitor:
    """Samples the host every ``interval`` seconds while running (in the drill's loop: a
    read of two small files)."""

    interval: float = 0.5
    read: Callable[[], CpuSample | None] = read_sample
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    samples: list[CpuSample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.sample()
        self._task = asyncio.create_task(self._run())

    def sample(self) -> None:
        s = self.read()
        if s is not None:
            self.samples.append(s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.sample()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sample()

    def figures(self, start: float, end: float) -> HostFigures:
        return host_figures(self.samples, start, end, self.cpus)


@dataclass(frozen=True)
class Thresholds:
    """When the host, or the drill itself, counts as saturated. A sample window (half a
    second) is saturated when its CPUs were at least ``busy`` busy or runnable tasks waited
    for a CPU at least ``cpu_wait`` of the time; the drill is stalled when a tick of its
    load ran ``tick_late`` seconds or more behind schedule."""

    busy: float = 0.90
    cpu_wait: float = 0.60
    tick_late: float = 0.050
    # A call that began within this long after a saturated stretch still met it (queues drain).
    pad: float = 0.25

    def validate(self) -> None:
        if min(self.busy, self.cpu_wait, self.tick_late, self.pad) < 0:
            raise ValueError("saturation thresholds must be >= 0")


@dataclass(frozen=True)
class Stretch:
    """A stretch of time (monotonic seconds) the host or the drill was saturated."""

    start: float
    end: float
    busy: float | None = None  # the host's figures over it, when it is a sample window
    cpu_wait: float | None = None
    late: float | None = None  # how late the drill's tick ran, when it is a stall


@dataclass(frozen=True)
class Strain:
    """What the drill knows of its own machine: every saturated stretch, and the samples."""

    stretches: tuple[Stretch, ...] = ()
    samples: tuple[CpuSample, ...] = ()
    ticks: tuple[tuple[float, float], ...] = ()  # (due, late) of every load tick, all regions
    thresholds: Thresholds = Thresholds()
    cpus: int = 1

    @classmethod
    def of(
        cls,
        samples: Sequence[CpuSample],
        ticks: Sequence[tuple[float, float]],
        thresholds: Thresholds,
        cpus: int,
    ) -> Strain:
        stretches: list[Stretch] = []
        for a, b in itertools.pairwise(samples):
            total = b.total - a.total
            busy = (b.busy - a.busy) / total if total > 0 else None
            wait = None
            if a.waited_us is not None and b.waited_us is not None and b.at > a.at:
                wait = min(1.0, (b.waited_us - a.waited_us) / ((b.at - a.at) * 1e6))
            if (busy is not None and busy >= thresholds.busy) or (wait is not None and wait >= thresholds.cpu_wait):
                stretches.append(Stretch(a.at, b.at, busy=busy, cpu_wait=wait))
        for due, late in ticks:
            if late >= thresholds.tick_late:
                stretches.append(Stretch(due, due + late, late=late))
        stretches.sort(key=lambda s: s.start)
        return cls(tuple(stretches), tuple(samples), tuple(sorted(ticks)), thresholds, cpus)

    def met(self, invoked: float, completed: float) -> bool:
        """Whether a call in flight from ``invoked`` to ``completed`` met a saturated stretch
        (or began within ``pad`` after one)."""
        pad = self.thresholds.pad
        return any(s.start <= completed and invoked <= s.end + pad for s in self.stretches)

    def stalled(self, invoked: float, completed: float, late: float) -> bool:
        """Whether the drill's own loop ran a tick ``late`` seconds or more behind schedule
        while a call was in flight: it may not have read the answer in time."""
        return any(
            s.late is not None and s.late >= late and s.start <= completed and invoked <= s.end for s in self.stretches
        )

    def describe(self, start: float, end: float) -> str:
        """What saturated [start, end], in words: the host's worst half-second and the
        drill's worst tick."""
        inside = [s for s in self.stretches if s.start <= end and start <= s.end]
        host = [s for s in inside if s.late is None]
        stalls = [s for s in inside if s.late is not None]
        parts = []
        if host:
            seconds = sum(min(s.end, end) - max(s.start, start) for s in host)
            worst = max(host, key=lambda s: (s.busy or 0, s.cpu_wait or 0))
            figures = f"CPU {worst.busy:.0%} busy" if worst.busy is not None else "CPU"
            if worst.cpu_wait is not None:
                figures += f", tasks waiting for a CPU {worst.cpu_wait:.0%} of the time"
            parts.append(f"host saturated {seconds:.1f} s of {end - start:.1f} s ({figures}, {self.cpus} CPUs)")
        if stalls:
            worst_late = max(s.late or 0.0 for s in stalls)
            parts.append(f"the drill's load ran {len(stalls)} ticks late (up to {worst_late * 1000:.0f} ms)")
        return "; ".join(parts) if parts else "no saturation seen"

    def figures(self, start: float, end: float) -> dict[str, float | int | None]:
        """The host over [start, end], for the report."""
        host = host_figures(self.samples, start, end, self.cpus)
        lates = [late for due, late in self.ticks if start <= due < end]
        stalled = [late for late in lates if late >= self.thresholds.tick_late]
        saturated = sum(max(0.0, min(s.end, end) - max(s.start, start)) for s in self.stretches if s.late is None)
        return {
            "cpus": self.cpus,
            "busy": _r(host.busy),
            "cpu_wait": _r(host.cpu_wait),
            "runnable_per_cpu": _r(host.runnable),
            "saturated_seconds": round(saturated, 2),
            "ticks": len(lates),
            "ticks_late": len(stalled),
            "tick_late_max_ms": round(max(lates) * 1000, 1) if lates else None,
        }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
