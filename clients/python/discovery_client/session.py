"""One session per client: one lease, kept by one Heartbeat stream, for every leased instance
the client registers; after losing it, a new session and ONE RegisterBatch (per 1,000
instances) brings them all back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from discovery_client.errors import DiscoveryClientError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from discovery_client.keepalive import LeaseKeeper
from discovery_client.servers import ServerPool
from discovery_pb.v1 import registry_pb2 as pb

if TYPE_CHECKING:
    from discovery_client.registration import Registration

log = logging.getLogger(__name__)

DEFAULT_TTL = 10  # seconds: a session's TTL when neither the config nor its first registration says
BATCH = 1000  # instances per RegisterBatch (the server's limit)


def default_name() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def unimplemented(exc: DiscoveryClientError) -> bool:
    """An old server (a rolling upgrade): it has no sessions."""
    return bool(exc.code == grpc.StatusCode.UNIMPLEMENTED)


class ClientSession:
    """The session of one client (``DiscoveryClient`` or ``DirectClient``), opened by its first
    leased registration.

    Registrations attach to it (``use``); its lease is heartbeated by one stream whatever
    their number. When the server says it is gone, a new one is opened (backing off with
    jitter while servers refuse or are down, until it succeeds or the client closes) and
    every attached registration is registered again with RegisterBatch, 1,000 per call, with
    its current status. A server without sessions (UNIMPLEMENTED) turns every registration
    into one with a lease of its own.

    Attributes:
        session_id, ttl_seconds: the current session (0 before the first is opened).
        supported: None until the first OpenSession; False when the server has no sessions.
        opened: sessions opened; losses: sessions lost; batches: RegisterBatch calls that succeeded.
    """

    def __init__(self, pool: ServerPool, *, ttl: int = 0, name: str = "") -> None:
        self._pool = pool
        self._ttl = ttl
        self.name = name or default_name()
        self.session_id = 0
        self.ttl_seconds = 0
        self.supported: bool | None = None
        self.opened = 0
        self.losses = 0
        self.batches = 0
        self.members: dict[int, Registration] = {}  # by id(): registrations attached now
        self.keeper = LeaseKeeper(pool, f"session of {self.name}", lambda: self.session_id, self._lease_ttl, self._lost)
        self._open_lock = asyncio.Lock()
        self._ready = asyncio.Event()  # set: the session may be used (not being replaced)
        self._fresh = asyncio.Event()  # set: a session that is not known to be lost exists
        self._idle = asyncio.Event()  # set: no registration is using the session
        self._idle.set()
        self._inflight = 0
        self._recovery: asyncio.Task[None] | None = None
        self._closed = False

    def _lease_ttl(self) -> int:
        return self.ttl_seconds

    @property
    def heartbeats(self) -> int:
        return self.keeper.heartbeats

    # --- used by registrations --------------------------------------------------------

    async def ensure(self, ttl: int) -> bool:
        """Open the session if none was yet (TTL: the config's, else ``ttl``); False when the
        server has no sessions (use a lease of its own)."""
        if self.supported is not None:
            return self.supported
        async with self._open_lock:
            if self.supported is None:
                if self._closed:
                    raise Unavailable("the client is closed")
                try:
                    await self._open(self._ttl or ttl or DEFAULT_TTL)
                except InvalidArgument:
                    # The registration's TTL, out of range: its own Register says so, in its terms.
                    return False
                except DiscoveryClientError as exc:
                    if not unimplemented(exc):
                        raise
                    log.info("discovery client: %s has no sessions: a lease per instance", exc.server)
                    self.supported = False
                    return False
                self.supported = True
                self._ready.set()
                self.keeper.start()
        return self.supported

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[int]:
        """The session id to register with, kept from being replaced meanwhile; 0 when the
        server turned out to have no sessions."""
        while not self._ready.is_set():
            if self._closed:
                raise Unavailable("the client is closed")
            await self._ready.wait()
        if self._closed:
            raise Unavailable("the client is closed")
        self._inflight += 1
        self._idle.clear()
        try:
            yield self.session_id if self.supported else 0
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def lost(self, session_id: int) -> None:
        """A call said ``session_id`` is gone: replace it (once) and wait until that is done."""
        self._start_recovery(session_id)
        while not self._ready.is_set() and not self._closed:
            await self._ready.wait()

    # --- keeping it -------------------------------------------------------------------

    async def _open(self, ttl: int) -> None:
        request = pb.OpenSessionRequest(ttl_seconds=ttl, name=self.name)
        resp, _ = await self._pool.call(lambda s: s.registry.OpenSession, request, home_only=True)
        self.session_id, self.ttl_seconds = resp.session_id, resp.ttl_seconds
        self.opened += 1
        self._fresh.set()
        self.keeper.renewed(resp.ttl_seconds)
        log.info("discovery client: session %x opened (ttl %ss)", self.session_id, self.ttl_seconds)

    async def _lost(self, lease: int) -> None:
        """The heartbeat stream's NOT_FOUND: recover, and return once a new session exists
        (heartbeats then keep it while its instances are registered again)."""
        self._start_recovery(lease)
        while not self._fresh.is_set() and not self._closed:
            await self._fresh.wait()
        if self._closed or not self.supported:
            await asyncio.Event().wait()  # nothing to heartbeat: stopped by close()

    def _start_recovery(self, lost: int) -> None:
        if self._closed or lost != self.session_id or self._recovery is not None:
            return
        self.losses += 1
        self._ready.clear()
        self._fresh.clear()
        log.warning("discovery client: session %x lost: opening another, registering %d instances again",
                    lost, len(self.members))  # fmt: skip
        self._recovery = asyncio.create_task(self._recover(lost), name="discovery-session-recovery")

    async def _recover(self, lost: int) -> None:
        try:
            await self._idle.wait()  # registrations in flight on the old session finish first
            pending: list[Registration] | None = None
            attempt = 0
            while not self._closed:
                told = 0.0
                try:
                    if self.session_id == lost:
                        await self._open(self.ttl_seconds)
                        pending = None
                    if pending is None:
                        pending = list(self.members.values())
                    pending = await self._reregister(pending)
                    return
                except NotFound:  # the new session expired meanwhile
                    lost = self.session_id
                    self._fresh.clear()
                except DiscoveryClientError as exc:
                    if unimplemented(exc):
                        self._no_sessions()
                        return
                    log.warning("discovery client: session recovery: %s", exc)
                    told = exc.retry_after if isinstance(exc, ResourceExhausted) else 0.0
                await asyncio.sleep(self._pool.config.retry.after_refusal(told, attempt))
                attempt += 1
        finally:
            self._recovery = None
            self._ready.set()

    async def _reregister(self, pending: list[Registration]) -> list[Registration]:
        """Register ``pending`` again on the session, BATCH per call; raises with what is
        left in ``pending`` (done chunks removed) when a call fails for a reason to retry."""
        while pending:
            chunk = pending[:BATCH]
            request = pb.RegisterBatchRequest(instances=[r.message() for r in chunk], session_id=self.session_id)
            try:
                resp, _ = await self._pool.call(lambda s: s.registry.RegisterBatch, request, home_only=True)
            except (Unavailable, ResourceExhausted, NotFound):
                raise
            except DiscoveryClientError as exc:
                if unimplemented(exc):
                    raise
                # Refused for good (an instance another identity owns now, ...): one at a time,
                # so the others are not held back by it.
                log.warning("discovery client: batch refused (%s): registering one at a time", exc)
                for registration in chunk:
                    await registration.register_on(self.session_id)
                del pending[: len(chunk)]
                continue
            self.batches += 1
            for registration, result in zip(chunk, resp.results, strict=False):
                registration.registered(result, lost=True)
            del pending[: len(chunk)]
        return pending

    def _no_sessions(self) -> None:
        """The server (now) has none: every registration takes a lease of its own."""
        log.warning("discovery client: the server has no sessions any more: a lease per instance")
        self.supported = False
        self.session_id = 0
        self._fresh.set()
        for registration in list(self.members.values()):
            registration.leave_session()
        self.members.clear()

    # --- lifecycle --------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the heartbeats and close the session (its instances, if any left, go)."""
        if self._closed:
            return
        self._closed = True
        self._ready.set()
        self._fresh.set()
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        await self.keeper.stop()
        if self.supported and self.session_id:
            request = pb.CloseSessionRequest(session_id=self.session_id)
            try:
                await self._pool.call(lambda s: s.registry.CloseSession, request, home_only=True)
            except NotFound:
                pass
            except DiscoveryClientError as exc:
                log.warning("discovery client: could not close session %x (it will expire): %s", self.session_id, exc)
