"""One retry policy for every call and stream the client makes, and for the server's own
reconnecting loops (the view's etcd watch, the replicator), which import it from here."""

from __future__ import annotations

import random
from dataclasses import dataclass

from discovery_client.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff with jitter between passes over the server list.

    Args:
        attempts: passes over every configured server a unary call makes before giving up.
        deadline: seconds a unary call may take in all, retries included.
        base_delay, max_delay, multiplier: the exponential backoff between passes (seconds).
        jitter: each delay is scaled by a random factor in [1 - jitter, 1 + jitter], so a
            fleet of clients that lost the same server does not come back in step.
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

    def validate(self) -> RetryPolicy:
        if self.attempts < 1 or self.deadline <= 0:
            raise ConfigError("retry: need attempts >= 1 and deadline > 0")
        if not 0 < self.base_delay <= self.max_delay:
            raise ConfigError("retry: need 0 < base_delay <= max_delay")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ConfigError("retry: need multiplier >= 1 and 0 <= jitter < 1")
        return self
