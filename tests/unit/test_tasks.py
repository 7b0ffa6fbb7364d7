"""TaskSet: stop cancels every task and waits for it, and a broken task is logged, not raised,
so the server's shutdown goes on to revoke its lease and close etcd."""

from __future__ import annotations

import asyncio
import logging

import pytest

from discovery.tasks import TaskSet


async def test_stop_cancels_and_waits_for_every_task() -> None:
    tasks = TaskSet("test")
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append(name)

    started = [tasks.start(name, forever(name)) for name in ("a", "b")]
    assert tasks.names == ["a", "b"]
    await asyncio.sleep(0)
    await tasks.stop()
    assert sorted(ended) == ["a", "b"] and all(t.cancelled() for t in started)
    assert tasks.names == []
    await tasks.stop()  # twice is fine


async def test_a_broken_task_is_logged_and_stop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet("test")

    async def broken() -> None:
        raise RuntimeError("bug")

    tasks.start("broken", broken())
    other = tasks.start("other", asyncio.Event().wait())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="discovery.tasks"):
        await tasks.stop()
    assert other.cancelled()
    assert "test task broken failed" in caplog.text and "RuntimeError: bug" in caplog.text
