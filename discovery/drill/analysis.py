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

from discovery.drill.history import AFTER, BEFORE, DURING, PHASES, History, Op, OpStats, Outcome, Timeline, percentile
from discovery.drill.load import LEASED, InstanceKey, Presence
from discovery.drill.saturation import Strain


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


# --- the judgement ----------------------------------------------------------------------------

PASSED, FAILED, INCONCLUSIVE = "passed", "failed", "inconclusive"
WRITES, RESOLVES = "writes", "resolves"
_KINDS: dict[str, tuple[str, ...]] = {WRITES: ("register", "deregister"), RESOLVES: ("resolve",)}

# A latency percentile is judged only where at least MIN_TAIL calls lie above it, in the
# baseline and in the phase alike (a p99 of 150 calls is the 2nd-worst call: one scheduling
# hiccup); under MIN_CALLS calls there is no tail to judge.
MIN_TAIL = 5
MIN_CALLS = 20


@dataclass(frozen=True)
class LatencyCheck:
    """One judged region's latency of one kind of call in one phase, against its baseline."""

    region: str
    kind: str  # writes or resolves
    phase: str
    outcome: str  # "ok", "slow" (a guarantee broke) or "inconclusive"
    reason: str = ""  # for slow and inconclusive, one readable line
    # Every acknowledged call of the phase, at the percentile the counts support, against the
    # baseline's calls that met no saturation at that percentile.
    percentile: int | None = None
    baseline_ms: float | None = None
    limit_ms: float | None = None
    value_ms: float | None = None
    # When that was past the limit: the phase's calls that met no saturation alone, at the
    # percentile their count supports (None: too few of them to judge).
    clean_percentile: int | None = None
    clean_baseline_ms: float | None = None
    clean_limit_ms: float | None = None
    clean_ms: float | None = None
    baseline_calls: int = 0  # baseline calls that met no saturation
    calls: int = 0  # acknowledged calls of the phase
    clean_calls: int = 0  # of those, the ones that met no saturation

    def to_json(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "kind": self.kind,
            "phase": self.phase,
            "outcome": self.outcome,
            "reason": self.reason,
            "percentile": self.percentile,
            "baseline_ms": _r(self.baseline_ms),
            "limit_ms": _r(self.limit_ms),
            "value_ms": _r(self.value_ms),
            "unsaturated": None
            if self.clean_percentile is None
            else {
                "percentile": self.clean_percentile,
                "baseline_ms": _r(self.clean_baseline_ms),
                "limit_ms": _r(self.clean_limit_ms),
                "value_ms": _r(self.clean_ms),
            },
            "baseline_calls_unsaturated": self.baseline_calls,
            "calls": self.calls,
            "calls_unsaturated": self.clean_calls,
        }


@dataclass
class Judgement:
    """What broke (a guarantee: the drill failed), what could not be judged (inconclusive:
    the machine was saturated, or too few calls), and every latency check."""

    broken: list[str] = field(default_factory=list)
    inconclusive: list[str] = field(default_factory=list)
    latency: list[LatencyCheck] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.broken:
            return FAILED
        return INCONCLUSIVE if self.inconclusive else PASSED


def judged_percentile(n: int) -> int | None:
    """The highest whole percentile of ``n`` calls with at least MIN_TAIL calls above it, at
    most 99 (66 calls: p92; 100: p95; 200: p97; 500 and more: p99); None under MIN_CALLS."""
    if n < MIN_CALLS:
        return None
    return min(99, (100 * n - 100 * MIN_TAIL) // n)


def _at(ordered: Sequence[float], q: int) -> float:
    """Nearest-rank percentile of sorted values, in whole numbers (no float rounding)."""
    rank = -(-q * len(ordered) // 100)  # ceil(q * n / 100)
    return ordered[max(0, min(len(ordered) - 1, rank - 1))]


def _limit_at(baseline_ms: float, bounds: Bounds) -> float:
    return max(baseline_ms * bounds.max_slowdown, baseline_ms + bounds.slowdown_floor_ms)


def judge(
    history: History,
    timeline: Timeline,
    judged: Sequence[str],
    v: Verdict,
    *,
    bounds: Bounds,
    healed: bool,
    strain: Strain | None = None,
    stall: float = 0.25,
) -> Judgement:
    """Every broken guarantee and every check that could not be judged, one readable line
    each. ``strain`` says when the machine or the drill was saturated (none: never);
    ``stall`` is how late (seconds) the drill's own ticks must run for a call it recorded as
    failed or timed out to be its own doing rather than the cluster's."""
    strain = strain or Strain()
    out = Judgement()
    for region in judged:
        for kind in (WRITES, RESOLVES):
            base = _ok_latencies(history, timeline, region, kind, BEFORE)
            for phase in (DURING, AFTER):
                ops = history.select(kind=_KINDS[kind], region=region, phase=phase, timeline=timeline)
                label = f"{region} {phase}: {kind}"
                _judge_success(out, label, ops, bounds=bounds, strain=strain, stall=stall)
                acked = [o for o in ops if o.outcome is Outcome.OK]
                check = latency_check(region, kind, phase, base, acked, bounds=bounds, strain=strain)
                if check is not None:
                    out.latency.append(check)
                    if check.outcome == "slow":
                        out.broken.append(check.reason)
                    elif check.outcome == INCONCLUSIVE and check.reason not in out.inconclusive:
                        out.inconclusive.append(check.reason)
    if v.lost:
        out.broken.append(f"{len(v.lost)} acknowledged registrations lost: {_some(v.lost)}")
    if v.resurrected:
        out.broken.append(f"{len(v.resurrected)} acknowledged deletions came back: {_some(v.resurrected)}")
    if healed:
        if v.convergence_s is None:
            out.broken.append(
                f"did not converge: {len(v.unconverged)} not in their final state: {_some(v.unconverged)}"
            )
        elif v.convergence_s > bounds.converge_within:
            out.broken.append(f"converged in {v.convergence_s:.2f} s, past the bound of {bounds.converge_within:g} s")
    return out


def _ok_latencies(history: History, timeline: Timeline, region: str, kind: str, phase: str) -> list[Op]:
    return [
        o
        for o in history.select(kind=_KINDS[kind], region=region, phase=phase, timeline=timeline)
        if o.outcome is Outcome.OK
    ]


def _judge_success(
    out: Judgement, label: str, ops: Sequence[Op], *, bounds: Bounds, strain: Strain, stall: float
) -> None:
    """Below --min-success is a broken guarantee, whatever the host's CPU; unless the calls
    not acknowledged were in flight while the drill itself stalled (its loop could not read
    their answers in time: the timeout is the drill's) and without them the share holds."""
    stats = OpStats.of(ops)
    if stats.success is None or stats.success >= bounds.min_success:
        return
    line = (
        f"{label} {stats.success:.1%} ok, below {bounds.min_success:.1%} "
        f"({stats.failed} failed, {stats.unknown} unknown)"
    )
    excused = [o for o in ops if o.outcome is not Outcome.OK and strain.stalled(o.invoked, o.completed, stall)]
    rest = stats.total - len(excused)
    if excused and (rest == 0 or stats.ok / rest >= bounds.min_success):
        start, end = min(o.invoked for o in excused), max(o.completed for o in excused)
        out.inconclusive.append(
            f"{line}, but {len(excused)} of them were in flight while the drill itself stalled "
            f"({strain.describe(start, end)}): its own timeouts, not the cluster's answer"
        )
    else:
        out.broken.append(line)


def latency_check(
    region: str,
    kind: str,
    phase: str,
    baseline: Sequence[Op],
    calls: Sequence[Op],
    *,
    bounds: Bounds,
    strain: Strain,
) -> LatencyCheck | None:
    """A phase's latency against the baseline's (acknowledged calls; None when the phase
    has none, its success is judged instead).

    The baseline is its calls that met no saturation. The judged percentile is the highest
    with MIN_TAIL calls above it in both. Every call of the phase within the limit: ok. Past
    it, the phase's calls that met no saturation decide: past the limit too, the region
    slowed on a machine with CPU to spare (slow: a broken guarantee); within it, or too few
    of them, the slowdown is the machine's as much as the cluster's (inconclusive)."""
    if not calls:
        return None
    label = f"{region} {phase}: {kind}"
    base_clean = sorted(o.latency * 1000 for o in baseline if not strain.met(o.invoked, o.completed))
    every = sorted(o.latency * 1000 for o in calls)
    clean = sorted(o.latency * 1000 for o in calls if not strain.met(o.invoked, o.completed))
    counts: dict[str, Any] = {"baseline_calls": len(base_clean), "calls": len(every), "clean_calls": len(clean)}
    if len(base_clean) < MIN_CALLS:  # one line per region and kind: the phases share the baseline
        label = f"{region}: {kind}"
        if len(baseline) < MIN_CALLS:
            why = (
                f"the baseline has {len(baseline)} acknowledged calls, too few to judge latency (at least {MIN_CALLS})"
            )
        else:
            start, end = min(o.invoked for o in baseline), max(o.completed for o in baseline)
            why = (
                f"only {len(base_clean)} of the baseline's {len(baseline)} calls met an unsaturated machine "
                f"({strain.describe(start, end)})"
            )
        return LatencyCheck(region, kind, phase, INCONCLUSIVE, f"{label} latency not judged: {why}", **counts)
    q = judged_percentile(min(len(base_clean), len(every)))
    if q is None:
        why = f"{len(every)} acknowledged calls, too few to judge latency (at least {MIN_CALLS})"
        return LatencyCheck(region, kind, phase, INCONCLUSIVE, f"{label} latency not judged: {why}", **counts)
    base = _at(base_clean, q)
    limit = _limit_at(base, bounds)
    value = _at(every, q)
    figures: dict[str, Any] = {"percentile": q, "baseline_ms": base, "limit_ms": limit, "value_ms": value, **counts}
    if value <= limit:
        return LatencyCheck(region, kind, phase, "ok", **figures)
    rule = f"baseline p{q} {base:.1f} ms x {bounds.max_slowdown:g}, at least +{bounds.slowdown_floor_ms:g}"
    start, end = min(o.invoked for o in calls), max(o.completed for o in calls)
    q2 = judged_percentile(min(len(base_clean), len(clean)))
    if q2 is None:
        reason = (
            f"{label} p{q} {value:.1f} ms, past {limit:.1f} ms ({rule}), but only {len(clean)} of its "
            f"{len(every)} calls met an unsaturated machine ({strain.describe(start, end)})"
        )
        return LatencyCheck(region, kind, phase, INCONCLUSIVE, reason, **figures)
    base2 = _at(base_clean, q2)
    limit2 = _limit_at(base2, bounds)
    value2 = _at(clean, q2)
    figures.update(clean_percentile=q2, clean_baseline_ms=base2, clean_limit_ms=limit2, clean_ms=value2)
    if value2 > limit2:
        saturated = len(every) - len(clean)
        reason = (
            f"{label} p{q2} {value2:.1f} ms, past {limit2:.1f} ms "
            f"(baseline p{q2} {base2:.1f} ms x {bounds.max_slowdown:g}, at least +{bounds.slowdown_floor_ms:g}), "
            f"on an unsaturated machine ({len(clean)} calls"
            + (f"; {saturated} more met saturation and are left out" if saturated else "")
            + ")"
        )
        return LatencyCheck(region, kind, phase, "slow", reason, **figures)
    reason = (
        f"{label} p{q} {value:.1f} ms, past {limit:.1f} ms ({rule}), only among calls that met a "
        f"saturated machine: the {len(clean)} that did not have p{q2} {value2:.1f} ms, within {limit2:.1f} "
        f"({strain.describe(start, end)})"
    )
    return LatencyCheck(region, kind, phase, INCONCLUSIVE, reason, **figures)


def _some(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
