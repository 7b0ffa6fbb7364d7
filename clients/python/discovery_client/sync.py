"""The same client for threaded code (Flask, Django, ...): a background thread runs an
event loop with a ``DiscoveryClient`` on it; every method blocks until it has an answer.
Cached answers are read directly from the calling thread, without a trip to that loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from discovery_client.cache import AnswerKey
from discovery_client.channel import LB_OPTIONS, SyncServiceChannel
from discovery_client.client import DiscoveryClient, ScopeLike, StatusLike
from discovery_client.config import ClientConfig
from discovery_client.errors import Unavailable
from discovery_client.model import Endpoint, Resolution, Scope, Status
from discovery_client.picker import Strategy
from discovery_client.registration import Registration
from discovery_client.tls import TlsConfig
from discovery_pb.v1.types_pb2 import HealthCheck

T = TypeVar("T")


class SyncDiscoveryClient:
    """``with SyncDiscoveryClient(config) as client:`` the methods of ``DiscoveryClient``,
    blocking. ``close()`` closes the client on its loop, then stops and joins the thread."""

    def __init__(self, config: ClientConfig | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="discovery-client", daemon=True)
        self._thread.start()
        try:
            self._client = self._run(_make(config), None)
        except BaseException:
            self._stop_loop()
            raise
        self.config = self._client.config
        self._channels: list[SyncServiceChannel] = []
        self._closed = False

    def __enter__(self) -> SyncDiscoveryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncDiscoveryClient called from its own loop thread; use DiscoveryClient there")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise Unavailable(f"no answer within {timeout:g}s") from None

    def _bound(self, timeout: float | None) -> float:
        """How long to block on the loop: the call's own deadline plus a margin."""
        return (self.config.retry.deadline if timeout is None else timeout) + 5.0

    def resolve(
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
        """As ``DiscoveryClient.resolve``."""
        statuses = tuple(statuses) if statuses else None
        tags = tuple(tags)
        key: AnswerKey = (scope, statuses, tags, zone, min_healthy)
        hit = self._client.cached(service, key)
        if hit is not None:
            return hit
        coro = self._client.resolve(
            service, scope=scope, statuses=statuses, tags=tags, zone=zone, min_healthy=min_healthy, timeout=timeout
        )
        return self._run(coro, self._bound(timeout))

    def pick(
        self,
        service: str,
        *,
        strategy: Strategy | str = Strategy.ROUND_ROBIN,
        scope: ScopeLike = Scope.FAILOVER,
        tags: Iterable[str] = (),
    ) -> Endpoint:
        """As ``DiscoveryClient.pick``."""
        return self._client.pick_cached(self.resolve(service, scope=scope, tags=tags), strategy)

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
    ) -> SyncRegistration:
        """As ``DiscoveryClient.register``: ``with client.register("web", "10.0.0.5:8080") as reg:``."""
        registration = self._client.register(
            service,
            address,
            instance_id=instance_id,
            zone=zone,
            tags=tags,
            metadata=metadata,
            weight=weight,
            version=version,
            ttl=ttl,
            drain_seconds=drain_seconds,
            session=session,
            check=check,
        )
        return SyncRegistration(self, registration, drain_seconds)

    def grpc_channel(
        self,
        service: str,
        *,
        scope: ScopeLike = Scope.FAILOVER,
        tags: Iterable[str] = (),
        zone: str = "",
        options: Sequence[tuple[str, Any]] = (),
        tls: TlsConfig | None = None,
    ) -> SyncServiceChannel:
        """As ``DiscoveryClient.grpc_channel``, a blocking ``grpc.Channel``."""
        opts = [*LB_OPTIONS, *options]
        dial = tls.validate() if tls is not None else TlsConfig(insecure=True)
        channel = SyncServiceChannel(service, lambda target: dial.sync_channel(target, options=opts))
        drain = self.config.channel_drain_seconds

        async def dispose(old: Any) -> None:
            try:
                await asyncio.sleep(drain)
            finally:
                old.close()

        attach = self._client._attach(channel, service, (scope, tuple(tags), zone), dispose)
        self._run(attach, self._bound(None))
        detach = channel._detach

        def detach_sync() -> None:
            if not self._loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    self._run(detach(), 10)

        channel._detach = detach_sync
        self._channels.append(channel)
        return channel

    def close(self) -> None:
        """Close the client (as ``DiscoveryClient.close``), then stop the thread."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for channel in self._channels:
            channel.close()
        try:
            self._run(self._client.close(), 30)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class SyncRegistration:
    """``with client.register(...) as reg``: as the async ``Registration`` (its attributes
    are readable here), entered and left on the client's loop."""

    def __init__(self, client: SyncDiscoveryClient, registration: Registration, drain_seconds: float) -> None:
        self._client = client
        self.registration = registration
        self._drain = drain_seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.registration, name)

    def __enter__(self) -> SyncRegistration:
        self._client._run(self.registration.__aenter__(), self._client._bound(None))
        return self

    def __exit__(self, *exc: object) -> None:
        self._client._run(self.registration.close(), self._client._bound(None) + self._drain)

    def set_status(self, status: Status) -> None:
        self._client._run(self.registration.set_status(status), self._client._bound(None))


async def _make(config: ClientConfig | None) -> DiscoveryClient:
    return DiscoveryClient(config)  # made on the loop it will run on
