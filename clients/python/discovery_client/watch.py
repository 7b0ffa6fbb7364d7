"""One service's Watch: list-then-watch into a ServiceCache, resumed on another server (or
region) when a stream breaks, the guard in between, the file as the last resort."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Mapping, Set
from typing import Any

import grpc
import grpc.aio

from discovery_client.cache import ServiceCache
from discovery_client.config import ClientConfig
from discovery_client.errors import DiscoveryClientError, ResourceExhausted, Unavailable, is_retryable
from discovery_client.filecache import FileCache
from discovery_client.guard import confirms
from discovery_client.model import InstanceKey
from discovery_client.servers import ServerEntry, ServerPool
from discovery_pb.v1 import lookup_pb2 as pb
from discovery_pb.v1.types_pb2 import Change, Status

log = logging.getLogger(__name__)
_ALL_STATUSES = (Status.SERVING, Status.DRAINING, Status.NOT_SERVING)
_CONFIRM_RETRY_FIRST = 0.25  # seconds before an unconfirming read is retried; doubles
_CONFIRM_RETRY_MAX = 5.0


class StreamBroken(Exception):
    """A Watch stream ended in a way that another server (or a retry) may fix; ``error`` is
    what to report if none does."""

    def __init__(self, error: DiscoveryClientError) -> None:
        super().__init__(str(error))
        self.error = error


async def follow_watch(pool: ServerPool, entry: ServerEntry, request: Any) -> AsyncGenerator[Any, None]:
    """Every message of one server's Watch stream, until it breaks (``StreamBroken``), the
    server refuses the request (``DiscoveryClientError``), or the stream reaches its deadline,
    ``stream_max_seconds`` (it returns: resume it)."""
    config = pool.config
    stubs = pool.stubs(entry)
    call = stubs.lookup.Watch(request, timeout=config.stream_max_seconds)
    heard = False
    try:
        messages = call.__aiter__()
        while True:
            # A hung server sends nothing: the first answer is due within a call's deadline,
            # the next ones at least every server keep-alive.
            idle = config.watch_idle_timeout if heard else config.call_timeout
            try:
                async with asyncio.timeout(idle):
                    message = await messages.__anext__()
            except StopAsyncIteration:
                raise StreamBroken(Unavailable(f"{entry.address} ended the watch", server=entry.address)) from None
            except TimeoutError:
                error = Unavailable(f"{entry.address} sent nothing for {idle:g}s", server=entry.address)
                raise StreamBroken(error) from None
            except grpc.aio.AioRpcError as exc:
                if heard and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return  # stream_max_seconds reached
                failure = pool.error(exc, entry, stubs)
                # Over a stream limit: another server, or this one later, may take it.
                if is_retryable(exc) or isinstance(failure, ResourceExhausted):
                    raise StreamBroken(failure) from None
                raise failure from exc
            if not heard:
                heard = True
                pool.answered(entry)
            yield message
    finally:
        call.cancel()


class ServiceWatch:
    """Keeps ``cache`` current for one service until ``close()``.

    ``settled`` is set once the cache has a view (from a server or the file), or once a
    whole pass over the servers failed with nothing to answer from (``error`` says why).
    """

    def __init__(self, service: str, pool: ServerPool, config: ClientConfig, files: FileCache | None) -> None:
        self.service = service
        self.cache = ServiceCache(service, config.region, config.regions[1:])
        self.settled = asyncio.Event()
        self.error: DiscoveryClientError | None = None
        self.holds = 0  # destructive updates the guard held back
        self.messages = 0
        self._pool = pool
        self._config = config
        self._files = files
        self._revision_region = ""  # region (so etcd) whose revision cache.revision is
        self._parts: dict[InstanceKey, Any] | None = None
        self._pending: dict[InstanceKey, Any] | None = None
        self._hold_task: asyncio.Task[None] | None = None
        self._pending_changed = asyncio.Event()
        self._baseline: Set[InstanceKey] = set()
        self._baseline_at = float("-inf")
        self._task = asyncio.create_task(self._run(), name=f"discovery-watch-{service}")

    @property
    def done(self) -> bool:
        return self._task.done()

    async def close(self) -> None:
        for task in (self._task, self._hold_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # --- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while True:
            seen, reason = self.messages, "no server configured"
            restart = False
            told = 0.0  # a server's retry-after, when one was over a limit
            for entry in self._pool.order():
                try:
                    restart = await self._follow(entry)
                except StreamBroken as exc:
                    reason = str(exc)
                    if isinstance(exc.error, ResourceExhausted):
                        told = max(told, exc.error.retry_after)
                    continue
                except DiscoveryClientError as exc:  # refused, not failed: retrying will not help
                    self.error = exc
                    self.settled.set()
                    return
                if restart:
                    break
            if restart:
                continue
            self.cache.set_state(connected=False)
            if not self.settled.is_set():
                await self._fall_back(reason)
            if self.messages > seen:
                attempt = 0
            log.info("discovery client: watch of %s lost every server (%s); retrying", self.service, reason)
            await asyncio.sleep(max(told, self._config.retry.delay(attempt)))
            attempt += 1

    async def _follow(self, entry: ServerEntry) -> bool:
        """Follow one server's Watch until it breaks (raises StreamBroken) or until it is
        time to start over from the preferred server (returns True)."""
        config, loop = self._config, asyncio.get_running_loop()
        resume = entry.region == self._revision_region and self.cache.revision > 0
        request = pb.WatchRequest(service=self.service, since_revision=self.cache.revision if resume else 0)
        self._parts = None
        next_home = loop.time() + config.home_retry_seconds
        async with contextlib.aclosing(follow_watch(self._pool, entry, request)) as messages:
            async for message in messages:
                self._on_message(message, entry)
                if not entry.home and loop.time() >= next_home:
                    next_home = loop.time() + config.home_retry_seconds
                    home = await self._pool.home_answers(pb.ResolveRequest(service=self.service))
                    if home is not None:
                        log.info("discovery client: %s answers again; moving the watch of %s home", home, self.service)
                        self._pool.answered(home)
                        return True
        return True  # stream_max_seconds reached: start over, resuming

    def _on_message(self, message: Any, entry: ServerEntry) -> None:
        self.messages += 1
        view: dict[InstanceKey, Any] | None = None
        if message.kind == pb.WatchResponse.SNAPSHOT:
            if self._parts is None:
                self._parts = {}
            for inst in message.instances:
                self._parts[(inst.region, inst.instance_id)] = inst
            if message.more:
                return
            view, self._parts = self._parts, None
        elif message.kind == pb.WatchResponse.CHANGES:
            view = dict(self._pending if self._pending is not None else self.cache.instances)
            for change in message.changes:
                key = (change.region, change.instance_id)
                if change.kind == Change.DELETE:
                    view.pop(key, None)
                else:
                    view[key] = change.instance
        trusted = self.cache.source in ("", "file")  # no view yet, or the file's: a live server's wins
        self._revision_region = entry.region
        self.cache.set_state(
            revision=message.revision, connected=True, server_stale=message.stale, source=entry.address
        )
        if view is not None:
            self._propose(view, entry, trusted)
        self.error = None
        self.settled.set()

    # --- the guard --------------------------------------------------------------------

    def _reference(self) -> Set[InstanceKey]:
        """What an update is compared with: the view as it was up to a grace period ago, so
        removals that arrive one by one in quick succession count together."""
        now = asyncio.get_running_loop().time()
        if now - self._baseline_at >= self._config.guard.grace_seconds:
            self._baseline, self._baseline_at = set(self.cache.instances), now
        return self._baseline

    def _propose(self, view: dict[InstanceKey, Any], entry: ServerEntry, trusted: bool) -> None:
        current = self.cache.instances
        reference = self._reference()
        if not trusted and self._config.guard.is_destructive(reference, view.keys()):
            self._pending = view
            self._pending_changed.set()
            if self._hold_task is None:
                self.holds += 1
                log.info(  # usually confirmed within a round trip; the warning is for one that is not
                    "discovery client: holding an update from %s that leaves %d of %d instances of %s",
                    entry.address,
                    len(view),
                    len(current),
                    self.service,
                )
                self.cache.set_state(held=True)
                self._hold_task = asyncio.create_task(self._hold(entry), name=f"discovery-guard-{self.service}")
            return
        if self._hold_task is not None:
            self._hold_task.cancel()
            self._hold_task = None
            self._pending = None
            self.cache.set_state(held=False)
        self._accept(view, entry.region)
        if trusted:
            self._baseline_at = float("-inf")  # the first live view: the reference from now on

    async def _hold(self, entry: ServerEntry) -> None:
        """Apply the held view once a fresh read confirms it, or when the grace period ends.

        A read can miss the latest removals (deletions arrive one by one, and the answering
        server's view may be a moment behind this stream), so an unconfirmed read is retried:
        at once when the held view changed meanwhile, else after a growing pause.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + self._config.guard.grace_seconds
        request = pb.ResolveRequest(service=self.service, scope=pb.ALL, statuses=_ALL_STATUSES)
        pause = _CONFIRM_RETRY_FIRST
        while (remaining := end - loop.time()) > 0:
            self._pending_changed.clear()
            with contextlib.suppress(DiscoveryClientError):
                fresh, by = await self._pool.call(
                    lambda s: s.lookup.Resolve, request, last=entry, deadline=max(0.1, remaining)
                )
                seen = {(e.instance.region, e.instance.instance_id) for e in fresh.endpoints}
                assert self._pending is not None
                if confirms(self.cache.instances.keys() - self._pending.keys(), seen):
                    log.info("discovery client: %s confirmed the removal from %s", by.address, self.service)
                    self._release(entry)
                    return
            if not self._pending_changed.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, min(pause, end - loop.time()))):
                        await self._pending_changed.wait()
                pause = min(pause * 2, _CONFIRM_RETRY_MAX)
        log.warning("discovery client: applying the held update of %s after the grace period", self.service)
        self._release(entry)

    def _release(self, entry: ServerEntry) -> None:
        view, self._pending, self._hold_task = self._pending, None, None
        self._baseline_at = float("-inf")  # confirmed or waited out: the new view is the reference
        self.cache.set_state(held=False)
        if view is not None:
            self._accept(view, entry.region)

    def _accept(self, view: Mapping[InstanceKey, Any], region: str) -> None:
        self.cache.set_instances(view)
        if self._files is not None:
            self._files.update(self.service, view, self.cache.revision, region)

    # --- last resort ------------------------------------------------------------------

    async def _fall_back(self, reason: str) -> None:
        saved = await self._files.load(self.service) if self._files is not None else None
        if saved is None:
            self.error = Unavailable(f"no discovery server answered a watch of {self.service!r} ({reason})")
        else:
            instances, revision = saved
            log.warning("discovery client: answering %s from the cache file (stale): %s", self.service, reason)
            self._revision_region = ""  # resuming another process's revision is not safe
            self.cache.set_state(revision=revision, connected=False, source="file")
            self.cache.set_instances(instances)
        self.settled.set()
