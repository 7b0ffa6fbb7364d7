"""One retry policy for every call and stream the client makes, and for the server's own
reconnecting loops (the view's etcd watch, the replicator), which import it from here."""

from __future__ import annotations

import random
from dataclasses import dataclass

from discovery_client.errors import ConfigError, DiscoveryClientError, ResourceExhausted

OVERLOAD_SPREAD = 30.0  # seconds: the most a retry-after is stretched by its jitter


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff with jitter between passes over the server list.

    Args:
        attempts: passes over every configured server a unary call makes before giving up.
        deadline: seconds a unary call may take in all, retries included.
        base_delay, max_delay, multiplier: the exponential backoff between passes (seconds).
        jitter: each delay is scaled by a random factor in [1 - jitter, 1 + jitter], so a
            fleet of clients that lost the same server does not come back in step.

    A server over a limit answers RESOURCE_EXHAUSTED with ``retry-after-ms``: the next pass
    then waits that long times a random factor in [1, 2] (``after_refusal``), if the wait
    still fits in the deadline (else the error is raised).
    """

    attempts: int = 3
    deadline: float = 10.0
    base_delay: float = 0.1
    max_delay: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        """Seconds to wait before pass number ``attempt`` + 1 (0-based), with jitter."""
        try:
            raw = min(self.max_delay, self.base_delay * self.multiplier ** max(0, attempt))
        except OverflowError:  # a long outage's count (2.0 ** 1100 is no float): the cap holds
            raw = self.max_delay
        return raw * random.uniform(1 - self.jitter, 1 + self.jitter)

    def after_refusal(self, told: float, attempt: int = 0) -> float:
        """Seconds to wait after a refusal: with a server's retry-after (``told`` > 0), a
        random point in [told, 2 * told] (at most ``told`` + ``OVERLOAD_SPREAD``), so a fleet
        refused at the same moment comes back spread out instead of in step; without one,
        the exponential backoff of pass ``attempt``."""
        if told <= 0:
            return self.delay(attempt)
        return min(told * random.uniform(1, 2), told + OVERLOAD_SPREAD)

    def retry_after(self, error: DiscoveryClientError, remaining: float) -> float | None:
        """Seconds to wait before trying again after ``error``, when a server said how long
        (RESOURCE_EXHAUSTED with ``retry-after-ms``) and that wait ends within ``remaining``
        seconds; None when the error is to be raised instead."""
        if isinstance(error, ResourceExhausted) and 0 < error.retry_after < remaining:
            return error.retry_after
        return None

    def validate(self) -> RetryPolicy:
        if self.attempts < 1 or self.deadline <= 0:
            raise ConfigError("retry: need attempts >= 1 and deadline > 0")
        if not 0 < self.base_delay <= self.max_delay:
            raise ConfigError("retry: need 0 < base_delay <= max_delay")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ConfigError("retry: need multiplier >= 1 and 0 <= jitter < 1")
        return self
