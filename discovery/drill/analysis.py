"""From the history and every region's observed view to the figures and the verdict.

The checks rely on acknowledged outcomes only:
- lost: registered (ok) and never picked for deregistration, yet absent from a region's
  final view;
- resurrected: deregistered (ok), yet present in a region's final view, or seen coming back
  after it had gone;
- flapped: an instance no call removed that a region saw leave and come back;
- convergence: after the heal, how long until every region held every change acknowledged
  before the heal (its last transition to the expected state).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from discovery.drill.history import AFTER, BEFORE, DURING, PHASES, History, OpStats, Outcome, Timeline, percentile
from discovery.drill.load import LEASED, Presence
from discovery_client.model import InstanceKey


@dataclass(frozen=True)
class Bounds:
    """What counts as a broken guarantee."""

    min_success: float = 0.99  # a judged region's share of ok registrations and resolves
    max_slowdown: float = 3.0  # a judged region's p99 during/after, against its baseline p99...
    slowdown_floor_ms: float = 25.0  # ...unless within this many ms of it (tiny baselines are noise)
    # Seconds after the heal. Deletions from a region that fell silent are held up to the
    # servers' --resume-grace (10 s) by design, so the default leaves 5 s over that.
    converge_within: float = 15.0

    def validate(self) -> None:
        if not 0 <= self.min_success <= 1:
            raise ValueError("--min-success: from 0 to 1")
        if self.max_slowdown < 1 or self.slowdown_floor_ms < 0 or self.converge_within <= 0:
            raise ValueError("--max-slowdown >= 1, --slowdown-floor-ms >= 0, --converge-within > 0")


@dataclass(frozen=True)
class PhaseFigures:
    writes: OpStats  # registrations and deregistrations
    resolve: OpStats
    lag_p50_ms: float | None  # acknowledged elsewhere -> in this region's view
    lag_p99_ms: float | None
    lag_count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "writes": self.writes.to_json(),
            "resolve": self.resolve.to_json(),
            "replication_lag_ms": {"p50": _r(self.lag_p50_ms), "p99": _r(self.lag_p99_ms), "changes": self.lag_count},
        }


@dataclass
class Verdict:
    acknowledged: int = 0  # registrations acknowledged
    deleted: int = 0  # deregistrations acknowledged
    indeterminate: int = 0  # writes that failed or timed out: either outcome is allowed
    lost: list[str] = field(default_factory=list)  # "region: origin/id"
    resurrected: list[str] = field(default_factory=list)
    flapped: dict[str, int] = field(default_factory=dict)
    convergence_s: float | None = None  # None: did not converge
    unconverged: list[str] = field(default_factory=list)


def expected_state(history: History) -> tuple[dict[InstanceKey, bool], dict[InstanceKey, float], int, int, int]:
    """Per churn instance whose fate is known: present at the end?, and when that was
    acknowledged; plus counts of acknowledged registrations, deletions and unknown writes."""
    fate: dict[InstanceKey, bool] = {}
    acked_at: dict[InstanceKey, float] = {}
    undecided: set[InstanceKey] = set()
    registered = deleted = 0
    for op in history.ops:
        if op.kind not in ("register", "deregister"):
            continue
        key = (op.region, op.key)
        if op.outcome is not Outcome.OK:  # failed, timed out, or still unanswered at the end
            undecided.add(key)
        elif op.kind == "register":
            registered += 1
            fate[key], acked_at[key] = True, op.completed
        else:
            deleted += 1
            fate[key], acked_at[key] = False, op.completed
    for key in undecided:
        fate.pop(key, None)
        acked_at.pop(key, None)
    return fate, acked_at, registered, deleted, len(undecided)


def phase_figures(
    history: History, presences: Mapping[str, Presence], timeline: Timeline
) -> dict[str, dict[str, PhaseFigures]]:
    """Per region, per phase: call figures and the lag of registrations acknowledged in
    other regions until this region's view showed them (phase of the acknowledgement)."""
    registered = [o for o in history.ops if o.kind == "register" and o.outcome is Outcome.OK]
    out: dict[str, dict[str, PhaseFigures]] = {}
    for region, presence in presences.items():
        lags: dict[str, list[float]] = {p: [] for p in PHASES}
        for op in registered:
            if op.region == region:
                continue
            seen = presence.changes.get((op.region, op.key))
            if seen and seen[0][1]:
                lags[timeline.phase(op.completed)].append(max(0.0, seen[0][0] - op.completed) * 1000)
        out[region] = {
            phase: PhaseFigures(
                OpStats.of(
                    history.select(kind=("register", "deregister"), region=region, phase=phase, timeline=timeline)
                ),
                OpStats.of(history.select(kind="resolve", region=region, phase=phase, timeline=timeline)),
                percentile(lags[phase], 50),
                percentile(lags[phase], 99),
                len(lags[phase]),
            )
            for phase in PHASES
        }
    return out


def verdict(
    history: History,
    presences: Mapping[str, Presence],
    finals: Mapping[str, frozenset[InstanceKey]],
    heal_at: float | None,
) -> Verdict:
    """Lost, resurrected, flapped and convergence. ``finals`` is each region's view read
    after the load stopped (a Resolve on its servers), the authority for lost/resurrected."""
    fate, acked_at, registered, deleted, undecided = expected_state(history)
    v = Verdict(acknowledged=registered, deleted=deleted, indeterminate=undecided)
    latest = 0.0
    for region, presence in presences.items():
        final = finals[region]
        for key, present in sorted(fate.items()):
            changes = presence.changes.get(key, [])
            label = f"{region}: {key[0]}/{key[1]}"
            if present and key not in final:
                v.lost.append(label)
            elif not present and (key in final or _came_back(changes, after=acked_at[key])):
                v.resurrected.append(label)
            if heal_at is not None and acked_at[key] < heal_at:
                reached = _reached(changes, present)
                if reached is None:
                    v.unconverged.append(label)
                else:
                    latest = max(latest, reached - heal_at)
        v.flapped[region] = sum(_flapped(key, changes, fate, acked_at) for key, changes in presence.changes.items())
    if heal_at is not None and not v.unconverged:
        v.convergence_s = max(0.0, latest)
    return v


def _flapped(
    key: InstanceKey,
    changes: Sequence[tuple[float, bool]],
    fate: Mapping[InstanceKey, bool],
    acked: Mapping[InstanceKey, float],
) -> bool:
    """Left and came back with no call of ours in between. For an instance the drill deleted,
    a return before the deletion was a flap (one after it, a resurrection); an instance whose
    fate is unknown is neither."""
    if key[1].startswith(LEASED) or fate.get(key) is True:
        return _came_back(changes)
    if key in fate:
        return any(not a[1] and b[1] and b[0] <= acked[key] for a, b in itertools.pairwise(changes))
    return False


def _reached(changes: Sequence[tuple[float, bool]], present: bool) -> float | None:
    """When the view last moved to ``present`` and stayed; None if it is not there now."""
    current = changes[-1][1] if changes else False
    if current != present:
        return None
    return changes[-1][0] if changes else 0.0


def _came_back(changes: Sequence[tuple[float, bool]], after: float = float("-inf")) -> bool:
    """Whether the instance went and then appeared again, the appearance after ``after``."""
    return any(not a[1] and b[1] and b[0] > after for a, b in itertools.pairwise(changes))


def judge(
    figures: Mapping[str, Mapping[str, PhaseFigures]],
    judged: Sequence[str],
    v: Verdict,
    bounds: Bounds,
    healed: bool,
) -> list[str]:
    """Every broken guarantee, one readable line each; empty when the drill passed."""
    broken: list[str] = []
    for region in judged:
        base = figures[region][BEFORE]
        for phase in (DURING, AFTER):
            fig = figures[region][phase]
            for kind, stats, before in (
                ("writes", fig.writes, base.writes),
                ("resolves", fig.resolve, base.resolve),
            ):
                if stats.success is not None and stats.success < bounds.min_success:
                    broken.append(
                        f"{region} {phase}: {kind} {stats.success:.1%} ok, below {bounds.min_success:.1%} "
                        f"({stats.failed} failed, {stats.unknown} unknown)"
                    )
                limit = _limit(before.p99_ms, bounds)
                if stats.p99_ms is not None and limit is not None and stats.p99_ms > limit:
                    broken.append(
                        f"{region} {phase}: {kind} p99 {stats.p99_ms:.1f} ms, past {limit:.1f} ms "
                        f"(baseline {before.p99_ms:.1f} ms x {bounds.max_slowdown:g}, "
                        f"at least +{bounds.slowdown_floor_ms:g})"
                    )
    if v.lost:
        broken.append(f"{len(v.lost)} acknowledged registrations lost: {_some(v.lost)}")
    if v.resurrected:
        broken.append(f"{len(v.resurrected)} acknowledged deletions came back: {_some(v.resurrected)}")
    if healed:
        if v.convergence_s is None:
            broken.append(f"did not converge: {len(v.unconverged)} not in their final state: {_some(v.unconverged)}")
        elif v.convergence_s > bounds.converge_within:
            broken.append(f"converged in {v.convergence_s:.2f} s, past the bound of {bounds.converge_within:g} s")
    return broken


def _limit(baseline_ms: float | None, bounds: Bounds) -> float | None:
    if baseline_ms is None:
        return None
    return max(baseline_ms * bounds.max_slowdown, baseline_ms + bounds.slowdown_floor_ms)


def _some(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
