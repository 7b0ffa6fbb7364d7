"""One retry policy (attempts, base delay, max delay, jitter, deadline) for every loop that
reconnects: the view's watch, and later the replicator and the client."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_delay: float = 0.1
    max_delay: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based), with jitter."""
        raw = min(self.max_delay, self.base_delay * self.multiplier ** max(0, attempt))
        return raw * random.uniform(1 - self.jitter, 1 + self.jitter)

    def validate(self) -> None:
        if not 0 < self.base_delay <= self.max_delay:
            raise ValueError("retry: need 0 < base_delay <= max_delay")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("retry: need multiplier >= 1 and 0 <= jitter < 1")
