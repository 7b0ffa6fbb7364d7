"""Subscription fan-out: every change the view applies is offered to each subscription that
wants it (by service, by origin region), where it waits, coalesced, for its reader. The
``Change`` message is built once per change, and only when some subscription wants it."""

from __future__ import annotations

import asyncio

from discovery.keys import InstanceKey
from discovery.view.history import make_change
from discovery_pb.v1.types_pb2 import Change


class Subscription:
    """One watcher's pending changes, coalesced: at most one (the latest) per instance, so a
    slow reader costs memory bounded by the number of instances, never an unbounded queue."""

    def __init__(self, service: str, region: str = "") -> None:
        self.service = service
        self.region = region  # "": every region (replication follows only its own)
        self._pending: dict[InstanceKey, Change] = {}
        self.ready = asyncio.Event()
        self.closed = False  # set by View.end_subscriptions at shutdown

    def offer(self, key: InstanceKey, change: Change) -> None:
        self._pending.pop(key, None)  # re-insert so dict order stays revision order
        self._pending[key] = change
        self.ready.set()

    def take(self) -> list[Change]:
        changes = list(self._pending.values())
        self._pending.clear()
        self.ready.clear()
        return changes


class Subscriptions:
    def __init__(self) -> None:
        self._open: set[Subscription] = set()
        self.closing = False  # no new subscription will ever see a change

    def subscribe(self, service: str, region: str = "") -> Subscription:
        sub = Subscription(service, region)
        if self.closing:
            sub.closed = True
            sub.ready.set()
        self._open.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._open.discard(sub)

    def publish(self, revision: int, key: InstanceKey, value: bytes | None) -> None:
        """Offer a put (``value``: the record's bytes) or a delete (None) at ``revision``."""
        change: Change | None = None
        for sub in self._open:
            if (not sub.service or sub.service == key.service) and (not sub.region or sub.region == key.region):
                if change is None:
                    change = make_change(revision, key, value)
                sub.offer(key, change)

    def close(self) -> None:
        """Wake every subscription with ``closed`` set: its reader ends now, not at the end
        of the server's grace period."""
        self.closing = True
        for sub in self._open:
            sub.closed = True
            sub.ready.set()
