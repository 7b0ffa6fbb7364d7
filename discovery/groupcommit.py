"""Group commit: concurrent requests of one kind coalesced into batches.

A Register costs its server one gRPC call to etcd, and on this kind of machine the client side
of that call (grpc.aio's call object, its completion, etcd3aio's wrapper) was about a quarter
of the server's CPU per Register (py-spy, docs/capacity.md). Puts that arrive while earlier ones
are on their way to etcd are sent together as one transaction instead: an idle server sends
each at once (one loop turn later), a busy one sends fewer, larger transactions. This is what
databases call group commit, and etcd does the same with raft entries under load.

Callers wait for their own result; a batch that fails fails each of its callers with the same
error; a caller that gives up (timeout, cancel) before its batch is sent is left out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Retry(Exception):
    """A batch's answer for one item that was not applied through no fault of its own (another
    item's condition failed the transaction): it goes into the next batch."""


@dataclass(slots=True)
class _Waiting(Generic[Item, Result]):
    item: Item
    key: Hashable
    future: asyncio.Future[Result] = field(repr=False)


Send = Callable[[list[Item]], Awaitable[list["Result | BaseException"]]]


class GroupCommit(Generic[Item, Result]):
    """Batches of at most ``max_batch`` items and ``max_weight`` of ``weight(item)`` (one
    heavier item goes alone), at most ``max_in_flight`` batches at a time.

    ``send(items)`` returns one result or exception per item, in order (``Retry`` queues the
    item again); if it raises, every item of the batch gets that exception. ``key(item)``: items
    with the same key never share a batch (etcd refuses a transaction that puts one key twice);
    the later one waits for the next batch, so their order is kept.
    """

    def __init__(
        self,
        send: Send[Item, Result],
        *,
        key: Callable[[Item], Hashable],
        weight: Callable[[Item], int] = lambda _: 1,
        max_batch: int = 100,
        max_weight: int = 1 << 62,
        max_in_flight: int = 2,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be >= 1")
        self._send = send
        self._key = key
        self._weight = weight
        self._max_weight = max_weight
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[_Waiting[Item, Result]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # sent, for the figures
        self.items = 0

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append(_Waiting(item, self._key(item), future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        # One loop turn later, not now: the other callers woken in this turn join the batch.
        if not self._scheduled and self._pending and self._in_flight < self._max_in_flight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._in_flight >= self._max_in_flight:
            return
        batch: list[_Waiting[Item, Result]] = []
        keys: set[Hashable] = set()
        weight = 0
        rest: list[_Waiting[Item, Result]] = []
        for waiting in self._pending:
            if waiting.future.done():  # its caller gave up: never sent
                continue
            heavy = self._weight(waiting.item)
            fits = not batch or weight + heavy <= self._max_weight
            if fits and len(batch) < self._max_batch and waiting.key not in keys:
                batch.append(waiting)
                keys.add(waiting.key)
                weight += heavy
            else:
                rest.append(waiting)
        self._pending = rest
        if not batch:
            return
        self._in_flight += 1
        task = asyncio.create_task(self._run(batch), name="group-commit")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._schedule()  # another batch may go beside this one

    async def _run(self, batch: list[_Waiting[Item, Result]]) -> None:
        try:
            self.batches += 1
            self.items += len(batch)
            try:
                results = await self._send([w.item for w in batch])
            except asyncio.CancelledError:
                for waiting in batch:
                    waiting.future.cancel()
                raise
            except Exception as exc:  # every caller of the batch gets it
                results = [exc] * len(batch)
            again: list[_Waiting[Item, Result]] = []
            for waiting, result in zip(batch, results, strict=True):
                if waiting.future.done():
                    continue
                if isinstance(result, Retry):
                    again.append(waiting)
                elif isinstance(result, BaseException):
                    waiting.future.set_exception(result)
                else:
                    waiting.future.set_result(result)
            self._pending[:0] = again  # ahead of later items of the same keys
        finally:
            self._in_flight -= 1
            self._schedule()

    async def close(self) -> None:
        """Fail what waits and stop what is under way (the store is closing)."""
        for waiting in self._pending:
            if not waiting.future.done():
                waiting.future.cancel()
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
