"""When this process last came back from not running: SIGSTOP, a paused VM, a host that
stalled.

A region frozen longer than its lease TTLs wakes to find its leases expired: the deletions
that follow are artifacts of the freeze, and the instances register again within moments.
The origin region is the one that knows it was frozen, so its feed says so (``StreamResponse
.recovered_at_ms``) and receivers hold its deletions for their resume grace. A receiver that
was frozen itself, or merely cut off, holds nothing: the origin's deletions are genuine.

The monitor watches its own event loop: a tick that comes much later than asked means the
loop, and so the process, did not run in between.
"""

from __future__ import annotations

import asyncio
import time


class StallMonitor:
    """Ticks every ``tick`` seconds; a tick ``threshold`` seconds late is a stall."""

    def __init__(self, tick: float = 0.1, threshold: float = 0.5) -> None:
        self.tick = tick
        self.threshold = threshold
        self.stalls = 0
        self.recovered_at = 0.0  # time.monotonic() at the end of the last stall; 0: none seen
        self._last = time.monotonic()

    async def run(self) -> None:
        self._last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            if now - self._last - self.tick >= self.threshold:
                self.stalls += 1
                self.recovered_at = now
            self._last = now

    def last_recovery(self) -> float:
        """The end of the last stall (monotonic; 0: none); now if the loop is behind right now,
        so a message sent in the first moments after waking (before the overdue tick ran)
        says so too."""
        now = time.monotonic()
        if now - self._last - self.tick >= self.threshold:
            return now
        return self.recovered_at
