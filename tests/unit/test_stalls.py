"""The stall monitor: a loop that did not run is recorded as a recovery time."""

from __future__ import annotations

import asyncio
import time

from discovery.replication.stalls import StallMonitor


async def test_a_blocked_loop_is_a_stall_and_its_end_a_recovery() -> None:
    monitor = StallMonitor(tick=0.02, threshold=0.2)
    task = asyncio.create_task(monitor.run())
    try:
        await asyncio.sleep(0.1)
        assert monitor.last_recovery() == 0  # ticking on time is no stall
        # Blocking on purpose: the loop cannot run, as if the process were SIGSTOPped.
        time.sleep(0.4)  # noqa: ASYNC251
        # Before the overdue tick has run, the monitor already answers "now".
        assert abs(monitor.last_recovery() - time.monotonic()) < 0.05
        await asyncio.sleep(0.05)  # the overdue tick runs first and records the stall
        assert monitor.stalls == 1
        recovered = monitor.recovered_at
        assert abs(recovered - time.monotonic()) < 0.1
        await asyncio.sleep(0.1)
        assert monitor.last_recovery() == recovered  # on time again: the recovery stays
    finally:
        task.cancel()
