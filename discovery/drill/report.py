"""A drill's outcome: the figures per region and phase, the checks, and what broke; as a
table for people and JSON for machines."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from discovery.drill.analysis import FAILED, INCONCLUSIVE, PASSED, Bounds, LatencyCheck, PhaseFigures, Verdict
from discovery.drill.history import PHASES, OpStats
from discovery.drill.saturation import Thresholds


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
    broken: list[str]  # guarantees that broke: the drill failed
    events: list[tuple[float, str]]
    notes: Mapping[str, Any]
    skipped: Mapping[str, int]
    inconclusive: list[str] = field(default_factory=list)  # what could not be judged, and why
    latency: tuple[LatencyCheck, ...] = ()
    host: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per phase: the machine's CPU
    saturation: Thresholds = field(default_factory=Thresholds)

    @property
    def outcome(self) -> str:
        """The verdict: failed: a guarantee broke; inconclusive: none broke, but something could not be
        judged (the machine was saturated, too few calls); passed: every check held."""
        if self.broken:
            return FAILED
        return INCONCLUSIVE if self.inconclusive else PASSED

    @property
    def passed(self) -> bool:
        return self.outcome == PASSED

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "scenario": self.scenario,
            "target": self.target,
            "service": self.service,
            "verdict": self.outcome,
            "passed": self.passed,
            "broken": self.broken,
            "inconclusive": self.inconclusive,
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
            "latency": [check.to_json() for check in self.latency],
            "host": {phase: dict(figures) for phase, figures in self.host.items()},
            "saturated_when": {
                "busy": self.saturation.busy,
                "cpu_wait": self.saturation.cpu_wait,
                "tick_late_ms": self.saturation.tick_late * 1000,
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
        lines += self._latency_lines()
        lines += self._host_lines()
        lines.append("")
        if self.outcome == PASSED:
            lines.append("PASSED: every guarantee held")
        elif self.outcome == FAILED:
            lines.append("FAILED: a guarantee broke")
            lines += [f"  - {line}" for line in self.broken]
        else:
            lines.append("INCONCLUSIVE: no guarantee broke, but not everything could be judged")
        if self.inconclusive:
            if self.outcome == FAILED:
                lines.append("not judged:")
            lines += [f"  ? {line}" for line in self.inconclusive]
        return "\n".join(lines)

    def _latency_lines(self) -> list[str]:
        """Per judged region and kind: the percentile judged, the baseline and the limit, and
        each phase's figure (the calls that met no saturation, when that decided)."""
        rows: dict[tuple[str, str], list[LatencyCheck]] = {}
        for check in self.latency:
            rows.setdefault((check.region, check.kind), []).append(check)
        if not rows:
            return []
        lines = [
            "",
            "latency (judged percentile: at least 5 calls above it; baseline of calls on an unsaturated machine)",
        ]
        for (region, kind), checks in rows.items():
            parts = []
            for c in checks:
                if c.percentile is None or c.limit_ms is None or c.value_ms is None:
                    parts.append(f"{c.phase} not judged")
                    continue
                mark = {"ok": "ok", "slow": "SLOW", INCONCLUSIVE: "inconclusive"}[c.outcome]
                text = f"{c.phase} p{c.percentile} {c.value_ms:.1f} ms of limit {c.limit_ms:.1f}"
                text += f" (baseline {c.baseline_ms:.1f})"
                if c.clean_percentile is not None and c.clean_ms is not None and c.clean_limit_ms is not None:
                    text += f", unsaturated p{c.clean_percentile} {c.clean_ms:.1f} of {c.clean_limit_ms:.1f}"
                elif c.outcome != "ok":
                    text += f", {c.clean_calls} calls unsaturated"
                parts.append(f"{text} {mark}")
            lines.append(f"  {region} {kind}: " + "; ".join(parts))
        return lines

    def _host_lines(self) -> list[str]:
        if not self.host:
            return []
        parts = []
        for phase, h in self.host.items():
            busy = "-" if h.get("busy") is None else f"{h['busy']:.0%}"
            wait = "" if h.get("cpu_wait") is None else f", waiting {h['cpu_wait']:.0%}"
            late = h.get("ticks_late") or 0
            parts.append(
                f"{phase} CPU {busy} busy{wait}, saturated {h.get('saturated_seconds', 0):.1f} s"
                + (f", {late} ticks late" if late else "")
            )
        cpus = next(iter(self.host.values())).get("cpus")
        return [f"machine ({cpus} CPUs)          " + "; ".join(parts)]


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
