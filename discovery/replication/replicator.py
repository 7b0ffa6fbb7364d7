"""The replicator for one origin region: pull its records into the local etcd.

While this server leads the origin's election it streams ``Replication.Stream`` from one of
the origin's servers (rotating among them with backoff and jitter), applies what arrives
through a fenced ``ReplicaWriter``, and resumes after the checkpoint. It takes a snapshot
when it has none, when the origin has compacted past it, or when the origin is a different
etcd cluster or has gone back in revisions (a rebuilt origin).

Inter-region calls never sit on a request path, and a hung peer is noticed by gRPC
keep-alive and by the one-second heartbeats stopping (``silence`` seconds), not by TCP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from discovery.errors import StoreUnavailable
from discovery.keys import KeySchema
from discovery.replication.session import Fence
from discovery.replication.writer import ReplicaWriter, now_ms
from discovery.retry import RetryPolicy
from discovery.store import Store
from discovery_pb.v1 import replication_pb2 as pb
from discovery_pb.v1.replication_pb2_grpc import ReplicationStub
from discovery_pb.v1.types_pb2 import Instance

log = logging.getLogger(__name__)

_PEER_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 1_000),
    ("grpc.keepalive_timeout_ms", 1_000),
    ("grpc.http2.ping_timeout_ms", 1_000),  # what actually bounds the wait for a ping's answer
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


class _Restart(Exception):
    """Reconnect, from ``since`` (0: take a snapshot)."""


@dataclass(frozen=True, slots=True)
class ReplicationSettings:
    region: str  # the local region
    identity: str  # this server, as Status shows the leader
    silence: float = 3.0  # no message from the origin for this long: it is out of contact
    resume_grace: float = 10.0
    connect_timeout: float = 2.0


class Replicator:
    def __init__(
        self,
        origin: str,
        endpoints: Sequence[str],
        *,
        store: Store,
        keys: KeySchema,
        settings: ReplicationSettings,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.origin = origin
        self.endpoints = list(endpoints)
        self._store = store
        self._keys = keys
        self._s = settings
        self._retry = retry or RetryPolicy(base_delay=0.2, max_delay=2.0)
        self._next_endpoint = 0
        self.source = ""
        self.writer: ReplicaWriter | None = None
        self.snapshots = 0
        self._contact = pb.Checkpoint(leader=settings.identity)
        self._recovering_until = 0.0

    # --- leading ----------------------------------------------------------------------

    async def lead(self, fence: Fence) -> None:
        """Run while this server leads the origin's election (cancelled when it stops)."""
        stored = await self._store.get(self._keys.checkpoint(self.origin))
        checkpoint = pb.Checkpoint.FromString(stored.value) if stored else pb.Checkpoint(origin=self.origin)
        self._contact = pb.Checkpoint(leader=self._s.identity, last_contact_ms=checkpoint.last_contact_ms)
        writer = self.writer = ReplicaWriter(self._store, self._keys, self.origin, fence, checkpoint)
        log.info(
            "replicator %s: leading; resuming after revision %d%s",
            self.origin,
            checkpoint.revision,
            "" if checkpoint.revision else " (snapshot)",
        )
        failures = 0
        try:
            while True:
                endpoint = self.endpoints[self._next_endpoint % len(self.endpoints)]
                try:
                    await self._follow(endpoint, writer)
                except _Restart as exc:
                    log.info("replicator %s: %s", self.origin, exc)
                    continue
                except (grpc.aio.AioRpcError, TimeoutError, ConnectionError) as exc:
                    log.warning("replicator %s: lost %s (%s)", self.origin, endpoint, _why(exc, self._s.silence))
                except StoreUnavailable as exc:
                    # Our own etcd failed mid-batch: restart from what it has durably.
                    log.warning("replicator %s: local etcd: %s", self.origin, exc)
                    writer.applied = writer.checkpoint.revision
                    writer.held.clear()
                self.source = ""
                self._next_endpoint += 1
                if self._contact.last_contact_ms and now_ms() - self._contact.last_contact_ms < 1000:
                    failures = 0  # it was working: retry at once, on the next server
                await asyncio.sleep(self._retry.delay(failures))
                failures += 1
        finally:
            self.writer = None
            self.source = ""

    async def _follow(self, endpoint: str, writer: ReplicaWriter) -> None:
        since = writer.applied
        request = pb.StreamRequest(
            since_revision=since,
            origin=self.origin,
            requester=self._s.region,
            cluster_id=writer.checkpoint.cluster_id if since else 0,
        )
        async with grpc.aio.insecure_channel(endpoint, options=_PEER_CHANNEL_OPTIONS) as channel:
            call = ReplicationStub(channel).Stream(request)
            try:
                first = True
                parts: list[Instance] = []
                async for msg in _messages(call, self._s.silence):
                    if msg.origin != self.origin:
                        raise ConnectionError(f"{endpoint} is region {msg.origin!r}, not {self.origin!r}: check --peer")
                    if first:
                        self._connected(endpoint)
                        first = False
                    await self._handle(msg, writer, parts)
            finally:
                call.cancel()

    def _connected(self, endpoint: str) -> None:
        silent_ms = now_ms() - self._contact.last_contact_ms if self._contact.last_contact_ms else 0
        if silent_ms >= self._s.silence * 1000 and self._s.resume_grace > 0:
            self._recovering_until = time.monotonic() + self._s.resume_grace
            log.warning(
                "replicator %s: back after %.1fs of silence; its deletions wait %gs for re-registrations",
                self.origin,
                silent_ms / 1000,
                self._s.resume_grace,
            )
        self.source = endpoint
        self._contact.source = endpoint
        log.info("replicator %s: streaming from %s", self.origin, endpoint)

    async def _handle(self, msg: pb.StreamResponse, writer: ReplicaWriter, parts: list[Instance]) -> None:
        cp = writer.checkpoint
        snapshot = msg.kind == pb.StreamResponse.SNAPSHOT
        if cp.cluster_id and msg.cluster_id and msg.cluster_id != cp.cluster_id and not snapshot:
            writer.applied = 0
            raise _Restart(f"origin is a different etcd cluster ({msg.cluster_id:x}, was {cp.cluster_id:x}): snapshot")
        if not snapshot and msg.revision < writer.applied:
            was, writer.applied = writer.applied, 0
            raise _Restart(f"origin went back from revision {was} to {msg.revision} (rebuilt?): snapshot")
        if not msg.stale:  # a server cut off from its own etcd has nothing fresh to vouch for
            self._contact.last_contact_ms = now_ms()
        self._contact.head_revision = max(msg.revision, 0)
        hold = time.monotonic() < self._recovering_until
        if snapshot:
            parts.extend(msg.instances)
            if msg.more:
                return
            self._contact.caught_up_ms = msg.time_ms
            done = await writer.snapshot(parts, msg.revision, msg.cluster_id, hold=hold, contact=self._contact)
            self.snapshots += 1
            log.info(
                "replicator %s: snapshot at %d: %d instances, %d written, %d deleted, %d held",
                self.origin, msg.revision, len(parts), done.puts, done.deletes, done.held,
            )  # fmt: skip
            parts.clear()
        elif msg.kind == pb.StreamResponse.CHANGES:
            self._contact.caught_up_ms = msg.time_ms
            await writer.changes(msg.changes, msg.revision, hold=hold, contact=self._contact)
        else:
            self._contact.caught_up_ms = msg.time_ms
            await writer.heartbeat(msg.revision, self._contact)
        if writer.held and not hold:
            released = await writer.release(self._contact)
            log.info("replicator %s: resume grace over; applied %d held deletions", self.origin, released)


async def _messages(call: grpc.aio.UnaryStreamCall, silence: float) -> AsyncIterator[pb.StreamResponse]:
    """The stream's messages; TimeoutError when the origin is silent for ``silence`` seconds
    (it heartbeats every second: a hung peer, a black hole)."""
    while True:
        async with asyncio.timeout(silence):
            msg = await call.read()
        if msg is grpc.aio.EOF:
            raise ConnectionError("the origin ended the stream")
        yield msg


def _why(exc: BaseException, silence: float) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return f"nothing heard for {silence:g}s"
    return str(exc)
