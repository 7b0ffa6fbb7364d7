"""Background tasks with one owner each, so that what runs and who stops it is answered where
a component starts them.

Not ``asyncio.TaskGroup``: a group cancels every task when one fails and raises when it is
left. A server whose stall monitor or xDS pusher breaks keeps serving Resolve and replicating
(the failure is logged at shutdown), and its shutdown must go on to revoke the election lease
and close the etcd client whatever its tasks did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    """Named tasks that live until ``stop``."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def names(self) -> list[str]:
        return [task.get_name() for task in self._tasks]

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    async def stop(self) -> None:
        """Cancel every task and wait for all of them; a task that failed is logged, never
        raised, so the caller's shutdown goes on. Safe to call twice."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait, not awaiting each: a CancelledError from it is ours, not a task's.
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s task %s failed", self._owner, task.get_name(), exc_info=task.exception())


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel one task its owner started and wait for it to end."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
