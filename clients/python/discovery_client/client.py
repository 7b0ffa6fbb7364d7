"""The asyncio client: resolve from a Watch-fed cache, pick, register, channels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

from discovery_client.cache import AnswerKey
from discovery_client.channel import LB_OPTIONS, AioServiceChannel, ChannelFeed, target_for
from discovery_client.config import ClientConfig
from discovery_client.errors import NoEndpoints, Unavailable
from discovery_client.filecache import FileCache
from discovery_client.model import Endpoint, Query, Resolution, Scope, Status, to_scope, to_statuses
from discovery_client.picker import Picker, Strategy
from discovery_client.registration import Registration, instance_message
from discovery_client.servers import ServerPool
from discovery_client.session import ClientSession
from discovery_client.tls import TlsConfig
from discovery_client.watch import ServiceWatch
from discovery_pb.v1.types_pb2 import HealthCheck

log = logging.getLogger(__name__)

ScopeLike = Scope | str
StatusLike = Status | str


class DiscoveryClient:
    """The discovery client for asyncio code.

    ``async with DiscoveryClient(config) as client:`` (or ``DiscoveryClient()`` to read the
    ``DISCOVERY_*`` environment). Nothing connects until the first call. Leaving the block
    closes, in this order: channels from ``grpc_channel`` stop following and close; the
    watches stop; the cache file is written a last time; the session closes (CloseSession);
    the server channels close. Registrations are context managers of their own and are left
    before that (one still open when the session closes goes with it).

    Attributes:
        session: the ``ClientSession`` leased registrations share (opened by the first of
            them), or None with ``config.sessions`` off.
    """

    def __init__(self, config: ClientConfig | None = None) -> None:
        self.config = (config or ClientConfig.from_env()).validate()
        self._pool = ServerPool(self.config)
        self.session = ClientSession(self._pool, ttl=self.config.session_ttl) if self.config.sessions else None
        self._files = (
            FileCache(self.config.cache_file, self.config.cache_file_interval) if self.config.cache_file else None
        )
        self._watches: dict[str, ServiceWatch] = {}
        self._picker = Picker(self.config.zone)
        self._feeds: list[ChannelFeed] = []
        self._channels: list[AioServiceChannel] = []
        self._closed = False

    async def __aenter__(self) -> DiscoveryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- resolve ----------------------------------------------------------------------

    async def resolve(
        self,
        service: str,
        *,
        scope: ScopeLike = Scope.FAILOVER,
        statuses: Iterable[StatusLike] | None = None,
        tags: Iterable[str] = (),
        zone: str = "",
        min_healthy: int = 1,
        timeout: float | None = None,
    ) -> Resolution:
        """The endpoints of ``service``, from the local cache.

        The first call for a service subscribes to its Watch and waits (up to ``timeout``,
        default the retry policy's deadline) for the first view; later calls are answered in
        memory. When no server answers, the last view is returned with ``stale=True``, or
        the cache file's view for a service this process has not seen yet.

        Args:
            scope: LOCAL (this region), FAILOVER (default: this region, then the failover
                regions in order until ``min_healthy`` are SERVING) or ALL.
            statuses: which statuses to include (default SERVING only).
            tags: every tag listed must be present.
            zone: only endpoints of this zone.

        Raises:
            Unavailable: no server answered and nothing is cached for the service.
            InvalidArgument: the service name (or a filter) is not valid.
        """
        key: AnswerKey = (scope, tuple(statuses) if statuses else None, tuple(tags), zone, min_healthy)
        watch = self._watches.get(service)
        if watch is not None and watch.cache.has_view:
            return watch.cache.answer(key, lambda: _query(key))
        return await self._resolve_slow(service, key, timeout)

    def cached(self, service: str, key: AnswerKey) -> Resolution | None:
        """The answer from memory alone, or None (not subscribed yet): safe from any thread."""
        watch = self._watches.get(service)
        if watch is not None and watch.cache.has_view:
            return watch.cache.answer(key, lambda: _query(key))
        return None

    async def _resolve_slow(self, service: str, key: AnswerKey, timeout: float | None) -> Resolution:
        query = _query(key)  # invalid arguments fail here, before anything connects
        watch = self._watch(service)
        wait = self.config.retry.deadline if timeout is None else timeout
        try:
            async with asyncio.timeout(wait):
                await watch.settled.wait()
        except TimeoutError:
            raise Unavailable(f"no view of {service!r} within {wait:g}s: no discovery server answered") from None
        if watch.cache.has_view:
            return watch.cache.answer(key, lambda: query)
        assert watch.error is not None
        if watch.done:  # refused for good (an invalid name): let a later call try again
            self._watches.pop(service, None)
        raise watch.error

    def _watch(self, service: str) -> ServiceWatch:
        if self._closed:
            raise Unavailable("the client is closed")
        watch = self._watches.get(service)
        if watch is None:
            watch = ServiceWatch(service, self._pool, self.config, self._files)
            self._watches[service] = watch
        return watch

    def watch_of(self, service: str) -> ServiceWatch | None:
        """The Watch feeding ``service``'s cache, for introspection (tests, metrics)."""
        return self._watches.get(service)

    # --- pick -------------------------------------------------------------------------

    async def pick(
        self,
        service: str,
        *,
        strategy: Strategy | str = Strategy.ROUND_ROBIN,
        scope: ScopeLike = Scope.FAILOVER,
        tags: Iterable[str] = (),
    ) -> Endpoint:
        """One SERVING endpoint of ``service``: in this client's zone when it has any, then
        round robin (default) or by weight.

        Raises:
            NoEndpoints: nothing to pick; Unavailable: as ``resolve``.
        """
        return self._picker.pick(await self.resolve(service, scope=scope, tags=tags), strategy)

    def pick_cached(self, resolution: Resolution, strategy: Strategy | str) -> Endpoint:
        return self._picker.pick(resolution, strategy)

    # --- register ---------------------------------------------------------------------

    def register(
        self,
        service: str,
        address: str,
        *,
        instance_id: str = "",
        zone: str | None = None,
        tags: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        weight: int = 0,
        version: str = "",
        ttl: int = 10,
        drain_seconds: float = 5.0,
        session: bool | None = None,
        check: HealthCheck | None = None,
    ) -> Registration:
        """``async with client.register("web", "10.0.0.5:8080") as reg:`` registers this
        instance in this region for the block, heartbeating its lease (``ttl`` seconds, 0 for
        a static registration) and registering again if the lease is lost; on exit it turns
        DRAINING, waits ``drain_seconds`` and deregisters. ``zone`` defaults to the config's.

        A leased instance is attached to the client's session (``session=None``: when
        ``config.sessions``; False: a lease of its own): the session's TTL applies, one
        heartbeat stream keeps all of them, and after the session is lost they all come
        back in one RegisterBatch. ``check``: an active health check (``check("tcp")``),
        run by the servers of the region; the instance serves while it passes."""
        instance = instance_message(
            service,
            address,
            instance_id=instance_id,
            zone=self.config.zone if zone is None else zone,
            tags=tags,
            metadata=metadata,
            weight=weight,
            version=version,
            ttl=ttl,
            check=check,
        )
        shared = self.session if session is not False else None
        if session and shared is None:
            shared = self.session = ClientSession(self._pool, ttl=self.config.session_ttl)
        return Registration(self._pool, instance, drain_seconds=drain_seconds, session=shared)

    # --- channels ---------------------------------------------------------------------

    async def grpc_channel(
        self,
        service: str,
        *,
        scope: ScopeLike = Scope.FAILOVER,
        tags: Iterable[str] = (),
        zone: str = "",
        options: Sequence[tuple[str, Any]] = (),
        tls: TlsConfig | None = None,
    ) -> AioServiceChannel:
        """A ``grpc.aio`` channel to the SERVING endpoints of ``service``, load-balanced round
        robin, that follows endpoint changes by itself. Close it (or ``async with`` it).

        The endpoints are your service's, not discovery servers: their security is theirs.
        ``tls`` secures the channel (``client.config.tls`` dials them with this client's
        certificate; files are read again whenever the channel is rebuilt); None: plaintext.

        Raises:
            NoEndpoints: the service has no endpoint now. Unavailable: as ``resolve``.
        """
        opts = [*LB_OPTIONS, *options]
        dial = tls.validate() if tls is not None else TlsConfig(insecure=True)
        channel = AioServiceChannel(service, lambda target: dial.aio_channel(target, options=opts))
        drain = self.config.channel_drain_seconds

        async def dispose(old: Any) -> None:
            try:
                await asyncio.sleep(drain)
            finally:
                await old.close()

        await self._attach(channel, service, (scope, tuple(tags), zone), dispose)
        self._channels.append(channel)
        return channel

    async def _attach(
        self,
        channel: Any,
        service: str,
        query: tuple[ScopeLike, tuple[str, ...], str],
        dispose: Callable[[Any], Coroutine[Any, Any, None]],
    ) -> None:
        """Point ``channel`` at ``service``'s endpoints now and on every change."""
        scope, tags, zone = query

        async def current() -> Resolution:
            return await self.resolve(service, scope=scope, tags=tags, zone=zone)

        target = await target_for((await current()).endpoints)
        if not target:
            raise NoEndpoints(f"{service!r} has no endpoint to connect to")
        channel.swap(target)
        feed = ChannelFeed(channel, current, dispose)
        listeners = self._watches[service].cache.listeners
        listeners.append(feed.changed)
        self._feeds.append(feed)

        async def detach() -> None:
            with contextlib.suppress(ValueError):
                listeners.remove(feed.changed)
            with contextlib.suppress(ValueError):
                self._feeds.remove(feed)
            await feed.close()

        channel._detach = detach

    # --- lifecycle --------------------------------------------------------------------

    async def close(self) -> None:
        """Close in the order the class docstring lists; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for channel in self._channels:
            await channel.close()
        for feed in list(self._feeds):
            await feed.close()
        self._feeds.clear()
        for watch in list(self._watches.values()):
            await watch.close()
        self._watches.clear()
        if self._files is not None:
            await self._files.close()
        if self.session is not None:
            await self.session.close()
        await self._pool.close()


def _query(key: AnswerKey) -> Query:
    scope, statuses, tags, zone, min_healthy = key
    return Query(
        scope=to_scope(scope),
        statuses=to_statuses(statuses),
        tags=frozenset(tags),
        zone=zone,
        min_healthy=min_healthy,
    )
