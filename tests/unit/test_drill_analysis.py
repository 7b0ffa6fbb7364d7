"""The drill's history, figures, verdict and report, from hand-made operations and views."""

from __future__ import annotations

import json

import pytest

from discovery.drill.analysis import (
    Bounds,
    Judgement,
    LatencyCheck,
    Verdict,
    expected_state,
    judge,
    phase_figures,
    verdict,
)
from discovery.drill.history import AFTER, BEFORE, DURING, History, Op, OpStats, Outcome, Timeline, percentile
from discovery.drill.load import Presence
from discovery.drill.report import Report

OK, FAILED, UNKNOWN = Outcome.OK, Outcome.FAILED, Outcome.UNKNOWN


def op(
    kind: str,
    region: str,
    key: str = "",
    *,
    invoked: float = 0.0,
    completed: float | None = None,
    outcome: Outcome | None = OK,
    error: str = "",
) -> Op:
    """A completed call (``outcome`` None: never answered); latency 0.01 s unless told."""
    done = invoked + 0.01 if completed is None else completed
    return Op(kind, region, key, invoked, done if outcome is not None else 0.0, outcome, error)


def history(*ops: Op) -> History:
    return History(list(ops))


def presence(region: str, changes: dict[tuple[str, str], list[tuple[float, bool]]]) -> Presence:
    p = Presence(region)
    p.changes = changes
    p.current = frozenset(k for k, c in changes.items() if c and c[-1][1])
    return p


def timeline(fault_at: float | None = 10.0, heal_at: float | None = 20.0) -> Timeline:
    return Timeline(started=0.0, fault_at=fault_at, heal_at=heal_at)


A, B = "a", "b"
K1, K2 = (A, "churn-1"), (A, "churn-2")


# --- history ----------------------------------------------------------------------------------


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 50) is None


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100..1, unsorted on purpose
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 51) == 3.0


def test_percentile_at_the_edges_stays_in_range() -> None:
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
    assert percentile([7.0], 99) == 7.0


def test_op_stats_counts_each_outcome() -> None:
    s = OpStats.of(
        [
            op("register", A, invoked=0, outcome=OK),
            op("register", A, invoked=0, outcome=OK),
            op("register", A, invoked=0, outcome=FAILED, error="UNAVAILABLE"),
            op("register", A, invoked=0, outcome=UNKNOWN, error="timeout"),
        ]
    )
    assert (s.ok, s.failed, s.unknown, s.total) == (2, 1, 1, 4)
    assert s.success == 0.5


def test_op_stats_of_nothing_has_no_success_rate_or_latency() -> None:
    s = OpStats.of([])
    assert s.total == 0
    assert s.success is None
    assert s.p50_ms is None and s.p99_ms is None
    assert s.errors == ()


def test_op_stats_latency_is_only_of_ok_calls_in_ms() -> None:
    s = OpStats.of(
        [
            op("resolve", A, invoked=1.0, completed=1.002),
            op("resolve", A, invoked=1.0, completed=1.004),
            op("resolve", A, invoked=1.0, completed=2.0, outcome=UNKNOWN, error="timeout"),
            op("resolve", A, invoked=1.0, completed=1.9, outcome=FAILED, error="UNAVAILABLE"),
        ]
    )
    assert s.p50_ms == pytest.approx(2.0)
    assert s.p99_ms == pytest.approx(4.0)


def test_op_stats_keeps_the_three_most_common_errors_most_common_first() -> None:
    errors = ["timeout"] * 3 + ["UNAVAILABLE"] * 5 + ["NOT_FOUND"] * 2 + ["INVALID_ARGUMENT"]
    ops = [op("register", A, outcome=UNKNOWN if e == "timeout" else FAILED, error=e) for e in errors]
    ops.append(op("register", A))
    assert OpStats.of(ops).errors == (("UNAVAILABLE", 5), ("timeout", 3), ("NOT_FOUND", 2))


def test_op_stats_to_json_rounds_and_lists_errors() -> None:
    s = OpStats.of([op("resolve", A, invoked=0, completed=0.0012346), op("resolve", A, outcome=FAILED, error="x")])
    out = s.to_json()
    assert out["ok"] == 1 and out["failed"] == 1 and out["unknown"] == 0 and out["success"] == 0.5
    assert out["p50_ms"] == out["p99_ms"] == 1.235
    assert out["errors"] == [{"error": "x", "count": 1}]


def test_timeline_phases_are_cut_at_fault_and_heal() -> None:
    t = timeline(fault_at=10.0, heal_at=20.0)
    assert t.phase(9.999) == BEFORE
    assert t.phase(10.0) == DURING
    assert t.phase(19.999) == DURING
    assert t.phase(20.0) == AFTER
    assert t.phase(100.0) == AFTER


def test_timeline_before_the_fault_everything_is_baseline() -> None:
    t = timeline(fault_at=None, heal_at=None)
    assert t.phase(1e9) == BEFORE


def test_timeline_while_the_fault_is_held_later_calls_are_during() -> None:
    t = timeline(fault_at=10.0, heal_at=None)
    assert t.phase(1e9) == DURING


def test_history_select_keeps_completed_ops_of_one_kind_region_and_phase() -> None:
    h = history(
        op("register", A, "churn-0", invoked=5.0),
        op("register", A, "churn-1", invoked=15.0),
        op("register", A, "churn-2", invoked=15.0, outcome=None),  # still in flight
        op("register", B, "churn-0", invoked=15.0),
        op("resolve", A, invoked=15.0),
    )
    during = h.select(kind="register", region=A, phase=DURING, timeline=timeline())
    assert [o.key for o in during] == ["churn-1"]
    assert [o.key for o in h.select(kind="register", region=A)] == ["churn-0", "churn-1"]


# --- expected_state ---------------------------------------------------------------------------


def test_an_acknowledged_registration_is_expected_present() -> None:
    fate, acked_at, registered, deleted, undecided = expected_state(
        history(op("register", A, "churn-1", invoked=1.0, completed=1.5))
    )
    assert fate == {K1: True}
    assert acked_at == {K1: 1.5}
    assert (registered, deleted, undecided) == (1, 0, 0)


def test_registration_then_deregistration_both_acknowledged_is_expected_absent() -> None:
    fate, acked_at, registered, deleted, undecided = expected_state(
        history(
            op("register", A, "churn-1", invoked=1.0, completed=1.5),
            op("deregister", A, "churn-1", invoked=2.0, completed=2.5),
        )
    )
    assert fate == {K1: False}
    assert acked_at == {K1: 2.5}
    assert (registered, deleted, undecided) == (1, 1, 0)


@pytest.mark.parametrize("outcome", [FAILED, UNKNOWN, None], ids=["failed", "unknown", "never-completed"])
def test_a_registration_not_acknowledged_is_indeterminate(outcome: Outcome | None) -> None:
    fate, acked_at, registered, _, undecided = expected_state(
        history(op("register", A, "churn-1", outcome=outcome), op("register", A, "churn-2"))
    )
    assert fate == {K2: True}
    assert K1 not in acked_at
    assert registered == 1
    assert undecided == 1


@pytest.mark.parametrize("outcome", [FAILED, UNKNOWN, None], ids=["failed", "unknown", "never-completed"])
def test_a_deregistration_not_acknowledged_makes_the_instance_indeterminate(outcome: Outcome | None) -> None:
    fate, acked_at, registered, deleted, undecided = expected_state(
        history(op("register", A, "churn-1", invoked=1.0), op("deregister", A, "churn-1", invoked=2.0, outcome=outcome))
    )
    assert fate == {}
    assert acked_at == {}
    assert (registered, deleted, undecided) == (1, 0, 1)


def test_resolves_are_not_writes() -> None:
    fate, _, registered, deleted, undecided = expected_state(history(op("resolve", A, outcome=UNKNOWN)))
    assert fate == {} and (registered, deleted, undecided) == (0, 0, 0)


def test_the_same_instance_id_in_two_regions_is_two_instances() -> None:
    fate, *_ = expected_state(history(op("register", A, "churn-1"), op("register", B, "churn-1", outcome=FAILED)))
    assert fate == {K1: True}


# --- verdict: lost and resurrected ------------------------------------------------------------


def test_an_acknowledged_registration_missing_from_a_final_view_is_lost() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0))
    presences = {A: presence(A, {K1: [(1.1, True)]}), B: presence(B, {})}
    v = verdict(h, presences, {A: frozenset({K1}), B: frozenset()}, heal_at=None)
    assert v.lost == ["b: a/churn-1"]
    assert v.resurrected == []


def test_the_final_view_not_the_observer_decides_lost() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0))
    presences = {A: presence(A, {K1: [(1.1, True)]}), B: presence(B, {K1: [(1.2, True)]})}
    v = verdict(h, presences, {A: frozenset({K1}), B: frozenset()}, heal_at=None)
    assert v.lost == ["b: a/churn-1"]


def test_an_acknowledged_registration_present_everywhere_is_not_lost() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0))
    presences = {A: presence(A, {K1: [(1.1, True)]}), B: presence(B, {K1: [(1.2, True)]})}
    v = verdict(h, presences, {A: frozenset({K1}), B: frozenset({K1})}, heal_at=None)
    assert v.lost == [] and v.resurrected == []
    assert v.acknowledged == 1 and v.deleted == 0 and v.indeterminate == 0


def test_an_acknowledged_deletion_present_in_a_final_view_is_resurrected() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0), op("deregister", A, "churn-1", invoked=2.0))
    changes = {K1: [(1.1, True), (2.1, False)]}
    presences = {A: presence(A, changes), B: presence(B, changes)}
    v = verdict(h, presences, {A: frozenset(), B: frozenset({K1})}, heal_at=None)
    assert v.resurrected == ["b: a/churn-1"]
    assert v.lost == []


def test_an_acknowledged_deletion_seen_coming_back_is_resurrected_even_if_gone_at_the_end() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0), op("deregister", A, "churn-1", invoked=2.0))
    presences = {
        A: presence(A, {K1: [(1.1, True), (2.1, False)]}),
        B: presence(B, {K1: [(1.2, True), (2.2, False), (5.0, True), (6.0, False)]}),
    }
    v = verdict(h, presences, {A: frozenset(), B: frozenset()}, heal_at=None)
    assert v.resurrected == ["b: a/churn-1"]


def test_a_flap_before_the_deletion_was_acknowledged_is_not_a_resurrection() -> None:
    h = history(
        op("register", A, "churn-1", invoked=1.0, completed=1.05),
        op("deregister", A, "churn-1", invoked=8.0, completed=8.05),
    )
    # b saw it leave and come back at 3..4 (while it still existed), then go for good at 9.
    flapped_early = {K1: [(1.2, True), (3.0, False), (4.0, True), (9.0, False)]}
    presences = {A: presence(A, {K1: [(1.1, True), (8.1, False)]}), B: presence(B, flapped_early)}
    v = verdict(h, presences, {A: frozenset(), B: frozenset()}, heal_at=None)
    assert v.resurrected == []


@pytest.mark.parametrize("outcome", [FAILED, UNKNOWN, None], ids=["failed", "unknown", "never-completed"])
def test_an_indeterminate_registration_is_never_lost(outcome: Outcome | None) -> None:
    h = history(op("register", A, "churn-1", outcome=outcome))
    presences = {A: presence(A, {}), B: presence(B, {})}
    v = verdict(h, presences, {A: frozenset(), B: frozenset()}, heal_at=15.0)
    assert v.lost == [] and v.unconverged == []
    assert v.indeterminate == 1


@pytest.mark.parametrize("outcome", [FAILED, UNKNOWN, None], ids=["failed", "unknown", "never-completed"])
def test_an_indeterminate_deletion_is_never_resurrected(outcome: Outcome | None) -> None:
    h = history(op("register", A, "churn-1", invoked=1.0), op("deregister", A, "churn-1", invoked=2.0, outcome=outcome))
    back = {K1: [(1.1, True), (2.1, False), (3.0, True)]}
    presences = {A: presence(A, back), B: presence(B, back)}
    v = verdict(h, presences, {A: frozenset({K1}), B: frozenset({K1})}, heal_at=15.0)
    assert v.resurrected == [] and v.lost == [] and v.unconverged == []
    assert v.indeterminate == 1


# --- verdict: flapped -------------------------------------------------------------------------


def test_a_leased_instance_that_left_and_came_back_flapped() -> None:
    leased = (B, "leased-0")
    presences = {A: presence(A, {leased: [(1.0, True), (5.0, False), (9.0, True)]}), B: presence(B, {})}
    v = verdict(history(), presences, {A: frozenset({leased}), B: frozenset()}, heal_at=None)
    assert v.flapped == {A: 1, B: 0}


def test_an_expected_present_churn_instance_that_left_and_came_back_flapped() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0))
    presences = {A: presence(A, {K1: [(1.1, True)]}), B: presence(B, {K1: [(1.2, True), (3.0, False), (4.0, True)]})}
    v = verdict(h, presences, {A: frozenset({K1}), B: frozenset({K1})}, heal_at=None)
    assert v.flapped == {A: 0, B: 1}
    assert v.lost == [] and v.resurrected == []


def test_leaving_once_is_not_a_flap() -> None:
    leased = (A, "leased-0")
    presences = {A: presence(A, {leased: [(1.0, True), (5.0, False)]}), B: presence(B, {})}
    v = verdict(history(), presences, {A: frozenset(), B: frozenset()}, heal_at=None)
    assert v.flapped == {A: 0, B: 0}


def test_indeterminate_churn_instances_do_not_flap() -> None:
    h = history(op("register", A, "churn-1", outcome=UNKNOWN))
    presences = {A: presence(A, {K1: [(1.0, True), (2.0, False), (3.0, True)]}), B: presence(B, {})}
    v = verdict(h, presences, {A: frozenset({K1}), B: frozenset()}, heal_at=None)
    assert v.flapped == {A: 0, B: 0}


# --- verdict: convergence ---------------------------------------------------------------------


def test_convergence_is_the_last_transition_to_the_expected_state_after_the_heal() -> None:
    h = history(
        op("register", A, "churn-1", invoked=12.0, completed=12.1),  # during the fault
        op("register", A, "churn-2", invoked=1.0, completed=1.1),
        op("deregister", A, "churn-2", invoked=13.0, completed=13.1),
    )
    presences = {
        A: presence(A, {K1: [(12.2, True)], K2: [(1.2, True), (13.2, False)]}),
        B: presence(B, {K1: [(23.5, True)], K2: [(1.3, True), (26.0, False)]}),
    }
    v = verdict(h, presences, {A: frozenset({K1}), B: frozenset({K1})}, heal_at=20.0)
    assert v.convergence_s == pytest.approx(6.0)
    assert v.unconverged == []


def test_convergence_is_zero_when_every_region_already_held_every_change() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0, completed=1.1))
    presences = {A: presence(A, {K1: [(1.2, True)]}), B: presence(B, {K1: [(1.3, True)]})}
    v = verdict(h, presences, {A: frozenset({K1}), B: frozenset({K1})}, heal_at=20.0)
    assert v.convergence_s == 0.0


def test_convergence_ignores_changes_acknowledged_after_the_heal() -> None:
    h = history(op("register", A, "churn-1", invoked=25.0, completed=25.1))
    presences = {A: presence(A, {K1: [(25.2, True)]}), B: presence(B, {K1: [(60.0, True)]})}
    v = verdict(h, presences, {A: frozenset({K1}), B: frozenset({K1})}, heal_at=20.0)
    assert v.convergence_s == 0.0


def test_an_acknowledged_deletion_never_seen_by_a_region_is_converged_there() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0), op("deregister", A, "churn-1", invoked=12.0))
    presences = {A: presence(A, {K1: [(1.1, True), (12.1, False)]}), B: presence(B, {})}
    v = verdict(h, presences, {A: frozenset(), B: frozenset()}, heal_at=20.0)
    assert v.convergence_s == 0.0
    assert v.unconverged == [] and v.resurrected == []


def test_a_region_not_in_the_expected_state_did_not_converge() -> None:
    h = history(op("register", A, "churn-1", invoked=12.0, completed=12.1))
    presences = {A: presence(A, {K1: [(12.2, True)]}), B: presence(B, {})}
    v = verdict(h, presences, {A: frozenset({K1}), B: frozenset({K1})}, heal_at=20.0)
    assert v.convergence_s is None
    assert v.unconverged == ["b: a/churn-1"]


def test_a_deletion_still_visible_did_not_converge() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0), op("deregister", A, "churn-1", invoked=12.0))
    presences = {A: presence(A, {K1: [(1.1, True), (12.1, False)]}), B: presence(B, {K1: [(1.2, True)]})}
    v = verdict(h, presences, {A: frozenset(), B: frozenset()}, heal_at=20.0)
    assert v.convergence_s is None
    assert v.unconverged == ["b: a/churn-1"]


def test_without_a_heal_there_is_no_convergence_figure() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0))
    presences = {A: presence(A, {K1: [(1.1, True)]}), B: presence(B, {})}
    v = verdict(h, presences, {A: frozenset({K1}), B: frozenset({K1})}, heal_at=None)
    assert v.convergence_s is None
    assert v.unconverged == []


# --- judge: availability, lost, resurrected, convergence (latency: test_drill_judgement.py) ----


def calls(region: str, start: float, n: int = 100, *, outcome: Outcome = OK, latency_ms: float = 10.0) -> list[Op]:
    """``n`` registrations and ``n`` resolves of a region from ``start``, 0.05 s apart."""
    out = []
    for i in range(n):
        t = start + i * 0.05
        done = t + latency_ms / 1000
        out.append(Op("register", region, f"churn-{start:g}-{i}", t, done, outcome))
        out.append(Op("resolve", region, "", t, done, outcome))
    return out


def healthy(region: str = A) -> list[Op]:
    """A region's calls in every phase of ``timeline()``: all acknowledged in 10 ms."""
    return calls(region, 0.0) + calls(region, 10.0) + calls(region, 20.0)


def judged(h: History, v: Verdict | None = None, **bounds: float) -> Judgement:
    v = v or Verdict(convergence_s=1.0)
    return judge(h, timeline(), [A], v, bounds=Bounds(**bounds), healed=True)


def test_a_healthy_drill_breaks_nothing() -> None:
    j = judged(history(*healthy()))
    assert j.broken == [] and j.inconclusive == []
    assert j.verdict == "passed"


def test_success_below_the_bound_in_a_judged_region_is_broken() -> None:
    h = history(
        *calls(A, 0.0),
        *calls(A, 10.0, 98),
        *calls(A, 15.0, 1, outcome=FAILED),
        *calls(A, 16.0, 1, outcome=UNKNOWN),
        *calls(A, 20.0),
    )
    j = judged(h)
    assert len(j.broken) == 2  # writes and resolves
    assert j.broken[0].startswith("a during: writes 98.0% ok, below 99.0%")
    assert "(1 failed, 1 unknown)" in j.broken[0]
    assert j.verdict == "failed"


def test_success_at_the_bound_is_not_broken() -> None:
    h = history(*calls(A, 0.0), *calls(A, 10.0), *calls(A, 20.0, 99), *calls(A, 28.0, 1, outcome=FAILED))
    assert judged(h).broken == []


def test_a_phase_without_calls_is_not_judged() -> None:
    j = judged(history(*calls(A, 0.0), *calls(A, 20.0)))
    assert j.broken == [] and j.inconclusive == []
    assert {c.phase for c in j.latency} == {AFTER}


def test_regions_not_judged_are_ignored_for_availability_and_latency() -> None:
    bad = calls(B, 0.0, latency_ms=1.0) + calls(B, 10.0, outcome=FAILED) + calls(B, 20.0, latency_ms=5000.0)
    j = judged(history(*healthy(), *bad))
    assert j.broken == [] and j.inconclusive == []
    assert {c.region for c in j.latency} == {A}


def test_lost_and_resurrected_are_broken_whatever_region() -> None:
    v = Verdict(lost=["b: a/churn-1"], resurrected=["b: a/churn-2", "a: a/churn-2"], convergence_s=1.0)
    assert judged(history(*healthy()), v).broken == [
        "1 acknowledged registrations lost: b: a/churn-1",
        "2 acknowledged deletions came back: b: a/churn-2, a: a/churn-2",
    ]


def test_long_lists_are_cut_to_five() -> None:
    v = Verdict(lost=[f"b: a/churn-{i}" for i in range(8)], convergence_s=1.0)
    (line,) = judged(history(*healthy()), v).broken
    assert line.startswith("8 acknowledged registrations lost:")
    assert line.endswith("b: a/churn-4 and 3 more")


def test_not_converged_is_broken() -> None:
    v = Verdict(convergence_s=None, unconverged=["b: a/churn-1"])
    assert judged(history(*healthy()), v).broken == ["did not converge: 1 not in their final state: b: a/churn-1"]


def test_convergence_past_the_bound_is_broken() -> None:
    assert judged(history(*healthy()), Verdict(convergence_s=15.0)).broken == []
    assert judged(history(*healthy()), Verdict(convergence_s=15.5)).broken == [
        "converged in 15.50 s, past the bound of 15 s"
    ]


def test_convergence_is_not_judged_without_a_heal() -> None:
    j = judge(history(*healthy()), timeline(), [A], Verdict(convergence_s=None), bounds=Bounds(), healed=False)
    assert j.broken == []


# --- phase_figures ----------------------------------------------------------------------------


def test_lag_is_from_the_acknowledgement_elsewhere_to_the_first_appearance_here() -> None:
    h = history(
        op("register", A, "churn-1", invoked=1.0, completed=1.1),
        op("register", A, "churn-2", invoked=2.0, completed=2.1),
    )
    presences = {
        A: presence(A, {K1: [(1.05, True)], K2: [(2.05, True)]}),
        B: presence(B, {K1: [(1.3, True), (3.0, False), (4.0, True)], K2: [(2.6, True)]}),
    }
    figs = phase_figures(h, presences, timeline())
    assert figs[B][BEFORE].lag_count == 2
    assert figs[B][BEFORE].lag_p50_ms == pytest.approx(200.0)
    assert figs[B][BEFORE].lag_p99_ms == pytest.approx(500.0)


def test_a_region_has_no_lag_for_its_own_registrations() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0, completed=1.1))
    figs = phase_figures(h, {A: presence(A, {K1: [(1.5, True)]}), B: presence(B, {})}, timeline())
    assert all(figs[A][p].lag_count == 0 and figs[A][p].lag_p50_ms is None for p in (BEFORE, DURING, AFTER))


def test_lag_is_attributed_to_the_phase_of_the_acknowledgement() -> None:
    # Invoked before the fault, acknowledged during it; seen in b after the heal.
    h = history(op("register", A, "churn-1", invoked=9.9, completed=10.5))
    figs = phase_figures(h, {A: presence(A, {}), B: presence(B, {K1: [(21.5, True)]})}, timeline())
    assert figs[B][BEFORE].lag_count == 0
    assert figs[B][DURING].lag_count == 1
    assert figs[B][DURING].lag_p99_ms == pytest.approx(11_000.0)
    assert figs[B][AFTER].lag_count == 0


def test_lag_is_never_negative() -> None:
    h = history(op("register", A, "churn-1", invoked=1.0, completed=1.5))
    figs = phase_figures(h, {A: presence(A, {}), B: presence(B, {K1: [(1.2, True)]})}, timeline())
    assert figs[B][BEFORE].lag_p50_ms == 0.0


def test_lag_counts_only_acknowledged_registrations_seen_in_the_region() -> None:
    h = history(
        op("register", A, "churn-1", invoked=1.0, outcome=UNKNOWN, error="timeout"),
        op("register", A, "churn-2", invoked=1.0),
    )
    presences = {A: presence(A, {}), B: presence(B, {K1: [(1.2, True)]})}
    assert phase_figures(h, presences, timeline())[B][BEFORE].lag_count == 0


def test_call_figures_are_per_region_and_phase_of_invocation() -> None:
    h = history(
        op("register", A, "churn-1", invoked=1.0),
        op("register", A, "churn-2", invoked=9.99, completed=10.5),  # met the fault: during
        op("register", A, "churn-3", invoked=11.0, outcome=UNKNOWN, error="timeout"),
        op("resolve", A, invoked=21.0, outcome=FAILED, error="UNAVAILABLE"),
        op("resolve", B, invoked=21.0),
    )
    figs = phase_figures(h, {A: presence(A, {}), B: presence(B, {})}, timeline())
    assert figs[A][BEFORE].writes.ok == 1
    assert figs[A][DURING].writes.ok == 1 and figs[A][DURING].writes.unknown == 1
    assert figs[A][AFTER].resolve.failed == 1
    assert figs[B][AFTER].resolve.ok == 1
    assert figs[B][BEFORE].writes.total == 0


# --- report -----------------------------------------------------------------------------------


def report(broken: list[str], v: Verdict | None = None, inconclusive: list[str] | None = None) -> Report:
    h = history(op("register", A, "churn-1", invoked=1.0), op("resolve", B, invoked=15.0))
    presences = {A: presence(A, {K1: [(1.05, True)]}), B: presence(B, {K1: [(1.2, True)]})}
    return Report(
        scenario="region-hang",
        target=B,
        service="drill-test",
        hold=10.0,
        baseline=5.0,
        after=10.0,
        heal_took=0.25,
        regions=(A, B),
        judged=(A,),
        figures=phase_figures(h, presences, timeline()),
        verdict=v or Verdict(acknowledged=1, convergence_s=1.23456, flapped={A: 0, B: 2}),
        bounds=Bounds(),
        broken=broken,
        events=[(0.0, "baseline"), (5.0, "fault")],
        notes={"server": 1},
        skipped={A: 0, B: 3},
        inconclusive=inconclusive or [],
    )


def test_a_report_without_broken_guarantees_passed() -> None:
    r = report([])
    assert r.passed
    table = r.table()
    assert "PASSED: every guarantee held" in table
    assert "FAILED" not in table


def test_a_report_with_broken_guarantees_failed_and_lists_them() -> None:
    r = report(["1 acknowledged registrations lost: b: a/churn-1"])
    assert not r.passed
    table = r.table()
    assert "FAILED: a guarantee broke" in table
    assert "  - 1 acknowledged registrations lost: b: a/churn-1" in table


def test_the_table_has_a_row_per_region_and_marks_the_unjudged() -> None:
    lines = report([]).table().splitlines()
    assert any(line.startswith("a ") and BEFORE in line for line in lines)
    assert any(line.startswith("b *") and BEFORE in line for line in lines)
    assert "* the faulted region: reported, not held to the availability bounds" in lines
    assert "convergence after the heal  1.23 s (bound 15 s)" in lines
    assert "ticks skipped (too many calls in flight): b 3" in lines


def test_the_table_says_when_the_cluster_did_not_converge() -> None:
    assert "did not converge" in report(["x"], Verdict(convergence_s=None, unconverged=["b: a/churn-1"])).table()


def test_the_json_report_is_serialisable_and_has_the_verdict() -> None:
    v = Verdict(acknowledged=3, deleted=1, lost=["b: a/churn-1"], resurrected=["b: a/churn-2"], convergence_s=1.23456)
    out = report(["lost"], v).to_json()
    again = json.loads(json.dumps(out))
    assert again["passed"] is False
    assert again["lost"] == ["b: a/churn-1"]
    assert again["resurrected"] == ["b: a/churn-2"]
    assert again["convergence_seconds"] == 1.235
    assert set(again["regions"]) == {A, B}
    assert again["regions"][A]["judged"] is True and again["regions"][B]["judged"] is False
    assert again["regions"][A][BEFORE]["writes"]["ok"] == 1


def test_the_json_report_of_a_pass_has_empty_lists() -> None:
    out = report([]).to_json()
    json.dumps(out)
    assert out["passed"] is True and out["lost"] == [] and out["resurrected"] == []
    assert out["convergence_seconds"] == 1.235


def test_a_report_with_only_checks_not_judged_is_inconclusive_and_says_why() -> None:
    r = report([], inconclusive=["a after: writes latency not judged: the host was saturated"])
    assert r.outcome == "inconclusive" and not r.passed
    lines = r.table().splitlines()
    assert "INCONCLUSIVE: no guarantee broke, but not everything could be judged" in lines
    assert "  ? a after: writes latency not judged: the host was saturated" in lines
    out = json.loads(json.dumps(r.to_json()))
    assert out["verdict"] == "inconclusive" and out["passed"] is False
    assert out["inconclusive"] == ["a after: writes latency not judged: the host was saturated"]


def test_a_broken_guarantee_fails_even_beside_checks_not_judged() -> None:
    r = report(["1 acknowledged registrations lost: b: a/churn-1"], inconclusive=["latency not judged"])
    assert r.outcome == "failed"
    table = r.table()
    assert "FAILED: a guarantee broke" in table and "not judged:\n  ? latency not judged" in table
    assert r.to_json()["verdict"] == "failed"


def test_the_json_verdict_of_a_pass() -> None:
    out = report([]).to_json()
    assert out["verdict"] == "passed" and out["passed"] is True and out["inconclusive"] == []


def test_the_table_shows_what_latency_was_judged_and_the_machine() -> None:
    checks = (
        LatencyCheck(A, "writes", DURING, "ok", percentile=92, baseline_ms=10.0, limit_ms=35.0, value_ms=12.0),
        LatencyCheck(
            A, "writes", AFTER, "inconclusive", "why", percentile=92, baseline_ms=10.0, limit_ms=35.0, value_ms=90.0,
            clean_percentile=75, clean_baseline_ms=8.0, clean_limit_ms=33.0, clean_ms=9.0,
        ),
    )  # fmt: skip
    host = {BEFORE: {"cpus": 2, "busy": 0.45, "cpu_wait": 0.3, "saturated_seconds": 0.0, "ticks_late": 0}}
    r = Report(**{**report([]).__dict__, "latency": checks, "host": host, "inconclusive": ["why"]})
    lines = r.table().splitlines()
    assert (
        "  a writes: during p92 12.0 ms of limit 35.0 (baseline 10.0) ok; "
        "after p92 90.0 ms of limit 35.0 (baseline 10.0), unsaturated p75 9.0 of 33.0 inconclusive"
    ) in lines
    assert any(line.startswith("machine (2 CPUs)") and "before CPU 45% busy, waiting 30%" in line for line in lines)
    out = r.to_json()
    assert out["latency"][1]["unsaturated"] == {"percentile": 75, "baseline_ms": 8.0, "limit_ms": 33.0, "value_ms": 9.0}
    assert out["latency"][0]["unsaturated"] is None
    assert out["host"][BEFORE]["busy"] == 0.45
