"""The receiver's side of the recovery signal: when an origin's deletions are held."""

from __future__ import annotations

import time

from discovery.replication.hold import DeletionHold

GRACE = 10.0


def note(hold: DeletionHold, recovered_ago: float | None) -> None:
    """A message from the origin, sent now, saying it recovered ``recovered_ago`` seconds ago."""
    now_ms = int(time.time() * 1000)
    hold.note(now_ms, 0 if recovered_ago is None else now_ms - int(recovered_ago * 1000))


def holding(hold: DeletionHold) -> float:
    return max(0.0, hold.until - time.monotonic())


def test_a_recent_recovery_holds_for_what_is_left_of_the_grace() -> None:
    hold = DeletionHold("a", GRACE)
    note(hold, recovered_ago=3.0)
    assert hold.holding()
    assert 6.5 < holding(hold) <= 7.0
    assert hold.until_ms > 0


def test_no_recovery_or_an_old_one_holds_nothing() -> None:
    hold = DeletionHold("a", GRACE)
    note(hold, None)
    note(hold, recovered_ago=GRACE + 1)
    assert holding(hold) == 0 and not hold.holding()


def test_a_clock_step_cannot_stretch_the_hold_past_the_grace() -> None:
    hold = DeletionHold("a", GRACE)
    note(hold, recovered_ago=-3600)  # "recovered" an hour in the future
    assert holding(hold) <= GRACE


def test_a_withdrawn_recovery_releases_what_is_held() -> None:
    hold = DeletionHold("a", GRACE)
    note(hold, recovered_ago=0.5)
    assert holding(hold) > 9
    assert hold.release_after() == GRACE
    note(hold, None)  # the same server: its etcd elected a new leader
    assert holding(hold) == 0 and hold.until_ms == 0
    assert hold.release_after() == 0  # everything held goes now
    assert hold.release_after() == GRACE  # once


def test_only_the_server_that_reported_a_recovery_can_withdraw_it() -> None:
    hold = DeletionHold("a", GRACE)
    note(hold, recovered_ago=0.5)
    hold.new_source()  # the feed moved to another server of the origin, which reports nothing
    note(hold, None)
    assert holding(hold) > 9
    assert hold.release_after() == GRACE


def test_a_new_leader_keeps_holding_until_the_checkpoint_says() -> None:
    now_ms = int(time.time() * 1000)
    hold = DeletionHold("a", GRACE)
    hold.resume(now_ms + 4000)
    assert 3.5 < holding(hold) <= 4.0 and hold.until_ms == now_ms + 4000
    hold.resume(now_ms - 1000)  # a hold that ended while nobody led
    assert not hold.holding()


def test_no_grace_holds_nothing() -> None:
    hold = DeletionHold("a", 0.0)
    note(hold, recovered_ago=0.5)
    assert not hold.holding() and hold.until_ms == 0
