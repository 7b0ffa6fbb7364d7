"""Admission of writes: a server that cannot keep up says so at once (RESOURCE_EXHAUSTED,
``discovery-limit: overload`` and how long to wait), instead of queueing calls until their
deadlines pass, answering INTERNAL, or letting heartbeats fall behind until leases expire.

What is limited is the number of etcd writes (registrations, deregistrations, sessions,
heartbeats) this server has in flight at once: the queue that grows when etcd or this
process's CPU is the bottleneck. Reads are answered from memory and are not limited here."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

from discovery.errors import ResourceExhausted

_MIN_RETRY, _MAX_RETRY = 0.05, 2.0  # seconds: a hint to spread retries, not a promise


class Admission:
    """At most ``limit`` writes in flight (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.refused = 0

    @contextmanager
    def write(self, what: str, slack: float = 1.0) -> Iterator[None]:
        """Hold a place for one write; ``slack`` > 1 lets a kind of write in past the limit
        (heartbeats: refusing one costs a lease if it goes on long)."""
        if self.limit and self.in_flight >= self.limit * slack:
            self.refused += 1
            # Longer the more is queued: a storm of retries spreads out instead of coming back
            # together; the client adds its own jitter on top.
            wait = min(_MAX_RETRY, _MIN_RETRY * (1 + random.random()) * max(1.0, self.in_flight / max(1, self.limit)))
            raise ResourceExhausted(
                "overload",
                f"this server has {self.in_flight} writes in flight, its limit (max_pending_writes): "
                f"{what} refused; retry in {wait * 1000:.0f} ms, or on another server of the region",
                retry_after=wait,
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
