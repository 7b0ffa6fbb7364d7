"""The stall monitor: a loop that did not run is recorded, and overlaps are measured."""

from __future__ import annotations

import asyncio
import time

from discovery.replication.stalls import StallMonitor


async def test_a_blocked_loop_is_recorded_as_a_stall() -> None:
    monitor = StallMonitor(tick=0.02, threshold=0.2)
    task = asyncio.create_task(monitor.run())
    try:
        await asyncio.sleep(0.1)
        assert not monitor.stalls  # ticking on time is no stall
        before = time.monotonic()
        # Blocking on purpose: the loop cannot run, as if the process were SIGSTOPped.
        time.sleep(0.4)  # noqa: ASYNC251
        after = time.monotonic()
        await asyncio.sleep(0.05)  # the monitor's overdue tick runs first and records the stall
    finally:
        task.cancel()
    assert 0.3 < monitor.stalled_within(before, after + 0.1) <= 0.45


def test_overlap_counts_only_the_part_inside_the_window() -> None:
    monitor = StallMonitor()
    monitor.stalls.extend([(10.0, 12.0), (20.0, 25.0)])
    assert monitor.stalled_within(0.0, 100.0) == 7.0
    assert monitor.stalled_within(11.0, 21.0) == 2.0
    assert monitor.stalled_within(13.0, 19.0) == 0.0
