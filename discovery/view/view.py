"""The view: the region's keys in memory, composed of the parts of this package. The follow
loop (``follow``) reads etcd; each event updates the instance index (``index``) or the other
keys (``meta``), becomes a change in the history (``history``) and is offered to the
subscriptions (``subscriptions``); the applied revision and reads waiting for one live in
``revision``, recovery detection in ``recovery``.

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
import logging
import time
from collections.abc import Iterable
from typing import Protocol

from discovery.keys import InstanceKey, KeySchema
from discovery.store import Event, KeyValue
from discovery.view.follow import Follower, WatchSource
from discovery.view.history import DEFAULT_MAX_BYTES as DEFAULT_HISTORY_BYTES
from discovery.view.history import History
from discovery.view.index import Index, Record, Shared
from discovery.view.meta import MetaKeys
from discovery.view.recovery import Recovery, TermSource
from discovery.view.revision import AppliedRevision, ProgressSource
from discovery.view.subscriptions import Subscription, Subscriptions
from discovery_client import RetryPolicy
from discovery_pb.v1.types_pb2 import Change, Instance

log = logging.getLogger("discovery.view")


class ViewSource(WatchSource, ProgressSource, TermSource, Protocol):
    """What the view needs of the store (``discovery.store.Store`` in the server, a scripted
    one in unit tests)."""

    @property
    def cluster_id(self) -> int:
        """The etcd cluster's id, from the last listing (a rebuilt cluster has a new one)."""
        ...


class View:
    """Owns the region's one etcd watch. Run ``run()`` as a task; ``ready`` is set after the
    first listing."""

    def __init__(
        self,
        store: ViewSource,
        keys: KeySchema,
        *,
        history: int = 10_000,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._index = Index()
        self._meta = MetaKeys()
        self._history = History(history, history_bytes)
        self._subscriptions = Subscriptions()
        self._applied = AppliedRevision(
            store, keys.root, key_count=lambda: len(self._index) + len(self._meta), stale=lambda: self.stale
        )
        self._recovery = Recovery(store)
        self._follower = Follower(
            store,
            keys.root,
            self._recovery,
            listed=self._listed,
            applied=self._apply,
            progressed=self._applied.progressed,
            paged=self._paged,
            retry=retry,
        )
        self.ready = asyncio.Event()
        self.reloads = 0

    # --- reads ------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._applied.value

    @property
    def watching(self) -> bool:
        return self._follower.watching

    @property
    def last_contact(self) -> float:
        return self._follower.last_contact

    @property
    def last_error(self) -> str:
        return self._follower.last_error

    @property
    def closing(self) -> bool:
        """Set by end_subscriptions: no new watchers or waits."""
        return self._subscriptions.closing

    @property
    def stale(self) -> bool:
        return not self._follower.watching

    def stale_seconds(self) -> float:
        return time.monotonic() - self.last_contact if self.stale and self.last_contact else 0.0

    @property
    def recovered_at(self) -> float:
        """time.monotonic() of the last recovery (see ``recovery``); 0: none."""
        return self._recovery.at

    @property
    def instance_count(self) -> int:
        return len(self._index)

    @property
    def service_count(self) -> int:
        return self._index.service_count

    def region_count(self, region: str) -> int:
        return self._index.region_count(region)

    def meta(self, key: bytes) -> bytes | None:
        """The value of a non-instance key under the prefix (a checkpoint, an election key)."""
        return self._meta.get(key)

    @property
    def cluster_id(self) -> int:
        return self._store.cluster_id

    def get(self, key: InstanceKey) -> Record | None:
        return self._index.get(key)

    def on_lease(self, lease: int) -> list[Record]:
        return self._index.on_lease(lease)

    def owned(self, region: str, owner: str, service: str = "") -> int:
        return self._index.owned(region, owner, service)

    def service_names(self) -> list[str]:
        """Every service with an instance in the view (the HTTP API's list)."""
        return self._index.service_names()

    def service(self, name: str) -> Iterable[Record]:
        return self._index.service(name)

    def service_generation(self, name: str) -> int:
        """Changes whenever the service's instances change (0 while it has none); unique
        across services coming and going, so a cache keyed on it is never fooled."""
        return self._index.service_generation(name)

    def snapshot(self, service: str, region: str = "") -> list[Instance]:
        return self._index.snapshot(service, region)

    def changes_since(self, revision: int, service: str, region: str = "") -> list[Change] | None:
        """Changes after ``revision``, or None when they are no longer held (send a snapshot)."""
        return self._history.since(revision, service, region)

    async def wait_for(self, revision: int, timeout: float) -> None:
        """Return once the view has applied ``revision``; RevisionNotReached after ``timeout``,
        ShuttingDown when the server stops meanwhile."""
        await self._applied.wait_for(revision, timeout)

    def subscribe(self, service: str, region: str = "") -> Subscription:
        return self._subscriptions.subscribe(service, region)

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.unsubscribe(sub)

    def end_subscriptions(self) -> None:
        """At shutdown: wake every watcher with ``closed`` set and every ``wait_for``, so
        streams and waiting reads end now instead of at the end of the grace period."""
        self._subscriptions.close()
        self._applied.close()

    # --- the feed from etcd -----------------------------------------------------------

    async def run(self) -> None:
        """List, then watch; re-list on compaction; reconnect with backoff when etcd fails."""
        await self._follower.run()

    def _listed(self, revision: int, items: list[KeyValue]) -> None:
        parse = self._keys.parse_instance
        fresh: dict[InstanceKey, KeyValue] = {}
        foreign: list[_Item] = []
        for kv in items:
            key = parse(kv.key)
            if key is not None:
                fresh[key] = kv
            else:
                foreign.append((None, False, kv))
        self._meta.clear()  # the listing (through _apply below) says what is there now
        first = not self.ready.is_set()
        if first:
            events: list[_Item] = [(key, False, kv) for key, kv in fresh.items()]
        else:
            events = [(key, False, kv) for key, kv in fresh.items() if not self._holds(key, kv.mod_revision)]
        gone: list[_Item] = [
            (key, True, KeyValue(self._keys.instance_key(key), b"", revision, 0))
            for key in self._index
            if key not in fresh
        ]
        # A re-list turns what changed while we were not watching into changes at `revision`.
        if not first and revision > self.revision:
            self._history.gap(self.revision, revision)
        self._apply_items(foreign + events + gone, stamp=revision, history=not first)
        self._applied.advance(revision)
        if first:
            self._history.restart(revision)
            self.ready.set()
        else:
            self.reloads += 1
        log.info("view: listed %d instances at revision %d", len(fresh), revision)

    def _paged(self) -> _FirstListing | None:
        """The first listing is taken in a page at a time (no reader sees the view before it
        is ready); a re-list, all at once (``_listed``)."""
        return None if self.ready.is_set() else _FirstListing(self)

    def _first_listed(self, revision: int, gone: list[_Item], count: int) -> None:
        self._apply_items(gone, stamp=revision, history=False)
        self._applied.advance(revision)
        self._history.restart(revision)
        self.ready.set()
        log.info("view: listed %d instances at revision %d", count, revision)

    def _holds(self, key: InstanceKey, mod_revision: int) -> bool:
        record = self._index.get(key)
        return record is not None and record.mod_revision == mod_revision

    def _apply(self, events: list[Event], revision: int) -> None:
        parse = self._keys.parse_instance
        self._apply_items([(parse(e.kv.key), e.deleted, e.kv) for e in events])
        self._applied.advance(revision)

    def _apply_items(self, items: list[_Item], stamp: int = 0, *, history: bool = True) -> None:
        """Apply each (instance key or None, deleted, key-value); ``stamp``: the revision of
        every change (a re-list's), 0: each its own; ``history``: False for the first
        listing, whose changes no one can resume from.

        A key that is no instance, or a value that does not decode, is kept apart (``meta``);
        an instance whose value no longer decodes is served no more."""
        index, shared, meta, publish = self._index, self._index.shared, self._meta, self._subscriptions.publish
        for parsed, deleted, kv in items:
            if parsed is None:
                meta.set(kv.key, None if deleted else kv.value)
                continue
            change_revision = stamp or kv.mod_revision
            value: bytes | None = None
            if not deleted:
                try:
                    instance = Instance.FromString(kv.value)
                except Exception:  # a corrupt value must not stop the feed; it is served no more
                    log.warning("view: cannot decode %r; not served", kv.key)
                    meta.set(kv.key, kv.value)
                else:
                    value = kv.value
                    meta.set(kv.key, None)
            else:
                meta.set(kv.key, None)
            if value is None:
                if not index.remove(parsed):
                    continue
                key = Shared.key(parsed)
            else:
                key = index.put(parsed, Record.decoded(value, instance, kv.mod_revision, kv.lease, shared))
            if history:
                self._history.add(change_revision, key, value)
            publish(change_revision, key, value)


# (the instance key, None for any other key; whether it was deleted; the key-value)
_Item = tuple[InstanceKey | None, bool, KeyValue]


class _FirstListing:
    """The first listing, applied a page at a time: each page is decoded into the index (and
    its key-values dropped) before the next is read, so the listing as etcd sent it is never
    all in memory at once. Nothing is visible before ``done``: the view is not ready."""

    def __init__(self, view: View) -> None:
        self._view = view
        view._meta.clear()
        # An attempt that failed half way left part of a listing: what this one does not
        # bring must go when it is done.
        self._seen: set[InstanceKey] | None = set() if view.instance_count else None
        self._count = 0

    def page(self, revision: int, items: list[KeyValue]) -> None:
        view, seen = self._view, self._seen
        parse = view._keys.parse_instance
        batch: list[_Item] = []
        for kv in items:
            key = parse(kv.key)
            batch.append((key, False, kv))
            if key is not None:
                self._count += 1
                if seen is not None:
                    seen.add(key)
        view._apply_items(batch, stamp=revision, history=False)

    def done(self, revision: int) -> None:
        view, seen = self._view, self._seen
        gone: list[_Item] = []
        if seen is not None:
            gone = [
                (key, True, KeyValue(view._keys.instance_key(key), b"", revision, 0))
                for key in view._index
                if key not in seen
            ]
        view._first_listed(revision, gone, self._count)
