"""Keeping one lease alive over one Heartbeat stream: a session's (every instance attached to
it) or a registration's own. Used by ``Registration`` and ``ClientSession``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from discovery_client.errors import (
    DiscoveryClientError,
    ResourceExhausted,
    from_rpc_error,
    is_lost_status,
    is_retryable,
)
from discovery_client.servers import ServerPool
from discovery_pb.v1 import registry_pb2 as pb

log = logging.getLogger(__name__)

MIN_WAIT = 0.05  # seconds: the shortest pause between two heartbeat streams


class LeaseLost(Exception):
    def __init__(self, lease: int) -> None:
        super().__init__(f"lease {lease} is gone")
        self.lease = lease


class StreamBroken(Exception):
    pass


class LeaseKeeper:
    """Heartbeats ``lease()`` every ``ttl()/3`` seconds over one stream, on another server of
    the region when it breaks, and calls ``on_lost(lease)`` when the server says the lease is
    gone (it registers again, or opens a new session).

    Refused (RESOURCE_EXHAUSTED, ``retry-after-ms``): waits the server's retry-after with
    jitter (``RetryPolicy.after_refusal``), but never past the moment the lease would expire
    less one ``call_timeout``: while a heartbeat still fits in the TTL, one is sent.

    Attributes:
        heartbeats: heartbeats the server acknowledged.
        refusals: heartbeat streams a server refused with RESOURCE_EXHAUSTED.
        streams: Heartbeat streams opened.
        changed: set it to heartbeat now (a new lease).
    """

    def __init__(
        self,
        pool: ServerPool,
        name: str,
        lease: Callable[[], int],
        ttl: Callable[[], int],
        on_lost: Callable[[int], Awaitable[None]],
    ) -> None:
        self._pool = pool
        self._name = name
        self._lease = lease
        self._ttl = ttl
        self._on_lost = on_lost
        self.heartbeats = 0
        self.refusals = 0
        self.streams = 0
        self.changed = asyncio.Event()
        self._expires: float | None = None  # loop time the lease expires at, as last acknowledged
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"discovery-heartbeat-{self._name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def renewed(self, ttl: float) -> None:
        """A Register or OpenSession just (re)started the lease: ``ttl`` seconds from now."""
        self._expires = asyncio.get_running_loop().time() + ttl
        self.changed.set()

    async def _run(self) -> None:
        attempt = 0
        while True:
            beats = self.heartbeats
            told = 0.0  # a server's retry-after
            try:
                await self._heartbeat_any()
            except LeaseLost as lost:
                log.warning("discovery client: lease of %s lost", self._name)
                try:
                    await self._on_lost(lost.lease)
                    attempt = 0
                    continue
                except DiscoveryClientError as exc:
                    log.warning("discovery client: %s: could not register again: %s", self._name, exc)
                    if isinstance(exc, ResourceExhausted):
                        told = exc.retry_after
            except (StreamBroken, DiscoveryClientError) as exc:
                log.info("discovery client: heartbeats of %s interrupted: %s", self._name, exc)
                if isinstance(exc, ResourceExhausted):
                    self.refusals += 1
                    told = exc.retry_after
            if self.heartbeats > beats:
                attempt = 0
            await asyncio.sleep(self.wait(told, attempt))
            attempt += 1

    def wait(self, told: float, attempt: int) -> float:
        """The pause before the next stream: the backoff (jittered retry-after when refused),
        cut short so that a heartbeat still reaches the server before the lease expires."""
        wait = self._pool.config.retry.after_refusal(told, attempt)
        if self._expires is not None:
            left = self._expires - asyncio.get_running_loop().time()
            if left > 0:  # else it has expired already: no hurry
                wait = min(wait, left - self._pool.config.call_timeout)
        return max(MIN_WAIT, wait)

    async def _heartbeat_any(self) -> None:
        reasons = []
        for entry in self._pool.order(home_only=True):
            try:
                await self._heartbeat(self._pool.stubs(entry).registry, entry.address)
            except StreamBroken as exc:
                reasons.append(str(exc))
        raise StreamBroken("; ".join(reasons) or "no server of this region configured")

    async def _heartbeat(self, registry: Any, address: str) -> None:
        """Heartbeat over one stream until it breaks (StreamBroken) or the lease is gone (LeaseLost)."""
        config = self._pool.config
        call = registry.Heartbeat(timeout=config.stream_max_seconds)
        self.streams += 1
        loop = asyncio.get_running_loop()
        try:
            while True:
                lease = self._lease()
                self.changed.clear()
                sent = loop.time()
                try:
                    async with asyncio.timeout(config.call_timeout):
                        await call.write(pb.HeartbeatRequest(lease_id=lease))
                        answer = await call.read()
                except TimeoutError:
                    raise StreamBroken(f"{address} did not answer a heartbeat in {config.call_timeout:g}s") from None
                except grpc.aio.AioRpcError as exc:
                    self._raise_for(exc, lease, address)
                except asyncio.InvalidStateError:  # written after the server ended the stream
                    answer = grpc.aio.EOF
                if answer is grpc.aio.EOF:
                    self._raise_for(await _status(call), lease, address)
                self.heartbeats += 1
                if answer.ttl_seconds > 0 and lease == self._lease():
                    self._expires = sent + answer.ttl_seconds
                interval = max(0.2, self._ttl() / 3)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self.changed.wait()
        finally:
            call.cancel()

    def _raise_for(self, exc: Any, lease: int, address: str) -> None:
        code = exc.code()
        if code == grpc.StatusCode.NOT_FOUND:
            if lease == self._lease():
                raise LeaseLost(lease) from None
            raise StreamBroken(f"{address}: an old lease ended the stream") from None  # replaced meanwhile
        if is_retryable(exc) or code == grpc.StatusCode.OK or is_lost_status(exc):
            raise StreamBroken(f"{address}: {code.name}: {exc.details()}") from None
        raise from_rpc_error(exc, address, tls=self._pool.config.tls) from None


async def _status(call: Any) -> Any:
    """The call's final status, shaped like an AioRpcError (code(), details(), trailing_metadata())."""
    async with asyncio.timeout(5):
        code = await call.code()
        details = await call.details()
        trailers = await call.trailing_metadata()

    class _Status:
        def code(self) -> Any:
            return code

        def details(self) -> str:
            return str(details)

        def trailing_metadata(self) -> Any:
            return trailers

    return _Status()
