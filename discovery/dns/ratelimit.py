"""Response rate limiting per source address, so the UDP port cannot be used to amplify
traffic at a spoofed address (docs/dns.md, "Limits").

A token bucket per source address: ``rate`` responses per second, ``burst`` at once. Past it
a query is answered, every ``slip``-th time, by an empty truncated response (no larger than
the query: no amplification) so that a real client behind that address retries over TCP,
which a spoofer cannot; otherwise it is dropped. TCP is not limited here: it cannot be
spoofed, and its connections are limited by the listener.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

MAX_SOURCES = 65_536  # buckets kept; past it the idlest half is forgotten (forgotten = full)


class Verdict(Enum):
    ANSWER = "answer"
    SLIP = "slip"  # answer with an empty TC response: a real client retries over TCP
    DROP = "drop"


class ResponseRateLimit:
    """``rate`` 0 turns limiting off."""

    def __init__(
        self, rate: float, burst: float = 0.0, *, slip: int = 2, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, burst or rate)
        self.slip = slip
        self._clock = clock
        self._buckets: dict[str, tuple[float, float, int]] = {}  # source -> (tokens, at, refused)
        self.dropped = 0
        self.slipped = 0

    def check(self, source: str) -> Verdict:
        if not self.rate:
            return Verdict.ANSWER
        now = self._clock()
        tokens, at, refused = self._buckets.pop(source, (self.burst, now, 0))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._keep(source, (tokens - 1.0, now, 0))
            return Verdict.ANSWER
        refused += 1
        self._keep(source, (tokens, now, refused))
        if self.slip and refused % self.slip == 0:
            self.slipped += 1
            return Verdict.SLIP
        self.dropped += 1
        return Verdict.DROP

    def _keep(self, source: str, bucket: tuple[float, float, int]) -> None:
        # Re-inserted at every query, so the dict's order is least recently seen first.
        self._buckets[source] = bucket
        if len(self._buckets) > MAX_SOURCES:
            for stale in list(self._buckets)[: MAX_SOURCES // 2]:
                del self._buckets[stale]

    @property
    def sources(self) -> int:
        return len(self._buckets)
