"""When this process did not run: SIGSTOP, a paused VM, a host that stalled.

A replicator that hears nothing from its origin for a while holds the origin's deletions
for the resume grace, since the origin may have been frozen and its leases expired on
waking. When the silence was this process's own (the region that froze is the receiver),
the origin's deletions are genuine: holding them only delays convergence. The monitor tells
the two apart by watching its own event loop: a tick that arrives much later than asked
means the loop, and so the process, did not run in between.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class StallMonitor:
    """Records intervals (``time.monotonic()``) in which the event loop did not run for at
    least ``threshold`` seconds; keeps the last ``keep`` of them."""

    def __init__(self, tick: float = 0.1, threshold: float = 0.5, keep: int = 64) -> None:
        self.tick = tick
        self.threshold = threshold
        self.stalls: deque[tuple[float, float]] = deque(maxlen=keep)

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            if now - last - self.tick >= self.threshold:
                self.stalls.append((last + self.tick, now))
            last = now

    def stalled_within(self, start: float, end: float) -> float:
        """Seconds of ``[start, end]`` this process spent stalled."""
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in self.stalls)
