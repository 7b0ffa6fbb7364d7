"""Test helpers: waiting on conditions instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc.aio

from discovery_pb.v1 import lookup_pb2, registry_pb2, types_pb2

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], timeout: float = 5.0, interval: float = 0.02) -> T:
    """Await ``probe`` until it returns a truthy value or stops raising; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = await probe()
            if value:
                return value
            last = value
        except AssertionError as exc:  # probes may assert
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last: {last!r}")
        await asyncio.sleep(interval)


async def until_progress(
    check: Callable[[], object],
    progress: asyncio.Event,
    ended: Callable[[], str | None],
    summary: Callable[[], str],
    timeout: float,
) -> float:
    """Re-check ``check()`` each time ``progress`` is set (the reader sets it per message)
    until it holds; returns the seconds it took. AssertionError after ``timeout``, or as soon
    as ``ended()`` says why no progress can come."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        progress.clear()
        if check():
            return time.monotonic() - start
        why = ended()
        if why:
            raise AssertionError(f"{why} before the condition held; {summary()}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"condition not met within {timeout}s; {summary()}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await progress.wait()


# --- gRPC call helpers (every call has a deadline) ---------------------------------------

CALL_TIMEOUT = 5.0  # seconds: the deadline of every test's gRPC call


def instance(service: str = "web", address: str = "10.0.0.1:80", **fields: Any) -> types_pb2.Instance:
    """An Instance message; keyword arguments set any other field."""
    return types_pb2.Instance(service=service, address=address, **fields)


async def register(stubs: Any, service: str = "web", address: str = "10.0.0.1:80", **fields: Any) -> Any:
    """Register one instance through ``stubs`` (tests.support.servers.Stubs); returns the RegisterResponse."""
    request = registry_pb2.RegisterRequest(instance=instance(service, address, **fields))
    return await stubs.registry.Register(request, timeout=CALL_TIMEOUT)


async def resolve(stubs: Any, service: str = "web", **fields: Any) -> Any:
    """Resolve ``service``; keyword arguments are ResolveRequest fields. Returns the ResolveResponse."""
    return await stubs.lookup.Resolve(lookup_pb2.ResolveRequest(service=service, **fields), timeout=CALL_TIMEOUT)


ALL_STATUSES = (types_pb2.SERVING, types_pb2.DRAINING, types_pb2.NOT_SERVING)


# --- Watch streams ---------------------------------------------------------------------------

InstanceKey = tuple[str, str, str]  # (region, service, instance_id)


def instance_key(instance: Any) -> InstanceKey:
    return (instance.region, instance.service, instance.instance_id)


class Watcher:
    """Reads a Lookup.Watch stream in the background and folds it into state the way a client
    must: SNAPSHOT parts (``more``) replace the state once complete, CHANGES apply in order.

    ``await watcher.until(lambda w: ..., timeout)`` waits for a condition on the folded state
    (or on ``messages``) without sleeping.
    """

    def __init__(self, call: Any) -> None:
        self.call = call
        self.messages: list[Any] = []
        self.state: dict[InstanceKey, Any] = {}
        self.revision = 0
        self.stale = False
        self.snapshots = 0
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = asyncio.Event()
        self._partial: dict[InstanceKey, Any] | None = None
        self._progress = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    @property
    def changes(self) -> list[Any]:
        """Every Change received, in the order received."""
        return [c for m in self.messages for c in m.changes]

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self._fold(message)
                self.messages.append(message)
                self._progress.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self.ended.set()
            self._progress.set()

    def _fold(self, message: Any) -> None:
        kind = lookup_pb2.WatchResponse
        if message.kind == kind.SNAPSHOT:
            if self._partial is None:
                self._partial = {}
            for instance in message.instances:
                self._partial[instance_key(instance)] = instance
            if not message.more:
                self.state, self._partial = self._partial, None
                self.snapshots += 1
        elif message.kind == kind.CHANGES:
            for change in message.changes:
                key = (change.region, change.service, change.instance_id)
                if change.kind == types_pb2.Change.DELETE:
                    self.state.pop(key, None)
                else:
                    self.state[key] = change.instance
        self.revision = message.revision
        self.stale = message.stale

    async def until(self, predicate: Callable[[Watcher], object], timeout: float = 10.0) -> None:
        """Wait until ``predicate(self)`` holds; AssertionError after ``timeout`` or at stream end."""

        def ended() -> str | None:
            return f"the watch ended ({self.error!r})" if self.ended.is_set() else None

        await until_progress(lambda: predicate(self), self._progress, ended, self.summary, timeout)

    def summary(self) -> str:
        kinds = [lookup_pb2.WatchResponse.Kind.Name(m.kind) for m in self.messages[-5:]]
        return (
            f"{len(self.messages)} messages (last kinds {kinds}), revision {self.revision}, "
            f"stale {self.stale}, {len(self.state)} instances"
        )

    async def close(self) -> None:
        self.call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def watch(lookup: Any, service: str = "", since_revision: int = 0, timeout: float = 60.0) -> Watcher:
    """Open a Watch (bounded by ``timeout``) and read it in the background."""
    request = lookup_pb2.WatchRequest(service=service, since_revision=since_revision)
    return Watcher(lookup.Watch(request, timeout=timeout))


def serve_help_config() -> str:
    """The config file ``discovery serve --help`` shows (the block after "config file")."""
    from discovery.cli.serve import SERVE_EXAMPLES  # the CLI only where a test asks for it

    lines = SERVE_EXAMPLES.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("config file")) + 1
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line)
    return "\n".join(block)
