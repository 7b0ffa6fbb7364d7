"""Per-identity rate and stream limits, kept in this server's memory.

Rates are per server: N servers let an identity write N times ``writes_per_second`` (the
instance quotas, which matter more, are counted region-wide from the view by the caller).
Both limiters are plain dictionaries touched only from the event loop: no locks, no awaits,
``time.monotonic`` for the clock (injectable for tests). A limit of 0 means no limit.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from discovery.security.policy import Limits

MAX_TRACKED_IDENTITIES = 100_000
_SWEEP_EVERY = 1024  # takes between two sweeps for idle buckets
_EPSILON = 1e-9  # refills are sums of float products: a token must not be missed by a rounding


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per identity: ``write_burst`` tokens, refilled at ``writes_per_second``.

    A bucket that has refilled to full is forgotten (a new one starts full: the same thing), so
    memory holds only identities that wrote within the last ``burst / rate`` seconds, and at
    most ``max_identities`` of those (the least recently used go first)."""

    def __init__(self, *, max_identities: int = MAX_TRACKED_IDENTITIES, clock: Callable[[], float] = time.monotonic):
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._max = max_identities
        self._clock = clock
        self._takes = 0

    def take(self, identity: str, limits: Limits, cost: int = 1, now: float | None = None) -> float:
        """0.0 if ``identity`` may write now (its tokens are spent); else the seconds until it
        may (retry-after), and nothing is spent. A batch is one take. ``cost`` above the burst
        is capped to it, so a large batch waits for a full bucket rather than forever."""
        rate = limits.writes_per_second
        if rate <= 0:
            return 0.0
        now = self._clock() if now is None else now
        burst = float(max(limits.write_burst, 1))
        need = float(min(max(cost, 1), burst))
        bucket = self._buckets.get(identity)
        if bucket is None:
            bucket = self._buckets[identity] = _Bucket(burst, now)
        else:
            self._buckets.move_to_end(identity)
            # min(): the limit may have been lowered by a policy reload since the last take
            bucket.tokens = min(burst, bucket.tokens + max(0.0, now - bucket.updated) * rate)
            bucket.updated = now
        if bucket.tokens + _EPSILON >= need:
            bucket.tokens = max(0.0, bucket.tokens - need)
            wait = 0.0
        else:
            wait = (need - bucket.tokens) / rate
        self._takes += 1
        if self._takes % _SWEEP_EVERY == 0 or len(self._buckets) > self._max:
            self._sweep(now, rate, burst)
        return wait

    def _sweep(self, now: float, rate: float, burst: float) -> None:
        # Forget buckets that would be full by now. Each bucket's own limits are not stored:
        # judging by the current caller's is an approximation that can only forget a bucket
        # early (a fresh, full bucket), never keep one forever.
        for identity in [i for i, b in self._buckets.items() if b.tokens + (now - b.updated) * rate >= burst]:
            del self._buckets[identity]
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class StreamSlot:
    """One open stream's place in its identity's count; ``release`` (or leaving the ``with``
    block) gives it back, once however often it is called."""

    __slots__ = ("_identity", "_limiter", "_released")

    def __init__(self, limiter: StreamLimiter, identity: str) -> None:
        self._limiter = limiter
        self._identity = identity
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self._identity)

    def __enter__(self) -> StreamSlot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class StreamLimiter:
    """Concurrent streams per identity. ``acquire`` returns a StreamSlot, or None when the
    identity already has ``limit`` streams open (0: no limit, still counted)."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def acquire(self, identity: str, limit: int) -> StreamSlot | None:
        count = self._open.get(identity, 0)
        if limit > 0 and count >= limit:
            return None
        self._open[identity] = count + 1
        return StreamSlot(self, identity)

    def count(self, identity: str) -> int:
        return self._open.get(identity, 0)

    def _release(self, identity: str) -> None:
        count = self._open.get(identity, 0) - 1
        if count > 0:
            self._open[identity] = count
        else:
            self._open.pop(identity, None)  # an identity with no stream holds no memory

    def __len__(self) -> int:
        return len(self._open)
