"""Registering this process's instance: register (on the client's session, or with a lease of
its own), keep the lease alive over the Heartbeat stream, register again after losing it,
drain and deregister on exit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from discovery_client.errors import DiscoveryClientError, NotFound, Unavailable
from discovery_client.keepalive import LeaseKeeper
from discovery_client.model import Status
from discovery_client.servers import ServerPool
from discovery_client.session import ClientSession
from discovery_pb.v1 import registry_pb2 as pb
from discovery_pb.v1 import types_pb2

log = logging.getLogger(__name__)


def instance_message(
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
    check: types_pb2.HealthCheck | None = None,
) -> types_pb2.Instance:
    """The Instance a Register call sends; zero values are the server's defaults (an id derived
    from the address, weight 100, SERVING). ``check``: an active health check
    (``discovery_client.check``), run by the servers of the region."""
    return types_pb2.Instance(
        service=service,
        address=address,
        instance_id=instance_id,
        zone=zone,
        tags=list(tags),
        metadata=dict(metadata or {}),
        weight=weight,
        version=version,
        ttl_seconds=ttl,
        status=types_pb2.Status.ValueType(int(status) if status is not None else 0),
        check=check,
    )


class Registration:
    """``async with client.register(...) as reg``: the instance is registered (in this
    region only: an instance belongs to the region it runs in) for the body of the block.

    A leased instance is attached to the client's session (``ClientSession``: one lease and
    one Heartbeat stream for all of the client's instances) unless sessions are off or the
    server has none; then it has a lease of its own, heartbeated by a stream of its own.

    Leaving the block, in this order:

    1. registers again with status DRAINING (same instance id), so clients stop picking it
       while heartbeats keep its lease;
    2. waits ``drain_seconds`` for in-flight work and for clients' caches to catch up;
    3. stops the heartbeats (of its own lease; a session's go on for the others);
    4. deregisters (a lost lease or an unknown instance is fine: it is gone either way;
       with no server answering, the lease expires by itself, and ``deregister_error``
       says why it was not removed at once).

    Attributes:
        instance_id, lease_id, revision, ttl_seconds: from the latest Register (on a
            session, ``lease_id`` is the session's id and ``ttl_seconds`` its TTL).
        session_id: the session it is attached to; 0 for a lease of its own or static.
        status: the status last registered.
        registrations: how many times it was registered (> 1 after a lease loss or drain).
        heartbeats: heartbeats the server acknowledged for its lease (the session's).
        lease_losses: how many times the server said the lease (or session) was gone.
        deregister_error: after leaving, the error that kept the deregistration from being
            acknowledged, or None.
    """

    def __init__(
        self, pool: ServerPool, instance: Any, *, drain_seconds: float, session: ClientSession | None = None
    ) -> None:
        self._pool = pool
        self._instance = instance
        self._drain = drain_seconds
        self._session = session if instance.ttl_seconds else None
        self.instance_id = instance.instance_id
        self.lease_id = 0
        self.session_id = 0
        self.revision = 0
        self.ttl_seconds = instance.ttl_seconds
        self.status = Status(instance.status or Status.SERVING)
        self.registrations = 0
        self.lease_losses = 0
        self.deregister_error: DiscoveryClientError | None = None
        self._lock = asyncio.Lock()
        self._own: LeaseKeeper | None = None  # heartbeats of a lease of its own
        self._closed = False

    @property
    def service(self) -> str:
        return str(self._instance.service)

    @property
    def heartbeats(self) -> int:
        if self._own is not None:
            return self._own.heartbeats
        return self._session.heartbeats if self._session is not None else 0

    async def __aenter__(self) -> Registration:
        await self._register()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def set_status(self, status: Status) -> None:
        """Register again with ``status`` (same instance id)."""
        self.status = Status(status)
        await self._register()

    async def close(self) -> None:
        """Drain, then deregister (the order is in the class docstring); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._drain > 0:
                try:
                    await self.set_status(Status.DRAINING)
                except DiscoveryClientError as exc:
                    log.warning("discovery client: could not mark %s DRAINING: %s", self.instance_id, exc)
                await asyncio.sleep(self._drain)  # the drain period itself
        finally:
            if self._own is not None:
                await self._own.stop()
            await self._leave()

    async def _leave(self) -> None:
        session = self._session
        if session is not None and session.members.get(id(self)) is self:
            try:
                # Not while the session is being replaced: its batch would bring this back.
                async with session.use():
                    session.members.pop(id(self), None)
                    await self._deregister()
                return
            except Unavailable:  # the client is closing
                session.members.pop(id(self), None)
        await self._deregister()

    async def _deregister(self) -> None:
        request = pb.DeregisterRequest(service=self.service, instance_id=self.instance_id)
        try:
            await self._pool.call(lambda s: s.registry.Deregister, request, home_only=True)
        except NotFound:
            pass
        except DiscoveryClientError as exc:
            self.deregister_error = exc
            log.warning("discovery client: could not deregister %s (its lease will expire): %s", self.instance_id, exc)

    def message(self) -> types_pb2.Instance:
        """The Instance to register now (its id, once assigned, and current status)."""
        instance = types_pb2.Instance()
        instance.CopyFrom(self._instance)
        instance.instance_id = self.instance_id
        instance.status = types_pb2.Status.ValueType(int(self.status))
        return instance

    async def _register(self) -> None:
        async with self._lock:
            while True:
                session = self._session
                if session is None or not await session.ensure(self._instance.ttl_seconds):
                    await self._register_alone()
                    return
                lost = 0
                async with session.use() as session_id:
                    if session_id:
                        try:
                            resp = await self._call(session_id)
                        except NotFound:  # the session is gone: the only NOT_FOUND of Register
                            lost = session_id
                        else:
                            session.members[id(self)] = self
                            self.registered(resp)
                            return
                if lost:
                    await session.lost(lost)
                # else: the server has no sessions any more (a rolling downgrade)

    async def _register_alone(self) -> None:
        self._session = None
        self.registered(await self._call(0))
        if self.ttl_seconds and self._own is None:
            self._start_own()

    async def _call(self, session_id: int) -> Any:
        request = pb.RegisterRequest(instance=self.message(), session_id=session_id)
        resp, _ = await self._pool.call(lambda s: s.registry.Register, request, home_only=True)
        return resp

    def registered(self, resp: Any, *, lost: bool = False) -> None:
        """A Register (or a session's RegisterBatch, after losing the session: ``lost``) succeeded."""
        self.instance_id, self.lease_id, self.revision = resp.instance_id, resp.lease_id, resp.revision
        self.ttl_seconds = resp.ttl_seconds
        self.session_id = resp.lease_id if self._session is not None else 0
        self.registrations += 1
        self.lease_losses += int(lost)
        if self._own is not None and resp.lease_id:
            self._own.renewed(resp.ttl_seconds)  # a new lease: heartbeat it now

    async def register_on(self, session_id: int) -> None:
        """Register on ``session_id`` at once, outside the lock (a session's recovery, when
        its batch was refused); a failure is logged."""
        try:
            self.registered(await self._call(session_id), lost=True)
        except DiscoveryClientError as exc:
            log.warning("discovery client: could not register %s again: %s", self.instance_id, exc)

    def leave_session(self) -> None:
        """The server has no sessions any more: keep a lease of its own (the heartbeat of the
        old session's id fails at once, and the instance is registered again alone)."""
        self._session = None
        if not self._closed:
            self._start_own()

    def _start_own(self) -> None:
        self._own = LeaseKeeper(self._pool, self.instance_id, lambda: self.lease_id, self._ttl, self._lease_lost)
        self._own.renewed(self.ttl_seconds)
        self._own.start()

    def _ttl(self) -> int:
        return int(self.ttl_seconds)

    async def _lease_lost(self, lease: int) -> None:
        self.lease_losses += 1
        log.warning("discovery client: lease of %s lost; registering again", self.instance_id)
        await self._register()
