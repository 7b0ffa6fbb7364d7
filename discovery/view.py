"""The in-memory view of the region's keys: list at revision R, watch from R+1.

One watch covers the whole prefix: instances (the region's own and its replicas of other
regions), and the replication checkpoints and election keys, which every server reads from
here to say how fresh each region's records are (``discovery.replication.state``).

Resolve and Watch are served from here and never read etcd per request. When etcd goes away
the view keeps its last state, marked stale, and reconnects by itself; when its revision has
been compacted it re-lists and turns the difference into ordinary changes, so watchers and
resuming clients lose nothing (docs/architecture.md, read path).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from discovery.errors import RevisionNotReached, ShuttingDown, StoreUnavailable
from discovery.keys import InstanceKey, KeySchema
from discovery.retry import RetryPolicy
from discovery.store import Compacted, Event, KeyValue, Store, WatchBatch
from discovery_pb.v1.types_pb2 import Change, Instance

log = logging.getLogger(__name__)

_PROGRESS_INTERVAL = 0.1  # seconds between progress requests while reads wait
# A recovery is withdrawn if etcd's term changes within this long of it: election timeout
# (1 s) and the server's health probe (every 2 s) that reads the term in a quiet cluster.
RECOVERY_CONFIRM_SECONDS = 3.5

_Key = tuple[str, str, str]  # (region, service, instance_id)


@dataclass(slots=True)
class Record:
    instance: Instance
    mod_revision: int
    lease: int


class Subscription:
    """One watcher's pending changes, coalesced: at most one (the latest) per instance, so a
    slow reader costs memory bounded by the number of instances, never an unbounded queue."""

    def __init__(self, service: str, region: str = "") -> None:
        self.service = service
        self.region = region  # "": every region (replication follows only its own)
        self._pending: dict[_Key, Change] = {}
        self.ready = asyncio.Event()
        self.closed = False  # set by View.end_subscriptions at shutdown

    def offer(self, key: _Key, change: Change) -> None:
        self._pending.pop(key, None)  # re-insert so dict order stays revision order
        self._pending[key] = change
        self.ready.set()

    def take(self) -> list[Change]:
        changes = list(self._pending.values())
        self._pending.clear()
        self.ready.clear()
        return changes


class View:
    """Owns the region's one etcd watch. Run ``run()`` as a task; ``ready`` is set after the
    first listing."""

    def __init__(
        self, store: Store, keys: KeySchema, *, history: int = 10_000, retry: RetryPolicy | None = None
    ) -> None:
        self._store = store
        self._keys = keys
        self._retry = retry or RetryPolicy()
        self._records: dict[_Key, Record] = {}
        self._by_service: dict[str, dict[_Key, Record]] = {}
        self._generations: dict[str, int] = {}
        self._next_generation = itertools.count(1)
        self._history: deque[tuple[_Key, Change]] = deque(maxlen=history)
        self._history_floor = 0  # every change with a greater revision is in _history
        # (from, to) of each re-list: its changes turn the state at `from` into the state at
        # `to`, which is no use to a client (of another server) at a revision in between.
        self._gaps: list[tuple[int, int]] = []
        self._subscriptions: set[Subscription] = set()
        self._advanced = asyncio.Event()
        self.revision = 0  # everything up to here is applied (a confirmed progress answer may move it)
        self._progress = 0  # the highest revision etcd answered a progress request with
        self._progress_requested = 0.0
        self._confirming: asyncio.Task[bool] | None = None
        self._confirming_at = 0
        # Keys under the prefix that are no instance we serve: replication checkpoints and
        # election keys (read through ``meta``), and anything unreadable (counted, see _confirm).
        self._meta: dict[bytes, bytes] = {}
        self._region_counts: dict[str, int] = {}
        self._resume = 0  # the watch resumes after this: the last event's or listing's revision
        self.ready = asyncio.Event()
        self.watching = False
        self.last_contact = 0.0  # time.monotonic() of the last word from etcd
        self._back_at = 0.0  # time.monotonic() of the last recovery (see recovered_at); 0: none
        self._back_term = 0  # etcd's raft term then
        self._confirmed_at = 0.0  # the last recovery past its provisional seconds
        self._term_at_loss = 0  # etcd's raft term when the watch was lost; 0: not lost
        self.last_error = ""
        self.reloads = 0
        self.closing = False  # set by end_subscriptions: no new watchers or waits
        self._failures = 0  # in a row, for the reconnect backoff

    # --- reads ------------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        return not self.watching

    def stale_seconds(self) -> float:
        return time.monotonic() - self.last_contact if self.stale and self.last_contact else 0.0

    @property
    def instance_count(self) -> int:
        return len(self._records)

    @property
    def service_count(self) -> int:
        return len(self._by_service)

    def region_count(self, region: str) -> int:
        return self._region_counts.get(region, 0)

    def meta(self, key: bytes) -> bytes | None:
        """The value of a non-instance key under the prefix (a checkpoint, an election key)."""
        return self._meta.get(key)

    @property
    def cluster_id(self) -> int:
        return self._store.cluster_id

    def service(self, name: str) -> Iterable[Record]:
        return self._by_service.get(name, {}).values()

    def service_generation(self, name: str) -> int:
        """Changes whenever the service's instances change (0 while it has none); unique
        across services coming and going, so a cache keyed on it is never fooled."""
        return self._generations.get(name, 0)

    def snapshot(self, service: str, region: str = "") -> list[Instance]:
        records = self._by_service.get(service, {}).values() if service else self._records.values()
        return [r.instance for r in records if not region or r.instance.region == region]

    def changes_since(self, revision: int, service: str, region: str = "") -> list[Change] | None:
        """Changes after ``revision``, or None when they are no longer held (send a snapshot)."""
        if revision < self._history_floor or any(low < revision < high for low, high in self._gaps):
            return None
        return [
            c
            for _, c in self._history
            if c.revision > revision and (not service or c.service == service) and (not region or c.region == region)
        ]

    async def wait_for(self, revision: int, timeout: float) -> None:
        """Return once the view has applied ``revision``; RevisionNotReached after ``timeout``,
        ShuttingDown when the server stops meanwhile."""
        if revision <= self.revision:
            return
        try:
            async with asyncio.timeout(timeout):
                while self.revision < revision:
                    if self.closing:
                        raise ShuttingDown("the server is shutting down")
                    if self._progress >= revision and await self._confirmed(revision):
                        break
                    # A write outside our range moves etcd's revision without an event for
                    # us; a progress request makes etcd vouch for the revision anyway.
                    self._request_progress()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await self._advanced.wait()
        except TimeoutError:
            raise RevisionNotReached(
                f"the view is at revision {self.revision} and did not reach {revision} within {timeout:.3g}s"
                + (" (etcd unreachable)" if self.stale else "")
            ) from None

    def _request_progress(self) -> None:
        """One progress request per interval, however many reads are waiting."""
        now = time.monotonic()
        if now - self._progress_requested >= _PROGRESS_INTERVAL:
            self._progress_requested = now
            self._store.request_progress()

    async def _confirmed(self, revision: int) -> bool:
        """Share one confirmation among every read waiting for ``revision`` or less."""
        task = self._confirming
        if task is None or (task.done() and not task.result()) or self._confirming_at < revision:
            task = asyncio.create_task(self._confirm(self._progress), name="view-confirm")
            self._confirming, self._confirming_at = task, self._progress
        return await asyncio.shield(task) and self.revision >= revision

    async def _confirm(self, at: int) -> bool:
        """Move to revision ``at``, which etcd answered a progress request with, if etcd
        confirms nothing under our prefix changed between our revision and it.

        etcd before 3.5.8 (3.5.1 is what tests and dev run) may send that answer ahead of
        events it still owes the watch (etcd issue 15220), so it alone would let a read with
        ``min_revision`` miss a write. Same keys, none modified since: the view is exact at ``at``.
        """
        before, count = self.revision, len(self._records) + len(self._meta)
        try:
            unchanged = await self._store.unchanged_since(self._keys.root, before, count, at)
        except StoreUnavailable:
            return False
        if unchanged:
            self._advance(at)
        return unchanged

    def subscribe(self, service: str, region: str = "") -> Subscription:
        sub = Subscription(service, region)
        if self.closing:
            sub.closed = True
            sub.ready.set()
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def end_subscriptions(self) -> None:
        """At shutdown: wake every watcher with ``closed`` set and every ``wait_for``, so
        streams and waiting reads end now instead of at the end of the grace period."""
        self.closing = True
        if self._confirming is not None:
            self._confirming.cancel()
        for sub in self._subscriptions:
            sub.closed = True
            sub.ready.set()
        self._wake()

    # --- the feed ---------------------------------------------------------------------

    async def run(self) -> None:
        """List, then watch; re-list on compaction; reconnect with backoff when etcd fails."""
        must_list = True
        while True:
            try:
                if must_list:
                    await self._load()
                    must_list = False
                async with contextlib.aclosing(self._store.watch(self._keys.root, self._resume + 1)) as batches:
                    await self._follow(batches)
            except Compacted as exc:
                log.warning("view: watch fell behind a compaction (%s); re-listing", exc)
                must_list = True
            except StoreUnavailable as exc:
                self._lost(str(exc))
                await self._backoff()
            except Exception as exc:  # a bug must not freeze the view while it claims to be fresh
                log.exception("view: unexpected failure; re-listing")
                self._lost(f"unexpected {type(exc).__name__}: {exc}")
                must_list = True
                await self._backoff()

    async def _backoff(self) -> None:
        await asyncio.sleep(self._retry.delay(self._failures))
        self._failures += 1

    async def _follow(self, batches: AsyncIterator[WatchBatch]) -> None:
        """Apply a watch's batches until it ends (it always ends by raising)."""
        async for batch in batches:
            if not self.watching:
                log.info("view: watching etcd from revision %d", self._resume + 1)
                self._note_back()
            self.watching, self.last_contact, self._failures = True, time.monotonic(), 0
            if batch.created:
                continue
            if batch.requested:  # to be confirmed before it counts: see _confirm
                self._progress = max(self._progress, batch.revision)
                self._wake()
                continue
            self._apply(batch.events, batch.revision)
            self._resume = max(self._resume, batch.revision)

    def _lost(self, error: str) -> None:
        self.last_error = error
        if self.watching:
            log.warning("view: lost etcd (%s); serving the last view, marked stale", error)
            # The watch was alive (keep-alive answered) until about now, events or not.
            self.last_contact = time.monotonic()
            self._term_at_loss = self._store.raft_term
        self.watching = False

    async def _load(self) -> None:
        revision, items = await self._store.list_prefix(self._keys.root)
        fresh: dict[_Key, KeyValue] = {}
        foreign: list[Event] = []
        for kv in items:
            key = self._keys.parse_instance(kv.key)
            if key is not None:
                fresh[_tuple(key)] = kv
            else:
                foreign.append(Event(False, kv))
        self._meta.clear()  # the listing (through _apply below) says what is there now
        first = not self.ready.is_set()
        events = [
            Event(False, kv)
            for key, kv in fresh.items()
            if first or key not in self._records or self._records[key].mod_revision != kv.mod_revision
        ]
        gone = [
            Event(True, KeyValue(self._keys.instance(*key), b"", revision, 0))
            for key in self._records
            if key not in fresh
        ]
        # A re-list turns what changed while we were not watching into changes at `revision`.
        if not first and revision > self.revision:
            self._gaps.append((self.revision, revision))
        self._apply(foreign + events + gone, revision, stamp=revision)
        if first:
            self._history.clear()
            self._history_floor = revision
            self.ready.set()
        else:
            self.reloads += 1
        self._resume = revision
        if not self.watching:
            self._note_back()
        self.watching, self.last_contact, self._failures = True, time.monotonic(), 0
        log.info("view: listed %d instances at revision %d", len(fresh), revision)

    def _note_back(self) -> None:
        """Back after losing etcd, under the same leader (the same raft term): etcd may have
        been frozen or cut off, and leases whose TTL ran out meanwhile expire now, before
        their holders can renew them. Replication receivers hold this region's deletions for
        a while after such a recovery. Under a new leader (a leader died, etcd restarted)
        every lease was extended, so nothing expires because of the outage: no recovery.
        Neither is the first start, nor a loss at startup."""
        lost, self._term_at_loss = self._term_at_loss, 0
        if lost and self._store.raft_term == lost:
            self._back_at, self._back_term = time.monotonic(), lost

    @property
    def recovered_at(self) -> float:
        """time.monotonic() of the last recovery (see ``_note_back``); 0: none.

        Provisional for its first seconds: when the watched member died, the watch comes back
        on another member before the others have even noticed (same term), and the election
        follows within about a second. A new term seen in that window withdraws the recovery
        (the new leader extended every lease); the feed then reports none, and receivers
        release what they held."""
        if self._back_at and self._store.raft_term != self._back_term:
            if time.monotonic() - self._back_at < RECOVERY_CONFIRM_SECONDS:
                self._back_at = self._confirmed_at
            else:
                self._confirmed_at = self._back_at
        return self._back_at

    def _classify(self, event: Event) -> tuple[_Key, Instance | None] | None:
        """The instance an event is about and its new state (None: gone), or None for a key
        that is no instance. Keys we cannot serve are still counted (see _confirm)."""
        parsed = self._keys.parse_instance(event.kv.key)
        instance = None
        if parsed is not None and not event.deleted:
            try:
                instance = Instance.FromString(event.kv.value)
            except Exception:  # a corrupt value must not stop the feed; it is served no more
                log.warning("view: cannot decode %r; not served", event.kv.key)
        if event.deleted or (parsed is not None and instance is not None):
            self._meta.pop(event.kv.key, None)
        else:
            self._meta[event.kv.key] = event.kv.value
        return None if parsed is None else (_tuple(parsed), instance)

    def _apply(self, events: list[Event], revision: int, stamp: int = 0) -> None:
        for event in events:
            item = self._classify(event)
            if item is None:
                continue
            key, instance = item
            change_revision = stamp or event.kv.mod_revision
            if instance is None:
                if self._records.pop(key, None) is None:
                    continue
                self._count(key[0], -1)
                bucket = self._by_service.get(key[1])
                if bucket is not None:
                    bucket.pop(key, None)
                    if not bucket:
                        del self._by_service[key[1]]
                change = Change(
                    kind=Change.DELETE, revision=change_revision, region=key[0], service=key[1], instance_id=key[2]
                )
            else:
                record = Record(instance, event.kv.mod_revision, event.kv.lease)
                if key not in self._records:
                    self._count(key[0], 1)
                self._records[key] = record
                self._by_service.setdefault(key[1], {})[key] = record
                change = Change(
                    kind=Change.PUT,
                    revision=change_revision,
                    region=key[0],
                    service=key[1],
                    instance_id=key[2],
                    instance=instance,
                )
            if key[1] in self._by_service:
                self._generations[key[1]] = next(self._next_generation)
            else:
                self._generations.pop(key[1], None)
            self._publish(key, change)
        self._advance(revision)

    def _count(self, region: str, delta: int) -> None:
        left = self._region_counts.get(region, 0) + delta
        if left:
            self._region_counts[region] = left
        else:
            self._region_counts.pop(region, None)

    def _advance(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            self._wake()

    def _wake(self) -> None:
        self._advanced.set()
        self._advanced = asyncio.Event()

    def _publish(self, key: _Key, change: Change) -> None:
        if len(self._history) == self._history.maxlen:
            self._history_floor = self._history[0][1].revision
            if self._gaps and self._gaps[0][1] <= self._history_floor:
                self._gaps = [gap for gap in self._gaps if gap[1] > self._history_floor]
        self._history.append((key, change))
        for sub in self._subscriptions:
            if (not sub.service or sub.service == change.service) and (not sub.region or sub.region == change.region):
                sub.offer(key, change)


def _tuple(key: InstanceKey) -> _Key:
    return (key.region, key.service, key.instance_id)
