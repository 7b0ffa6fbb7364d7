"""Choosing one endpoint: local zone first, then round robin or by weight."""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from discovery_client.errors import InvalidArgument, NoEndpoints
from discovery_client.model import Endpoint, Resolution, Status

# The golden ratio's fractional part: n * PHI mod 1 spreads consecutive picks evenly over
# [0, 1), so weighted picks follow the weights closely without a random generator.
_PHI = 0.6180339887498949


class Strategy(enum.Enum):
    ROUND_ROBIN = "round_robin"
    WEIGHTED = "weighted"


@dataclass(frozen=True, slots=True)
class _Table:
    resolution: Resolution  # the answer this table was built from (identity decides reuse)
    endpoints: tuple[Endpoint, ...]
    cumulative: tuple[int, ...]


class Picker:
    """Per-service rotation state. Each Resolution is turned into a table once: the
    endpoints of ``zone`` when any is SERVING there (else all), and their cumulative weights."""

    def __init__(self, zone: str) -> None:
        self._zone = zone
        self._tables: dict[str, _Table] = {}
        self._counters: dict[str, Iterator[int]] = {}

    def pick(self, resolution: Resolution, strategy: Strategy | str = Strategy.ROUND_ROBIN) -> Endpoint:
        table = self._tables.get(resolution.service)
        if table is None or table.resolution is not resolution:
            table = self._build(resolution)
        endpoints = table.endpoints
        if not endpoints:
            raise NoEndpoints(f"{resolution.service!r} has no endpoint to pick")
        counter = self._counters.get(resolution.service)
        if counter is None:
            counter = self._counters.setdefault(resolution.service, itertools.count())
        n = next(counter)
        if strategy is Strategy.ROUND_ROBIN or strategy == "round_robin":
            return endpoints[n % len(endpoints)]
        if strategy is Strategy.WEIGHTED or strategy == "weighted":
            cumulative = table.cumulative
            return endpoints[bisect.bisect_right(cumulative, (n * _PHI) % 1.0 * cumulative[-1])]
        raise InvalidArgument(f"unknown strategy {strategy!r}; use round_robin or weighted")

    def _build(self, resolution: Resolution) -> _Table:
        endpoints = resolution.endpoints
        if self._zone:
            local = tuple(e for e in endpoints if e.zone == self._zone and e.status == Status.SERVING)
            if local:
                endpoints = local
        table = _Table(resolution, endpoints, tuple(itertools.accumulate(max(1, e.weight) for e in endpoints)))
        self._tables[resolution.service] = table
        return table
