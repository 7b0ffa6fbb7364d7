"""A drill's outcome: the figures per region and phase, the checks, and what broke; as a
table for people and JSON for machines."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from discovery.drill.analysis import Bounds, PhaseFigures, Verdict
from discovery.drill.history import PHASES, OpStats


@dataclass(frozen=True)
class Report:
    scenario: str
    target: str
    service: str
    hold: float
    baseline: float
    after: float
    heal_took: float | None
    regions: tuple[str, ...]
    judged: tuple[str, ...]  # regions whose availability and latency are guaranteed
    figures: Mapping[str, Mapping[str, PhaseFigures]]
    verdict: Verdict
    bounds: Bounds
    broken: list[str]
    events: list[tuple[float, str]]
    notes: Mapping[str, Any]
    skipped: Mapping[str, int]

    @property
    def passed(self) -> bool:
        return not self.broken

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "scenario": self.scenario,
            "target": self.target,
            "service": self.service,
            "passed": self.passed,
            "broken": self.broken,
            "seconds": {"baseline": self.baseline, "hold": self.hold, "after": self.after, "heal": _r(self.heal_took)},
            "regions": {
                name: {
                    "judged": name in self.judged,
                    "skipped_ticks": self.skipped.get(name, 0),
                    "flapped": v.flapped.get(name, 0),
                    **{phase: self.figures[name][phase].to_json() for phase in PHASES},
                }
                for name in self.regions
            },
            "convergence_seconds": _r(v.convergence_s),
            "registrations_acknowledged": v.acknowledged,
            "deletions_acknowledged": v.deleted,
            "indeterminate_writes": v.indeterminate,
            "lost": v.lost,
            "resurrected": v.resurrected,
            "unconverged": v.unconverged[:100],
            "bounds": {
                "min_success": self.bounds.min_success,
                "max_slowdown": self.bounds.max_slowdown,
                "slowdown_floor_ms": self.bounds.slowdown_floor_ms,
                "converge_within_seconds": self.bounds.converge_within,
            },
            "events": [{"t": round(t, 3), "event": what} for t, what in self.events],
            "fault": dict(self.notes),
        }

    def table(self) -> str:
        v = self.verdict
        lines = [
            f"drill {self.scenario} on {self.target}: baseline {self.baseline:g}s, fault held {self.hold:g}s, "
            f"after {self.after:g}s (service {self.service})",
            "",
        ]
        header = ["REGION", "PHASE", "WRITES OK", "P50/P99 MS", "RESOLVE OK", "P50/P99 MS", "LAG IN P50/P99 MS"]
        rows = []
        for name in self.regions:
            label = name + ("" if name in self.judged else " *")
            for phase in PHASES:
                fig = self.figures[name][phase]
                rows.append(
                    [
                        label if phase == PHASES[0] else "",
                        phase,
                        _success(fig.writes),
                        _latency(fig.writes.p50_ms, fig.writes.p99_ms),
                        _success(fig.resolve),
                        _latency(fig.resolve.p50_ms, fig.resolve.p99_ms),
                        _latency(fig.lag_p50_ms, fig.lag_p99_ms) + (f" ({fig.lag_count})" if fig.lag_count else ""),
                    ]
                )
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if len(self.judged) < len(self.regions):
            lines.append("* the faulted region: reported, not held to the availability bounds")
        lines.append("")
        convergence = "did not converge" if v.convergence_s is None else f"{v.convergence_s:.2f} s"
        lines += [
            f"convergence after the heal  {convergence} (bound {self.bounds.converge_within:g} s)",
            f"registrations acknowledged  {v.acknowledged}, deletions acknowledged {v.deleted}, "
            f"indeterminate writes {v.indeterminate}",
            f"lost                        {len(v.lost)}",
            f"resurrected                 {len(v.resurrected)}",
            "flapped out and back in     " + ", ".join(f"{r} {v.flapped.get(r, 0)}" for r in self.regions),
        ]
        skipped = {r: n for r, n in self.skipped.items() if n}
        if skipped:
            lines.append(
                "ticks skipped (too many calls in flight): " + ", ".join(f"{r} {n}" for r, n in skipped.items())
            )
        lines.append("")
        if self.passed:
            lines.append("PASSED: every guarantee held")
        else:
            lines.append("FAILED: a guarantee broke")
            lines += [f"  - {line}" for line in self.broken]
        return "\n".join(lines)


def _success(stats: OpStats) -> str:
    if stats.success is None:
        return "-"
    return f"{stats.success:.1%} of {stats.total}"


def _latency(p50: float | None, p99: float | None) -> str:
    if p50 is None or p99 is None:
        return "-"
    return f"{p50:.1f}/{p99:.1f}"


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


__all__ = ["Report", "Verdict"]
