"""The replicator for one origin region: pull its records into the local etcd.

While this server leads the origin's election it streams ``Replication.Stream`` from one of
the origin's servers (rotating among them with backoff and jitter), applies what arrives
through a fenced ``ReplicaWriter``, and resumes after the checkpoint. It takes a snapshot
when it has none, when the origin has compacted past it, or when the origin is a different
etcd cluster or has gone back in revisions (a rebuilt origin).

The origin's servers are reached through a ``Feed`` (``transport.GrpcFeed``: gRPC, its
keep-alive and the origin's heartbeats notice a hung peer); the loop sees only its messages
and ``FeedLost``, never on a request path.

Freshness: every message from the origin is contact, and the leader records it in the
checkpoint at once (at most every ``CONTACT_WRITE_MIN`` seconds), so the age every server of
the region sees is about one origin heartbeat period. The period is the origin's setting and
travels in the feed; a ``silence`` under three of them is warned about, here and in Status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from discovery.errors import StoreUnavailable
from discovery.keys import KeySchema
from discovery.replication.election import Fence, Resign
from discovery.replication.feed import Feed, FeedLost
from discovery.replication.hold import DeletionHold
from discovery.replication.state import OLD_ORIGIN_HEARTBEAT_MS, silence_warning
from discovery.replication.writer import ReplicaWriter, now_ms
from discovery.store import Store
from discovery_client import RetryPolicy
from discovery_pb.v1 import replication_pb2 as pb
from discovery_pb.v1.types_pb2 import Instance

log = logging.getLogger(__name__)

CONTACT_WRITE_MIN = 0.1  # seconds between checkpoint writes that only record contact


class _Restart(Exception):
    """Reconnect, from ``since`` (0: take a snapshot)."""


class StepDown(Resign):
    """This leader has not reached the origin for a long while: another server of the region
    may reach what this one cannot (a partial network fault)."""


@dataclass(frozen=True, slots=True)
class ReplicationSettings:
    region: str  # the local region
    identity: str  # this server, as Status shows the leader
    silence: float = 3.0  # no message from the origin for this long: it is out of contact
    resume_grace: float = 10.0
    step_down_after: float = 0.0  # no contact for this long while leading: resign (0: 4 x silence)


class Replicator:
    def __init__(
        self,
        origin: str,
        endpoints: Sequence[str],
        *,
        feed: Feed,
        store: Store,
        keys: KeySchema,
        settings: ReplicationSettings,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.origin = origin
        self.endpoints = list(endpoints)
        self._feed = feed
        self._store = store
        self._keys = keys
        self._s = settings
        # Only the backoff fields apply: it retries until it steps down (``step_down_after``).
        self._retry = retry or RetryPolicy(base_delay=0.2, max_delay=2.0)
        self._next_endpoint = 0
        self.source = ""
        self.writer: ReplicaWriter | None = None
        self.snapshots = 0
        self._contact = pb.Checkpoint(leader=settings.identity)
        self._hold = DeletionHold(origin, settings.resume_grace)
        self._last_message = 0.0  # time.monotonic() of the last message on the current stream
        self._connected_at = 0.0  # time.monotonic() of the current stream's first message
        # time.monotonic() of the first failed attempt since the origin last answered; counted
        # from an attempt, not from the last word, so time this process spent frozen (SIGSTOP,
        # a paused VM) does not look like a failure to reach the origin.
        self._failing_since = 0.0
        self._step_down_after = settings.step_down_after or 4 * settings.silence

    # --- leading ----------------------------------------------------------------------

    async def lead(self, fence: Fence) -> None:
        """Run while this server leads the origin's election (cancelled when it stops).
        Raises StepDown when the origin stays out of reach from here."""
        checkpoint = await self._load_checkpoint()
        self._contact = pb.Checkpoint(
            leader=self._s.identity,
            last_contact_ms=checkpoint.last_contact_ms,
            hold_until_ms=checkpoint.hold_until_ms,
        )
        self._hold.resume(checkpoint.hold_until_ms)
        writer = self.writer = ReplicaWriter(self._store, self._keys, self.origin, fence, checkpoint)
        log.info(
            "replicator %s: leading; resuming after revision %d%s",
            self.origin,
            checkpoint.revision,
            "" if checkpoint.revision else " (snapshot)",
        )
        self._failing_since = 0.0
        failures = 0
        try:
            while True:
                endpoint = self.endpoints[self._next_endpoint % len(self.endpoints)]
                self._last_message = 0.0
                self._hold.new_source()
                try:
                    await self._follow(endpoint, writer)
                except _Restart as exc:
                    log.info("replicator %s: %s", self.origin, exc)
                    continue
                except (FeedLost, TimeoutError, ConnectionError) as exc:
                    # Not only the feed's: a timeout or a broken connection anywhere in here has
                    # always meant "try the origin's next server". Once per outage at warning
                    # level; the retries that follow at debug.
                    level = logging.WARNING if self.source or not failures else logging.DEBUG
                    log.log(level, "replicator %s: lost %s (%s)", self.origin, endpoint, exc)
                except StoreUnavailable as exc:
                    # Our own etcd failed mid-batch: restart from what it has durably.
                    log.warning("replicator %s: local etcd: %s", self.origin, exc)
                    writer.rewind()
                if self._last_message and self._last_message - self._connected_at >= 1.0:
                    failures = 0  # it was working: retry at once, on the next server
                self.source = ""
                self._next_endpoint += 1
                now = time.monotonic()
                self._failing_since = self._failing_since or now
                if now - self._failing_since > self._step_down_after:
                    raise StepDown(f"no word from {self.origin} for {self._step_down_after:g}s")
                await asyncio.sleep(self._retry.delay(failures))
                failures += 1
        finally:
            self.writer = None
            self.source = ""

    async def _load_checkpoint(self) -> pb.Checkpoint:
        stored = await self._store.get(self._keys.checkpoint(self.origin))
        if stored is not None:
            try:
                return pb.Checkpoint.FromString(stored.value)
            except Exception:  # unreadable (a newer or broken writer): start over by snapshot
                log.warning("replicator %s: unreadable checkpoint; taking a snapshot", self.origin)
        return pb.Checkpoint(origin=self.origin)

    async def _follow(self, endpoint: str, writer: ReplicaWriter) -> None:
        since = writer.applied
        cluster_id = writer.checkpoint.cluster_id if since else 0
        parts: list[Instance] = []
        # Closed on the way out, whatever ends the loop, so the call ends now and not at GC.
        async with contextlib.aclosing(self._feed.follow(endpoint, since, cluster_id)) as messages:
            async for msg in messages:
                if msg.origin != self.origin:
                    raise FeedLost(f"{endpoint} is region {msg.origin!r}, not {self.origin!r}: check --peer")
                if msg.stale:
                    # That server has lost its own etcd: nothing it says is fresh. Another may not have.
                    raise FeedLost("it has lost contact with its etcd")
                if not self._last_message:
                    self._connected(endpoint)
                self._last_message, self._failing_since = time.monotonic(), 0.0
                self._hold.note(msg.time_ms, msg.recovered_at_ms)
                self._contact.hold_until_ms = self._hold.until_ms
                await self._handle(msg, writer, parts)

    def _connected(self, endpoint: str) -> None:
        self._connected_at = time.monotonic()
        self.source = endpoint
        self._contact.source = endpoint
        log.info("replicator %s: streaming from %s", self.origin, endpoint)

    def _note_heartbeat(self, heartbeat_ms: int) -> None:
        if heartbeat_ms == self._contact.origin_heartbeat_ms:
            return
        self._contact.origin_heartbeat_ms = heartbeat_ms
        warning = silence_warning(self.origin, self._s.silence, heartbeat_ms)
        if warning:
            log.warning("replicator %s: %s", self.origin, warning)

    async def _handle(self, msg: pb.StreamResponse, writer: ReplicaWriter, parts: list[Instance]) -> None:
        cp = writer.checkpoint
        snapshot = msg.kind == pb.StreamResponse.SNAPSHOT
        if cp.cluster_id and msg.cluster_id and msg.cluster_id != cp.cluster_id and not snapshot:
            writer.start_over()
            raise _Restart(f"origin is a different etcd cluster ({msg.cluster_id:x}, was {cp.cluster_id:x}): snapshot")
        if not snapshot and msg.revision < writer.applied:
            was = writer.applied
            writer.start_over()
            raise _Restart(f"origin went back from revision {was} to {msg.revision} (rebuilt?): snapshot")
        self._contact.last_contact_ms = now_ms()
        self._contact.head_revision = max(msg.revision, 0)
        self._note_heartbeat(msg.heartbeat_ms or OLD_ORIGIN_HEARTBEAT_MS)
        hold = self._hold.holding()
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
            await writer.heartbeat(msg.revision, self._contact, every=CONTACT_WRITE_MIN)
        # Asked at every message, held or not: a withdrawal concerns what is held now, and left
        # unasked it would release a later, genuine hold at once.
        held_for = self._hold.release_after()
        if writer.holding:
            released = await writer.release(self._contact, held_for=held_for)
            if released:
                log.info("replicator %s: applied %d held deletions nobody re-registered", self.origin, released)
