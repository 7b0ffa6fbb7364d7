"""The change history: the view's last changes in revision order, so that a client resuming
at a revision gets what it missed, or learns that only a snapshot can bring it up to date."""

from __future__ import annotations

from collections import deque

from discovery_pb.v1.types_pb2 import Change


class History:
    def __init__(self, size: int) -> None:
        self._changes: deque[Change] = deque(maxlen=size)
        self._floor = 0  # every change with a greater revision is held
        # (from, to) of each re-list: its changes turn the state at `from` into the state at
        # `to`, which is no use to a client (of another server) at a revision in between.
        self._gaps: list[tuple[int, int]] = []

    def restart(self, floor: int) -> None:
        """After the first listing: nothing before it is known."""
        self._changes.clear()
        self._floor = floor

    def gap(self, low: int, high: int) -> None:
        self._gaps.append((low, high))

    def add(self, change: Change) -> None:
        if len(self._changes) == self._changes.maxlen:
            self._floor = self._changes[0].revision
            if self._gaps and self._gaps[0][1] <= self._floor:
                self._gaps = [gap for gap in self._gaps if gap[1] > self._floor]
        self._changes.append(change)

    def since(self, revision: int, service: str, region: str = "") -> list[Change] | None:
        """Changes after ``revision``, or None when they are no longer held (send a snapshot)."""
        if revision < self._floor or any(low < revision < high for low, high in self._gaps):
            return None
        return [
            c
            for c in self._changes
            if c.revision > revision and (not service or c.service == service) and (not region or c.region == region)
        ]
