"""The in-memory view of the region's instances: list at revision R, watch from R+1.

Resolve and Watch are served from here and never read etcd per request. When etcd goes away
the view keeps its last state, marked stale, and reconnects by itself; when its revision has
been compacted it re-lists and turns the difference into ordinary changes, so watchers and
resuming clients lose nothing (DESIGN §6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from discovery.errors import RevisionNotReached, StoreUnavailable
from discovery.keys import InstanceKey, KeySchema
from discovery.retry import RetryPolicy
from discovery.store import Compacted, Event, KeyValue, Store
from discovery_pb.v1.types_pb2 import Change, Instance

log = logging.getLogger(__name__)

_Key = tuple[str, str, str]  # (region, service, instance_id)


@dataclass(slots=True)
class Record:
    instance: Instance
    mod_revision: int
    lease: int


class Subscription:
    """One watcher's pending changes, coalesced: at most one (the latest) per instance, so a
    slow reader costs memory bounded by the number of instances, never an unbounded queue."""

    def __init__(self, service: str) -> None:
        self.service = service
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
        self._history: deque[tuple[_Key, Change]] = deque(maxlen=history)
        self._history_floor = 0  # every change with a greater revision is in _history
        self._subscriptions: set[Subscription] = set()
        self._advanced = asyncio.Event()
        self.revision = 0
        self.ready = asyncio.Event()
        self.watching = False
        self.last_contact = 0.0  # time.monotonic() of the last word from etcd
        self.last_error = ""
        self.reloads = 0

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

    def service(self, name: str) -> Iterable[Record]:
        return self._by_service.get(name, {}).values()

    def snapshot(self, service: str) -> list[Instance]:
        records = self._by_service.get(service, {}).values() if service else self._records.values()
        return [r.instance for r in records]

    def changes_since(self, revision: int, service: str) -> list[Change] | None:
        """Changes after ``revision``, or None when they are no longer held (send a snapshot)."""
        if revision < self._history_floor:
            return None
        return [c for _, c in self._history if c.revision > revision and (not service or c.service == service)]

    async def wait_for(self, revision: int, timeout: float) -> None:
        """Return once the view has applied ``revision``; RevisionNotReached after ``timeout``."""
        if revision <= self.revision:
            return
        try:
            async with asyncio.timeout(timeout):
                while self.revision < revision:
                    # A write outside our range moves etcd's revision without an event for
                    # us; a progress request makes etcd vouch for the revision anyway.
                    self._store.request_progress()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await self._advanced.wait()
        except TimeoutError:
            raise RevisionNotReached(
                f"the view is at revision {self.revision} and did not reach {revision} within {timeout:.3g}s"
                + (" (etcd unreachable)" if self.stale else "")
            ) from None

    def subscribe(self, service: str) -> Subscription:
        sub = Subscription(service)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def end_subscriptions(self) -> None:
        """Wake every watcher with ``closed`` set, so streams end at shutdown."""
        for sub in self._subscriptions:
            sub.closed = True
            sub.ready.set()

    # --- the feed ---------------------------------------------------------------------

    async def run(self) -> None:
        """List, then watch; re-list on compaction; reconnect with backoff when etcd fails."""
        attempt = 0
        must_list = True
        while True:
            try:
                if must_list:
                    await self._load()
                    must_list = False
                async for batch in self._store.watch(self._keys.instances, self.revision + 1):
                    self.watching, self.last_contact, attempt = True, time.monotonic(), 0
                    self._apply(batch.events, batch.revision)
            except Compacted as exc:
                log.warning("view: watch fell behind a compaction (%s); re-listing", exc)
                must_list = True
            except StoreUnavailable as exc:
                self.last_error = str(exc)
                if self.watching:
                    log.warning("view: lost etcd (%s); serving the last view, marked stale", exc)
                self.watching = False
                await asyncio.sleep(self._retry.delay(attempt))
                attempt += 1

    async def _load(self) -> None:
        revision, items = await self._store.list_prefix(self._keys.instances)
        fresh: dict[_Key, KeyValue] = {}
        for kv in items:
            key = self._keys.parse_instance(kv.key)
            if key is not None:
                fresh[_tuple(key)] = kv
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
        self._apply(events + gone, revision, stamp=revision)
        if first:
            self._history.clear()
            self._history_floor = revision
            self.ready.set()
        else:
            self.reloads += 1
        self.watching, self.last_contact = True, time.monotonic()
        log.info("view: listed %d instances at revision %d", len(fresh), revision)

    def _apply(self, events: list[Event], revision: int, stamp: int = 0) -> None:
        for event in events:
            parsed = self._keys.parse_instance(event.kv.key)
            if parsed is None:
                continue
            key = _tuple(parsed)
            change_revision = stamp or event.kv.mod_revision
            if event.deleted:
                if self._records.pop(key, None) is None:
                    continue
                bucket = self._by_service.get(key[1])
                if bucket is not None:
                    bucket.pop(key, None)
                    if not bucket:
                        del self._by_service[key[1]]
                change = Change(
                    kind=Change.DELETE, revision=change_revision, region=key[0], service=key[1], instance_id=key[2]
                )
            else:
                try:
                    instance = Instance.FromString(event.kv.value)
                except Exception:  # a foreign or corrupt value must not stop the feed
                    log.warning("view: cannot decode %r; ignored", event.kv.key)
                    continue
                record = Record(instance, event.kv.mod_revision, event.kv.lease)
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
            self._publish(key, change)
        if revision > self.revision:
            self.revision = revision
            self._advanced.set()
            self._advanced = asyncio.Event()

    def _publish(self, key: _Key, change: Change) -> None:
        if len(self._history) == self._history.maxlen:
            self._history_floor = self._history[0][1].revision
        self._history.append((key, change))
        for sub in self._subscriptions:
            if not sub.service or sub.service == change.service:
                sub.offer(key, change)


def _tuple(key: InstanceKey) -> _Key:
    return (key.region, key.service, key.instance_id)
