"""Streams a servicer has open, so shutdown can end them at once instead of at the end of
the grace period (Watch and Heartbeat streams otherwise last as long as their clients), and a
policy reload can end those it no longer allows (each stream's re-check: Watch, Heartbeat, ADS,
replication feeds; docs/security.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from discovery.api.errors import status_for
from discovery.errors import DiscoveryError

log = logging.getLogger(__name__)

T = TypeVar("T")


Recheck = Callable[[], "DiscoveryError | None"]


class OpenStreams:
    def __init__(self, message: str) -> None:
        self.message = message  # the UNAVAILABLE detail: what the client should do next
        self.closing = False
        self._streams: dict[asyncio.Task[Any], grpc.aio.ServicerContext] = {}
        self._aborts: set[asyncio.Task[None]] = set()
        # Per stream, what says whether its caller may still have it (a policy reload may
        # revoke a grant or deny an identity): an error to end it with, or None.
        self._rechecks: dict[asyncio.Task[Any], Recheck] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, context: grpc.aio.ServicerContext) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None
        self._streams[task] = context
        return task

    async def follow(
        self, context: grpc.aio.ServicerContext, body: Callable[[asyncio.Task[Any]], AsyncGenerator[T, None]]
    ) -> AsyncGenerator[T, None]:
        """What ``body(task)`` yields, with the stream registered meanwhile so ``end_all`` can
        end it; ``body`` checks ``ended(task)`` before sending a status of its own."""
        task = self.add(context)
        try:
            async with contextlib.aclosing(body(task)) as messages:
                async for message in messages:
                    yield message
        finally:
            self.discard(task)

    def discard(self, task: asyncio.Task[Any]) -> None:
        self._streams.pop(task, None)
        self._rechecks.pop(task, None)

    def guard(self, task: asyncio.Task[Any], recheck: Recheck) -> None:
        """Have ``revoke`` ask ``recheck`` about this stream (once it is authorized)."""
        if task in self._streams:
            self._rechecks[task] = recheck

    def revoke(self) -> int:
        """End every stream whose caller may no longer have it (``recheck`` returns the
        error): the status goes out first, then its task is cancelled, as in ``end_all``.
        Returns how many were ended."""
        ended = 0
        for task, recheck in list(self._rechecks.items()):
            error = recheck()
            context = self._streams.get(task)
            if error is None or context is None:
                continue
            self.discard(task)
            ended += 1
            aborting = asyncio.create_task(self._end(context, task, error))
            self._aborts.add(aborting)
            aborting.add_done_callback(self._aborts.discard)
        return ended

    async def _end(self, context: grpc.aio.ServicerContext, task: asyncio.Task[Any], error: DiscoveryError) -> None:
        try:
            async with asyncio.timeout(1.0):
                await context.abort(status_for(error), str(error))
        except (grpc.aio.AbortError, TimeoutError):
            pass
        except Exception as exc:  # the call may be over already
            log.debug("ending a revoked stream: %s", exc)
        task.cancel()

    def ended(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``end_all`` has sent this stream its status already."""
        return task not in self._streams

    async def end_all(self, timeout: float = 1.0) -> None:
        """End every open stream with UNAVAILABLE (the code clients retry on elsewhere).

        The status goes out first, then the handler's task is cancelled wherever it waits (in
        that order: a handler cancelled while blocked in a write never sends a status). A
        client that has stopped reading cannot receive the status behind the data it has not
        read; gRPC cancels its call at the end of the grace period.
        """
        self.closing = True
        streams, self._streams = self._streams, {}
        aborts = [asyncio.create_task(self._abort_quietly(context)) for context in streams.values()]
        self._aborts.update(aborts)
        for abort_task in aborts:
            abort_task.add_done_callback(self._aborts.discard)
        if aborts:
            await asyncio.wait(aborts, timeout=timeout)
        for task in streams:
            task.cancel()

    async def _abort_quietly(self, context: grpc.aio.ServicerContext) -> None:
        try:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.message)
        except grpc.aio.AbortError:
            pass  # how abort() reports success
        except Exception as exc:  # the call may already be over; shutdown goes on regardless
            log.debug("could not end a stream: %r", exc)
