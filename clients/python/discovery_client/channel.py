"""gRPC channels to a service that follow its endpoints.

grpcio (Python) has no public API for a custom name resolver, so the channel is rebuilt
instead: each endpoint set becomes one channel with an ``ipv4:a:p,b:p`` target and the
``round_robin`` policy, and the wrapper swaps it in when the set changes. Stubs built on the
wrapper keep working: their method objects look up the current channel on every call. The
replaced channel is closed after ``channel_drain_seconds`` (grpc.aio: its in-flight calls
get that long to finish; sync: it is closed then).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from discovery_client.model import Endpoint, Resolution

log = logging.getLogger(__name__)

LB_OPTIONS = [("grpc.lb_policy_name", "round_robin")]


class _Following:
    """A multicallable bound to whichever channel is current when it is called."""

    __slots__ = ("_args", "_current", "_generation", "_kind", "_kwargs", "_owner")

    def __init__(self, owner: _ServiceChannel, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._owner, self._kind, self._args, self._kwargs = owner, kind, args, kwargs
        self._generation = -1
        self._current: Any = None

    def _target(self) -> Any:
        owner = self._owner
        if self._generation != owner.generation:
            self._current = getattr(owner.current, self._kind)(*self._args, **self._kwargs)
            self._generation = owner.generation
        return self._current

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._target()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # with_call, future (sync stubs)
        return getattr(self._target(), name)


class _ServiceChannel:
    """What both channel flavours share: the current channel and the swap."""

    def __init__(self, service: str, build: Callable[[str], Any]) -> None:
        self.service = service
        self._build = build
        self.current: Any = None
        self.target = ""
        self.generation = 0
        self.closed = False
        self._detach: Callable[[], Any] = lambda: None  # set by the client: stop following

    def unary_unary(self, *args: Any, **kwargs: Any) -> _Following:
        return _Following(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> _Following:
        return _Following(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> _Following:
        return _Following(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> _Following:
        return _Following(self, "stream_stream", args, kwargs)

    def __getattr__(self, name: str) -> Any:  # get_state, channel_ready, subscribe, ...
        if name.startswith("_") or self.current is None:
            raise AttributeError(name)
        return getattr(self.current, name)

    def swap(self, target: str) -> Any:
        """Make a channel to ``target`` current; returns the replaced one (or None)."""
        if self.closed or target == self.target:
            return None
        old, self.current = self.current, self._build(target)
        self.target = target
        self.generation += 1
        log.info("discovery client: channel to %s now targets %s", self.service, target)
        return old


class AioServiceChannel(_ServiceChannel):
    """A ``grpc.aio.Channel`` to every endpoint of a service (round robin); use it as any channel."""

    async def close(self, grace: float | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        await self._detach()
        if self.current is not None:
            await self.current.close(grace)

    async def __aenter__(self) -> AioServiceChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SyncServiceChannel(_ServiceChannel):
    """A ``grpc.Channel`` to every endpoint of a service (round robin); use it as any channel."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._detach()
        if self.current is not None:
            self.current.close()

    def __enter__(self) -> SyncServiceChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChannelFeed:
    """Rebuilds ``channel`` when its service's endpoints change; runs on the client's loop.

    Args:
        channel: the wrapper to swap channels in.
        resolve: the current answer for the channel's query (from the client's cache).
        dispose: closes a replaced channel (after the drain period).
    """

    def __init__(
        self,
        channel: _ServiceChannel,
        resolve: Callable[[], Awaitable[Resolution]],
        dispose: Callable[[Any], Coroutine[Any, Any, None]],
    ) -> None:
        self._channel = channel
        self._resolve = resolve
        self._dispose = dispose
        self._dirty = False
        self._updater: asyncio.Task[None] | None = None
        self._disposing: set[asyncio.Task[None]] = set()
        self.updates = 0

    def changed(self) -> None:
        """The service's view changed (a cache listener)."""
        self._dirty = True
        if self._updater is None or self._updater.done():
            self._updater = asyncio.create_task(self._update(), name=f"discovery-channel-{self._channel.service}")

    async def _update(self) -> None:
        while self._dirty and not self._channel.closed:
            self._dirty = False
            resolution = await self._resolve()
            target = await target_for(resolution.endpoints)
            if not target:
                continue  # no endpoint left: keep the last channel rather than none
            old = self._channel.swap(target)
            self.updates += 1
            if old is not None:
                task = asyncio.create_task(self._dispose(old))
                self._disposing.add(task)
                task.add_done_callback(self._disposing.discard)

    async def close(self) -> None:
        """Stop following; replaced channels still draining are closed now."""
        tasks = [t for t in (self._updater, *self._disposing) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def target_for(endpoints: Sequence[Endpoint]) -> str:
    """A gRPC target naming every endpoint: ``ipv4:a:p,...`` (or ``ipv6:``); host names are
    resolved here, as one target cannot mix them with addresses."""
    v4: list[str] = []
    v6: list[str] = []
    for e in endpoints:
        for ip in await _addresses(e.host, e.port):
            if ip.version == 4:
                v4.append(f"{ip}:{e.port}")
            else:
                v6.append(f"[{ip}]:{e.port}")
    if not v4 and not v6:
        return ""
    return "ipv4:" + ",".join(sorted(set(v4))) if len(v4) >= len(v6) else "ipv6:" + ",".join(sorted(set(v6)))


async def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("discovery client: cannot resolve endpoint host %s: %s", host, exc)
        return []
    return [ipaddress.ip_address(info[4][0]) for info in infos]
