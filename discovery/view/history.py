"""The change history: the view's last changes in revision order, so that a client resuming
at a revision gets what it missed, or learns that only a snapshot can bring it up to date.

Bounded by entries and by bytes (issue 13): each change is held compactly, as its revision,
its instance key and the record's stored bytes (shared with the index while the record is
current; None for a delete), and turned into a ``Change`` message only when read."""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from discovery.keys import InstanceKey
from discovery_pb.v1.types_pb2 import Change

DEFAULT_MAX_BYTES = 8 << 20
# What an entry costs besides its value: the entry tuple, its revision, its key tuple and
# instance id (the value is often shared with the index; counted anyway, so the bound holds).
ENTRY_OVERHEAD = 200


class Entry(NamedTuple):
    revision: int
    key: InstanceKey
    value: bytes | None  # None: the instance was deleted

    @property
    def size(self) -> int:
        return ENTRY_OVERHEAD + (len(self.value) if self.value is not None else 0)

    def change(self) -> Change:
        return make_change(self.revision, self.key, self.value)


def make_change(revision: int, key: InstanceKey, value: bytes | None) -> Change:
    """The ``Change`` message of a put (``value``: the record's bytes) or a delete (None)."""
    region, service, instance_id = key
    if value is None:
        return Change(kind=Change.DELETE, revision=revision, region=region, service=service, instance_id=instance_id)
    change = Change(kind=Change.PUT, revision=revision, region=region, service=service, instance_id=instance_id)
    change.instance.SetInParent()
    change.instance.MergeFromString(value)
    return change


class History:
    def __init__(self, size: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._entries: deque[Entry] = deque()
        self._size = size  # at most this many changes
        self._max_bytes = max_bytes  # and at most this many bytes of them (ENTRY_OVERHEAD each, plus the value)
        self.bytes = 0
        self._floor = 0  # every change with a greater revision is held
        # (from, to) of each re-list: its changes turn the state at `from` into the state at
        # `to`, which is no use to a client (of another server) at a revision in between.
        self._gaps: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def restart(self, floor: int) -> None:
        """After the first listing: nothing before it is known."""
        self._entries.clear()
        self.bytes = 0
        self._floor = floor

    def gap(self, low: int, high: int) -> None:
        self._gaps.append((low, high))

    def add(self, revision: int, key: InstanceKey, value: bytes | None) -> None:
        entry = Entry(revision, key, value)
        self._entries.append(entry)
        self.bytes += entry.size
        if len(self._entries) > self._size or self.bytes > self._max_bytes:
            self._trim()

    def _trim(self) -> None:
        entries = self._entries
        while entries and (len(entries) > self._size or self.bytes > self._max_bytes):
            gone = entries.popleft()
            self.bytes -= gone.size
            self._floor = gone.revision
        if self._gaps and self._gaps[0][1] <= self._floor:
            self._gaps = [gap for gap in self._gaps if gap[1] > self._floor]

    def since(self, revision: int, service: str, region: str = "") -> list[Change] | None:
        """Changes after ``revision``, or None when they are no longer held (send a snapshot)."""
        if revision < self._floor or any(low < revision < high for low, high in self._gaps):
            return None
        return [
            e.change()
            for e in self._entries
            if e.revision > revision
            and (not service or e.key.service == service)
            and (not region or e.key.region == region)
        ]
