"""The receiver's side of the recovery signal: when an origin's deletions are held."""

from __future__ import annotations

import time

from discovery.keys import KeySchema
from discovery.replication import ReplicationSettings, Replicator
from discovery_pb.v1 import replication_pb2 as pb

GRACE = 10.0


def replicator() -> Replicator:
    settings = ReplicationSettings(region="b", identity="b-0", resume_grace=GRACE)
    return Replicator("a", ["127.0.0.1:1"], store=None, keys=KeySchema(), settings=settings)  # type: ignore[arg-type]


def message(recovered_ago: float | None) -> pb.StreamResponse:
    now_ms = int(time.time() * 1000)
    recovered = 0 if recovered_ago is None else now_ms - int(recovered_ago * 1000)
    return pb.StreamResponse(kind=pb.StreamResponse.HEARTBEAT, origin="a", time_ms=now_ms, recovered_at_ms=recovered)


def holding(r: Replicator) -> float:
    return max(0.0, r._hold_until - time.monotonic())


def test_a_recent_recovery_holds_for_what_is_left_of_the_grace() -> None:
    r = replicator()
    r._note_recovery(message(recovered_ago=3.0))
    assert 6.5 < holding(r) <= 7.0
    assert r._contact.hold_until_ms > 0


def test_no_recovery_or_an_old_one_holds_nothing() -> None:
    r = replicator()
    r._note_recovery(message(None))
    r._note_recovery(message(recovered_ago=GRACE + 1))
    assert holding(r) == 0


def test_a_clock_step_cannot_stretch_the_hold_past_the_grace() -> None:
    r = replicator()
    r._note_recovery(message(recovered_ago=-3600))  # "recovered" an hour in the future
    assert holding(r) <= GRACE


def test_a_withdrawn_recovery_releases_what_is_held() -> None:
    r = replicator()
    r._note_recovery(message(recovered_ago=0.5))
    assert holding(r) > 9
    r._note_recovery(message(None))  # the same server: its etcd elected a new leader
    assert holding(r) == 0 and r._release_all and r._contact.hold_until_ms == 0
