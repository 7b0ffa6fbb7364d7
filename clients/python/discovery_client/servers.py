"""The configured servers: one channel each, the order they are tried in, and unary calls
that fail over from server to server and region to region."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from discovery_client.config import ClientConfig
from discovery_client.errors import (
    DiscoveryClientError,
    ResourceExhausted,
    Unavailable,
    Unreachable,
    from_rpc_error,
    is_retryable,
)
from discovery_pb.v1 import admin_pb2_grpc, lookup_pb2_grpc, registry_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerEntry:
    region: str
    address: str
    home: bool  # a server of the client's own region
    index: int  # position in the configured order


class Stubs:
    __slots__ = ("admin", "channel", "lookup", "registry")

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.lookup = lookup_pb2_grpc.LookupStub(channel)
        self.registry = registry_pb2_grpc.RegistryStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)


def channel_options(keepalive_seconds: float) -> list[tuple[str, int]]:
    ms = int(keepalive_seconds * 1000)
    return [
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", ms),
        # What actually bounds the wait for a ping's answer in current gRPC: without it a
        # SIGSTOPped server goes unnoticed on an open stream.
        ("grpc.http2.ping_timeout_ms", ms),
        # Keep pinging while a Watch is open and idle; by default gRPC stops after two pings.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),  # servers allow it (every 1 s at most)
        # Reconnect within a second or two of a server coming back, not after gRPC's default
        # backoff that grows to two minutes while it is down.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 1000),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


class ServerPool:
    """Every configured server in order: this region's, then each failover region's.

    The server that last answered is remembered and tried first; the others follow in the
    configured order, so a failing server costs one attempt, not one per call.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        entries = [ServerEntry(config.region, a, True, 0) for a in config.servers]
        for other in config.failover:
            entries += [ServerEntry(other.region, a, False, 0) for a in other.servers]
        self.entries = tuple(ServerEntry(e.region, e.address, e.home, i) for i, e in enumerate(entries))
        self.preferred = self.entries[0]
        self._stubs: dict[str, Stubs] = {}
        self._options = channel_options(config.keepalive_seconds)
        self._closed = False
        self._retired: set[asyncio.Task[None]] = set()

    def stubs(self, entry: ServerEntry) -> Stubs:
        stubs = self._stubs.get(entry.address)
        if stubs is None:
            if self._closed:
                raise Unavailable("the client is closed")
            stubs = Stubs(self.config.tls.aio_channel(entry.address, options=self._options))
            self._stubs[entry.address] = stubs
        return stubs

    def error(self, exc: Any, entry: ServerEntry, stubs: Stubs) -> DiscoveryClientError:
        """The client exception for a failed call to ``entry`` over ``stubs``. A TLS channel
        that could not connect is replaced: the next one reads the certificate files again,
        so a client whose certificate was rotated on disk (or was refused) recovers."""
        error = from_rpc_error(exc, entry.address, stubs.channel, self.config.tls)
        if isinstance(error, Unreachable) and self.config.tls.enabled and self._stubs.get(entry.address) is stubs:
            del self._stubs[entry.address]
            task = asyncio.create_task(stubs.channel.close())
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        return error

    def order(self, *, home_only: bool = False, last: ServerEntry | None = None) -> list[ServerEntry]:
        """Servers to try, the remembered one first (``last`` moved to the end)."""
        rest = [e for e in self.entries if e is not self.preferred]
        out = [self.preferred, *rest]
        if home_only:
            out = [e for e in out if e.home]
        if last is not None and last in out:
            out.remove(last)
            out.append(last)
        return out

    def answered(self, entry: ServerEntry) -> None:
        if entry is not self.preferred:
            log.info("discovery client: now using %s (region %s)", entry.address, entry.region)
            self.preferred = entry

    async def call(
        self,
        method: Callable[[Stubs], Any],
        request: Any,
        *,
        home_only: bool = False,
        last: ServerEntry | None = None,
        deadline: float | None = None,
    ) -> tuple[Any, ServerEntry]:
        """Call ``method(stubs)(request)`` on each server in turn, passes with backoff in
        between, until one answers; returns (response, the server that answered).

        Raises:
            Unavailable: no server answered within the retry policy's attempts and deadline
                (``Unreachable`` when no attempt even connected); ``code``, ``details`` and
                ``server`` are the last attempt's.
            DiscoveryClientError: a server answered with a non-retryable status.
        """
        loop = asyncio.get_running_loop()
        policy = self.config.retry
        end = loop.time() + (policy.deadline if deadline is None else deadline)
        errors: list[DiscoveryClientError] = []
        for attempt in range(policy.attempts):
            wait = 0.0  # at least this long before the next pass: a server's retry-after
            for entry in self.order(home_only=home_only, last=last):
                remaining = end - loop.time()
                if remaining <= 0:
                    break
                stubs = self.stubs(entry)
                try:
                    response = await method(stubs)(request, timeout=min(self.config.call_timeout, remaining))
                except grpc.aio.AioRpcError as exc:
                    error = self.error(exc, entry, stubs)
                    if isinstance(error, ResourceExhausted):
                        after = policy.retry_after(error, end - loop.time())
                        if after is None or attempt == policy.attempts - 1:
                            raise error from exc
                        errors.append(error)
                        # Jittered, so clients refused together come back spread out; never
                        # so long that no attempt fits in the deadline after it.
                        spread = end - loop.time() - self.config.call_timeout
                        wait = max(after, min(policy.after_refusal(after), spread))
                        break  # over a limit of this identity: wait as told, not at the next server
                    if not is_retryable(exc):
                        raise error from exc
                    errors.append(error)
                    continue
                self.answered(entry)
                return response, entry
            remaining = end - loop.time()
            if remaining <= 0 or attempt == policy.attempts - 1:
                break
            await asyncio.sleep(min(max(wait, policy.delay(attempt)), remaining))
        tried = "; ".join(f"{e.server}: {e.code.name if e.code else '?'}" for e in errors[-4:])
        message = f"no discovery server answered ({tried or 'deadline reached'})"
        if not errors:
            raise Unavailable(message)
        if isinstance(errors[-1], ResourceExhausted):
            raise errors[-1]
        cls = Unreachable if all(isinstance(e, Unreachable) for e in errors) else Unavailable
        final = errors[-1]
        hint = next((e.hint for e in reversed(errors) if e.hint), "")
        raise cls(
            message, code=final.code, details=final.details, server=final.server, attempts=tuple(errors), hint=hint
        )

    async def home_answers(self, request: Any) -> ServerEntry | None:
        """A server of this region that answers ``request`` (a ResolveRequest) now, if any."""
        for entry in self.order(home_only=True):
            try:
                await self.stubs(entry).lookup.Resolve(request, timeout=self.config.call_timeout)
            except grpc.aio.AioRpcError:
                continue
            return entry
        return None

    async def close(self) -> None:
        self._closed = True
        stubs, self._stubs = list(self._stubs.values()), {}
        for s in stubs:
            await s.channel.close()
        for task in list(self._retired):
            await task
