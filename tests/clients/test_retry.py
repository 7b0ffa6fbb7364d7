"""The one RetryPolicy: backoff with jitter, capped, for as long as an outage lasts."""

from __future__ import annotations

from discovery_client import RetryPolicy


def test_the_delay_doubles_to_its_cap_within_the_jitter() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=2.0, jitter=0.2)
    for attempt, expected in ((0, 0.1), (1, 0.2), (3, 0.8), (5, 2.0), (50, 2.0)):
        assert expected * 0.8 <= policy.delay(attempt) <= expected * 1.2


def test_a_long_outage_stays_at_the_cap() -> None:
    # The view and the replicator count failed attempts for as long as etcd or a peer is gone:
    # at 2 s apiece, 1,100 attempts is 37 minutes; 2.0 ** 1100 overflows a float.
    assert RetryPolicy(jitter=0).delay(1100) == 2.0
    assert RetryPolicy(jitter=0, multiplier=1e6).delay(10_000) == 2.0
