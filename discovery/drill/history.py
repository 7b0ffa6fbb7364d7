"""Every operation a drill makes, Jepsen-style: invoked, then ok, failed or unknown.

A timeout is *unknown*, not failed: the write may have happened. Only ``ok`` outcomes are
facts the checks rely on; a write that failed or is unknown may be present or absent at the
end, and neither counts against the cluster.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

BEFORE, DURING, AFTER = "before", "during", "after"
PHASES = (BEFORE, DURING, AFTER)


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(slots=True)
class Op:
    """One call: ``kind`` is register, deregister or resolve; ``key`` the instance id."""

    kind: str
    region: str
    key: str
    invoked: float
    completed: float = 0.0
    outcome: Outcome | None = None
    error: str = ""
    served_by: str = ""  # region of the server that answered

    @property
    def latency(self) -> float:
        return self.completed - self.invoked


@dataclass
class Timeline:
    """When the fault went in and came out (monotonic seconds); phases are cut by invocation."""

    started: float = field(default_factory=time.monotonic)
    fault_at: float | None = None
    heal_at: float | None = None
    ended: float | None = None

    def phase(self, t: float) -> str:
        if self.fault_at is None or t < self.fault_at:
            return BEFORE
        if self.heal_at is None or t < self.heal_at:
            return DURING
        return AFTER

    def of(self, op: Op) -> str:
        """The phase of a call: when it was made, except that a call made before the fault
        and answered after it went in belongs to the fault (it met it), so a baseline never
        holds the fault's slow calls."""
        phase = self.phase(op.invoked)
        if phase == BEFORE and op.completed and self.phase(op.completed) != BEFORE:
            return DURING
        return phase

    def now(self) -> float:
        return time.monotonic() - self.started


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)

    def invoke(self, kind: str, region: str, key: str = "") -> Op:
        op = Op(kind, region, key, time.monotonic())
        self.ops.append(op)
        return op

    @staticmethod
    def complete(op: Op, outcome: Outcome, error: str = "", served_by: str = "") -> None:
        op.completed = time.monotonic()
        op.outcome, op.error, op.served_by = outcome, error, served_by

    def select(
        self, *, kind: str | tuple[str, ...], region: str, phase: str | None = None, timeline: Timeline | None = None
    ) -> list[Op]:
        """Completed ops of these kinds and region, in one phase when asked (see ``Timeline.of``)."""
        kinds = (kind,) if isinstance(kind, str) else kind
        out = [o for o in self.ops if o.kind in kinds and o.region == region and o.outcome is not None]
        if phase is not None:
            assert timeline is not None
            out = [o for o in out if timeline.of(o) == phase]
        return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class OpStats:
    """Counts, success rate and latency of ok calls (milliseconds)."""

    ok: int
    failed: int
    unknown: int
    p50_ms: float | None
    p99_ms: float | None
    errors: tuple[tuple[str, int], ...] = ()  # the most common error texts

    @property
    def total(self) -> int:
        return self.ok + self.failed + self.unknown

    @property
    def success(self) -> float | None:
        return self.ok / self.total if self.total else None

    @classmethod
    def of(cls, ops: Iterable[Op]) -> OpStats:
        ops = list(ops)
        latencies = [o.latency * 1000 for o in ops if o.outcome is Outcome.OK]
        counts: dict[str, int] = {}
        for o in ops:
            if o.outcome is not Outcome.OK:
                counts[o.error] = counts.get(o.error, 0) + 1
        common = tuple(sorted(counts.items(), key=lambda kv: -kv[1])[:3])
        return cls(
            ok=len(latencies),
            failed=sum(o.outcome is Outcome.FAILED for o in ops),
            unknown=sum(o.outcome is Outcome.UNKNOWN for o in ops),
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            errors=common,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "unknown": self.unknown,
            "success": self.success,
            "p50_ms": _round(self.p50_ms),
            "p99_ms": _round(self.p99_ms),
            "errors": [{"error": e, "count": n} for e, n in self.errors],
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)
