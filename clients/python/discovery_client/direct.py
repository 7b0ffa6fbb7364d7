"""The low-level face: calls to the servers you name, without a region configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence

from discovery_client.config import ClientConfig, check_settings
from discovery_client.errors import ConfigError, DiscoveryClientError, ResourceExhausted
from discovery_client.model import Scope, Status, to_scope, to_statuses
from discovery_client.registration import Registration, instance_message
from discovery_client.retry import RetryPolicy
from discovery_client.servers import ServerPool
from discovery_client.session import ClientSession, default_name
from discovery_client.tls import TlsConfig
from discovery_client.watch import StreamBroken, follow_watch
from discovery_pb.v1 import admin_pb2, lookup_pb2, registry_pb2, types_pb2

log = logging.getLogger(__name__)


class DirectClient:
    """One call at a time to the discovery servers you name: no region configuration, no
    cache, no guard. The ``discovery`` command line is built on it.

    Each method is one RPC (``watch``: one stream, resumed when it breaks), tried on the
    servers in the order given, the one that answered last first, with ``call_timeout`` per
    attempt under the ``retry`` policy; it returns the server's response as it was sent (the
    messages of ``discovery_pb.v1``). Every failure is a ``DiscoveryClientError`` carrying the
    gRPC ``code``, ``details`` and ``server`` (``Unreachable`` when no connection could be made).

    Name the servers of one region: they share an etcd, so registrations belong there and a
    Watch broken on one server resumes from its revision on another. To resolve from a cache
    with failover between regions, use ``DiscoveryClient``.

    Args:
        servers: gRPC targets, usually ``host:port``, tried in this order.
        call_timeout: deadline of each attempt of a call (seconds).
        retry: passes over the servers, backoff between them, and the overall deadline of
            each call; a Watch uses it between passes that got no message (see ``watch``).
        keepalive_seconds, watch_idle_timeout, stream_max_seconds: as in ``ClientConfig``.
        sessions, session_ttl: as in ``ClientConfig``: the leased ``registration`` calls made
            here share one session (falling back to a lease each on a server without).
        tls: how the channels are secured; None reads the ``DISCOVERY_TLS_*`` /
            ``DISCOVERY_INSECURE`` environment (``TlsConfig.from_env``).

    Raises:
        ConfigError: a bad setting, including no TLS settings and no insecure switch.
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        *,
        call_timeout: float = 3.0,
        retry: RetryPolicy | None = None,
        keepalive_seconds: float = 2.0,
        watch_idle_timeout: float = 11.0,
        stream_max_seconds: float = 600.0,
        tls: TlsConfig | None = None,
        sessions: bool = True,
        session_ttl: int = 0,
    ) -> None:
        targets = (servers,) if isinstance(servers, str) else tuple(servers)
        if not targets or not all(t.strip() for t in targets):
            raise ConfigError(f"DirectClient needs at least one server, and no empty one: {targets!r}")
        # The pool serves a region; these servers are taken as this (unnamed) region's, so
        # every call and registration may go to any of them.
        config = ClientConfig(
            region="",
            servers=targets,
            call_timeout=call_timeout,
            retry=retry or RetryPolicy(),
            keepalive_seconds=keepalive_seconds,
            watch_idle_timeout=watch_idle_timeout,
            stream_max_seconds=stream_max_seconds,
            tls=TlsConfig.from_env() if tls is None else tls,
            sessions=sessions,
            session_ttl=session_ttl,
        )
        check_settings(config)
        self.servers = targets
        self._pool = ServerPool(config)
        self.session = ClientSession(self._pool, ttl=session_ttl) if sessions else None

    async def __aenter__(self) -> DirectClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session of the registrations (CloseSession), then the channels;
        registrations made here should be left first."""
        if self.session is not None:
            await self.session.close()
        await self._pool.close()

    # --- Registry ---------------------------------------------------------------------

    async def register(
        self,
        service: str,
        address: str,
        *,
        instance_id: str = "",
        zone: str = "",
        tags: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        weight: int = 0,
        version: str = "",
        ttl: int = 0,
        status: Status | None = None,
        session_id: int = 0,
        check: types_pb2.HealthCheck | None = None,
    ) -> registry_pb2.RegisterResponse:
        """One Register: static with ``ttl=0``; with a ``ttl`` the lease is not kept alive
        here (``registration`` does that); with a ``session_id`` (``open_session``) the
        instance is attached to that session and ``ttl`` is ignored. Zero values take the
        server's defaults (an id derived from the address, weight 100, SERVING)."""
        instance = instance_message(
            service,
            address,
            instance_id=instance_id,
            zone=zone,
            tags=tags,
            metadata=metadata,
            weight=weight,
            version=version,
            ttl=ttl,
            status=status,
            check=check,
        )
        response: registry_pb2.RegisterResponse
        response, _ = await self._pool.call(
            lambda s: s.registry.Register, registry_pb2.RegisterRequest(instance=instance, session_id=session_id)
        )
        return response

    async def open_session(self, ttl: int = 10, name: str = "") -> registry_pb2.OpenSessionResponse:
        """One OpenSession: a lease of ``ttl`` seconds for any number of instances; not kept
        alive here (heartbeat its ``session_id`` as a lease id, or use ``registration``).
        ``name`` is shown in the server's logs (default: "HOST pid PID"). A server without
        sessions raises ``ServerError`` with code UNIMPLEMENTED."""
        request = registry_pb2.OpenSessionRequest(ttl_seconds=ttl, name=name or default_name())
        response: registry_pb2.OpenSessionResponse
        response, _ = await self._pool.call(lambda s: s.registry.OpenSession, request)
        return response

    async def close_session(self, session_id: int) -> registry_pb2.CloseSessionResponse:
        """One CloseSession: the session ends now and its instances are removed (``NotFound``
        when it has expired or was closed)."""
        request = registry_pb2.CloseSessionRequest(session_id=session_id)
        response: registry_pb2.CloseSessionResponse
        response, _ = await self._pool.call(lambda s: s.registry.CloseSession, request)
        return response

    async def register_batch(
        self, instances: Sequence[types_pb2.Instance], *, session_id: int = 0
    ) -> registry_pb2.RegisterBatchResponse:
        """One RegisterBatch of at most 1,000 ``instances`` (see ``instance_message``): all
        on ``session_id``, or, with 0, static ones (a batch grants no lease per instance).
        Results come in request order; one etcd transaction per 100."""
        request = registry_pb2.RegisterBatchRequest(instances=list(instances), session_id=session_id)
        response: registry_pb2.RegisterBatchResponse
        response, _ = await self._pool.call(lambda s: s.registry.RegisterBatch, request)
        return response

    def registration(
        self,
        service: str,
        address: str,
        *,
        instance_id: str = "",
        zone: str = "",
        tags: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        weight: int = 0,
        version: str = "",
        ttl: int = 10,
        drain_seconds: float = 5.0,
        session: bool | None = None,
        check: types_pb2.HealthCheck | None = None,
    ) -> Registration:
        """``async with`` keeps the instance registered, as ``DiscoveryClient.register``: on
        this client's session (``session=False``: a lease of its own), heartbeated, registered
        again when lost; on leaving, DRAINING for ``drain_seconds``, then deregistered."""
        instance = instance_message(
            service,
            address,
            instance_id=instance_id,
            zone=zone,
            tags=tags,
            metadata=metadata,
            weight=weight,
            version=version,
            ttl=ttl,
            check=check,
        )
        shared = self.session if session is not False else None
        if session and shared is None:
            shared = self.session = ClientSession(self._pool, ttl=self._pool.config.session_ttl)
        return Registration(self._pool, instance, drain_seconds=drain_seconds, session=shared)

    async def deregister(self, service: str, instance_id: str) -> registry_pb2.DeregisterResponse:
        """One Deregister. ``NotFound`` when the server does not know the instance; with a
        retry policy of several attempts, that includes one removed by an attempt whose
        answer was lost."""
        request = registry_pb2.DeregisterRequest(service=service, instance_id=instance_id)
        response: registry_pb2.DeregisterResponse
        response, _ = await self._pool.call(lambda s: s.registry.Deregister, request)
        return response

    # --- Lookup -----------------------------------------------------------------------

    async def resolve(
        self,
        service: str,
        *,
        scope: Scope | str = Scope.LOCAL,
        statuses: Iterable[Status | str] = (),
        tags: Iterable[str] = (),
        zone: str = "",
        min_healthy: int = 1,
        min_revision: int = 0,
    ) -> lookup_pb2.ResolveResponse:
        """One Resolve, answered from the server's view (statuses: SERVING when none given).
        With ``min_revision`` the server first waits, within the call's deadline, until its
        view has reached that revision."""
        statuses = list(statuses)
        request = lookup_pb2.ResolveRequest(
            service=service,
            scope=lookup_pb2.Scope.ValueType(to_scope(scope)),
            statuses=sorted(types_pb2.Status.ValueType(s) for s in to_statuses(statuses)) if statuses else [],
            tags=list(tags),
            zone=zone,
            min_healthy=min_healthy,
            min_revision=min_revision,
        )
        response: lookup_pb2.ResolveResponse
        response, _ = await self._pool.call(lambda s: s.lookup.Resolve, request)
        return response

    async def watch(
        self,
        service: str = "",
        *,
        since_revision: int = 0,
        retry: RetryPolicy | None = None,
        on_interrupt: Callable[[DiscoveryClientError], None] | None = None,
    ) -> AsyncGenerator[lookup_pb2.WatchResponse, None]:
        """Every message of a Watch of ``service`` ("" for every service): a snapshot (or,
        from ``since_revision``, the changes after it), then changes, and KEEPALIVEs.

        A broken stream is resumed on the next server from the last revision received (the
        server sends a fresh snapshot when that revision is compacted away). A pass over
        every server that gets no message begins or continues an outage; ``on_interrupt`` is
        called with the error when one begins. Between passes the ``retry`` policy's backoff
        (default: the client's); once an outage has lasted its ``attempts`` passes or its
        ``deadline`` seconds, the last error is raised (an ``Unavailable``).

        Raises:
            Unavailable: the outage outlasted the policy.
            DiscoveryClientError: a server refused the request (``InvalidArgument``, ...).
        """
        policy = (retry or self._pool.config.retry).validate()
        loop = asyncio.get_running_loop()
        revision = since_revision
        failed_passes = 0
        outage_since: float | None = None
        while True:
            error: DiscoveryClientError | None = None
            for entry in self._pool.order():
                request = lookup_pb2.WatchRequest(service=service, since_revision=revision)
                try:
                    async with contextlib.aclosing(follow_watch(self._pool, entry, request)) as messages:
                        async for message in messages:
                            failed_passes, outage_since = 0, None
                            if message.kind != lookup_pb2.WatchResponse.SNAPSHOT or not message.more:
                                revision = message.revision
                            yield message
                except StreamBroken as exc:
                    error = exc.error
                    log.info("discovery client: watch of %r broken: %s", service, error)
                    continue
                error = None  # the stream reached stream_max_seconds: resume, from the preferred server
                break
            if error is None:
                continue
            if outage_since is None:
                outage_since = loop.time()
                if on_interrupt is not None:
                    on_interrupt(error)
            failed_passes += 1
            if failed_passes >= policy.attempts or loop.time() - outage_since >= policy.deadline:
                raise error
            told = error.retry_after if isinstance(error, ResourceExhausted) else 0.0
            await asyncio.sleep(max(told, policy.delay(failed_passes - 1)))

    # --- Admin ------------------------------------------------------------------------

    async def status(self) -> admin_pb2.StatusResponse:
        """One Status: the server's region, revision, counts, etcd health and replication."""
        response: admin_pb2.StatusResponse
        response, _ = await self._pool.call(lambda s: s.admin.Status, admin_pb2.StatusRequest())
        return response
