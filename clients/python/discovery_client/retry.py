"""One retry policy for every call and stream the client makes, and for the server's own
reconnecting loops (the view's etcd watch, the replicator), which import it from here."""

from __future__ import annotations

import random
from dataclasses import dataclass

from discovery_client.errors import ConfigError, DiscoveryClientError, ResourceExhausted


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
    then waits at least that long, if it still fits in the deadline (else the error is raised).
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
