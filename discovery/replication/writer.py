"""Applies one origin's records to the local etcd as replicas, fenced, with the checkpoint.

Each batch of changes and the checkpoint that covers it commit in one transaction, so a
restart resumes exactly after what was applied. A snapshot replaces the origin's replica set:
it writes what differs and deletes what the origin no longer has.

Deletions of a region that has just come back from silence are *held* (``hold=True``) for
the resume grace: a region frozen longer than its lease TTLs loses its leases when it wakes
(etcd expires them at once, docs/architecture.md, measured facts) and its instances re-register a moment later.
Applying those deletions would flap every instance of that region out and back in
everywhere else; holding them lets the re-registration supersede the deletion. A held
deletion is never lost: the durable checkpoint does not move past it until it is applied, so
a restart replays it. Each one is held for the grace at most, however often the origin
comes and goes meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from discovery.keys import KeySchema
from discovery.replication.election import Fence
from discovery.store import Store, Write
from discovery_pb.v1.replication_pb2 import Checkpoint
from discovery_pb.v1.types_pb2 import Change, Instance

log = logging.getLogger(__name__)

MAX_OPS = 100  # per transaction: etcd refuses more than --max-txn-ops (default 128)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class Applied:
    puts: int = 0
    deletes: int = 0
    held: int = 0


class ReplicaWriter:
    """The replicator's one writer for one origin while it leads (``fence``)."""

    def __init__(self, store: Store, keys: KeySchema, origin: str, fence: Fence, checkpoint: Checkpoint) -> None:
        self._store = store
        self._keys = keys
        self._origin = origin
        self._fence = fence
        self.checkpoint = checkpoint  # as last committed
        self._applied = checkpoint.revision
        # etcd key -> (the checkpoint that is safe while it is held, time.monotonic() it was held at).
        # Keyed by etcd's bytes, not InstanceKey: a snapshot diffs them against a listing.
        self._held: dict[bytes, tuple[int, float]] = {}
        self.totals = Applied()
        self._written_at = 0.0

    @property
    def applied(self) -> int:
        """The stream position: the next stream asks for changes after it (0: a snapshot).
        Ahead of the checkpoint while deletions are held."""
        return self._applied

    @property
    def holding(self) -> bool:
        """Whether deletions are held (``release`` applies those whose grace is over)."""
        return bool(self._held)

    def rewind(self) -> None:
        """Back to what etcd has durably, after a write that may not have happened: resume
        after the checkpoint, which is behind every deletion still held, so those come again."""
        self._applied = self.checkpoint.revision
        self._held.clear()

    def start_over(self) -> None:
        """Take a snapshot next: the origin's revisions no longer count from ours (another etcd
        cluster, or one that went back). Held deletions stay held: the snapshot decides them."""
        self._applied = 0

    def _next(self, **fields: object) -> Checkpoint:
        cp = Checkpoint()
        cp.CopyFrom(self.checkpoint)
        for name, value in fields.items():
            setattr(cp, name, value)
        floors = [floor for floor, _ in self._held.values()]
        cp.revision = min(self._applied, *floors) if floors else self._applied
        return cp

    async def _commit(self, writes: Sequence[Write], checkpoint: Checkpoint) -> None:
        """Write in chunks; the checkpoint goes with the last, so a crash between chunks
        replays the batch (puts and deletes of fixed values apply the same twice)."""
        cp = Write(self._keys.checkpoint(self._origin), checkpoint.SerializeToString())
        writes = list(writes)
        while len(writes) >= MAX_OPS:
            await self._store.fenced(self._fence, writes[: MAX_OPS - 1])
            del writes[: MAX_OPS - 1]
        await self._store.fenced(self._fence, [*writes, cp])
        self.checkpoint = checkpoint
        self._written_at = time.monotonic()

    def _key(self, service: str, instance_id: str) -> bytes:
        return self._keys.instance(self._origin, service, instance_id)

    async def changes(self, changes: Sequence[Change], revision: int, *, hold: bool, contact: Checkpoint) -> None:
        """Apply the origin's changes up to ``revision`` (its whole state up to there)."""
        # The last change per key, in revision order: a resumed batch may hold several changes
        # of one instance, and etcd refuses a transaction that names a key twice.
        latest: dict[bytes, Change] = {}
        for change in changes:
            if change.region != self._origin:
                continue  # never another region's records (the origin must not send them)
            key = self._key(change.service, change.instance_id)
            latest.pop(key, None)
            latest[key] = change
        writes: list[Write] = []
        floor, now = self._applied, time.monotonic()
        for key, change in latest.items():
            if change.kind == Change.PUT:
                self._held.pop(key, None)  # a re-registration supersedes a held deletion
                writes.append(Write(key, change.instance.SerializeToString()))
                self.totals.puts += 1
            elif hold:
                self._held.setdefault(key, (floor, now))
                self.totals.held += 1
            else:
                self._held.pop(key, None)
                writes.append(Write(key, None))
                self.totals.deletes += 1
        self._applied = max(self._applied, revision)
        await self._commit(writes, self._next(**_contact(contact)))

    async def snapshot(
        self, instances: Sequence[Instance], revision: int, cluster_id: int, *, hold: bool, contact: Checkpoint
    ) -> Applied:
        """Make the origin's replica set equal to ``instances`` (its state at ``revision``)."""
        _, current = await self._store.list_prefix(self._keys.region_instances(self._origin))
        have = {kv.key: kv.value for kv in current}
        writes: list[Write] = []
        done = Applied()
        wanted: set[bytes] = set()
        now = time.monotonic()
        for inst in instances:
            if inst.region != self._origin:
                continue
            key = self._key(inst.service, inst.instance_id)
            wanted.add(key)
            value = inst.SerializeToString()
            self._held.pop(key, None)
            if have.get(key) != value:  # unchanged replicas are not rewritten: no event, no flap
                writes.append(Write(key, value))
                done.puts += 1
        for key in have.keys() - wanted:
            if hold:
                self._held.setdefault(key, (0, now))
                done.held += 1
            else:
                self._held.pop(key, None)
                writes.append(Write(key, None))
                done.deletes += 1
        # The stream starts again at the snapshot: a deletion still held is only safe behind a
        # new snapshot now (revision 0), whatever point of the old stream it was held at.
        self._held = {key: (0, since) for key, (_, since) in self._held.items()}
        self._applied = revision
        await self._commit(writes, self._next(cluster_id=cluster_id, **_contact(contact)))
        self.totals.puts += done.puts
        self.totals.deletes += done.deletes
        self.totals.held += done.held
        return done

    async def release(self, contact: Checkpoint, *, held_for: float = 0.0) -> int:
        """Apply the held deletions held for ``held_for`` seconds or more (the grace is over)."""
        now = time.monotonic()
        due = [key for key, (_, since) in self._held.items() if now - since >= held_for]
        if not due:
            return 0
        for key in due:
            del self._held[key]
        await self._commit([Write(k, None) for k in due], self._next(**_contact(contact)))
        self.totals.deletes += len(due)
        return len(due)

    async def heartbeat(self, revision: int, contact: Checkpoint, *, every: float) -> None:
        """The origin is at ``revision`` with nothing more for us: move the checkpoint (at
        most once per ``every`` seconds). The write is also how every server of the region
        learns we are in contact, so its age is what they see as the origin's."""
        self._applied = max(self._applied, revision)
        if time.monotonic() - self._written_at >= every:
            await self._commit([], self._next(**_contact(contact)))


def _contact(contact: Checkpoint) -> dict[str, object]:
    return {
        "head_revision": contact.head_revision,
        "last_contact_ms": contact.last_contact_ms,
        "caught_up_ms": contact.caught_up_ms,
        "leader": contact.leader,
        "source": contact.source,
        "hold_until_ms": contact.hold_until_ms,
        "origin_heartbeat_ms": contact.origin_heartbeat_ms,
    }
