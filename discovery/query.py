"""Which endpoints a Resolve returns: scope across regions, then status, tag and zone filters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from discovery.model import SERVING_STATUSES
from discovery.view import Record
from discovery_pb.v1.lookup_pb2 import Scope
from discovery_pb.v1.types_pb2 import Status


@dataclass(frozen=True, slots=True)
class Query:
    service: str
    scope: int = Scope.LOCAL
    statuses: frozenset[int] = SERVING_STATUSES
    tags: frozenset[str] = frozenset()
    zone: str = ""
    min_healthy: int = 1

    @property
    def is_default(self) -> bool:
        """Serving endpoints of the local region, unfiltered: what most Resolve calls ask."""
        return (
            self.scope == Scope.LOCAL
            and self.statuses == SERVING_STATUSES
            and not self.tags
            and not self.zone
            and self.min_healthy == 1
        )

    def matches(self, record: Record) -> bool:
        return (
            record.status in self.statuses
            and (not self.zone or record.zone == self.zone)
            and (not self.tags or self.tags.issubset(record.tags))
        )


def select(
    records: Iterable[Record],
    query: Query,
    local: str,
    proximity: Sequence[str] = (),
    servable: Callable[[str], bool] | None = None,
) -> list[Record]:
    """Local region first. FAILOVER adds other regions, nearest first (``proximity``, then
    by name), until ``min_healthy`` serving endpoints are found; ALL returns every region.
    Regions ``servable`` refuses (replicas older than the maximum staleness) are left out."""
    by_region: dict[str, list[Record]] = {}
    for record in records:
        if query.matches(record):
            by_region.setdefault(record.region, []).append(record)
    if servable is not None:
        for region in [r for r in by_region if r != local and not servable(r)]:
            del by_region[region]
    chosen = by_region.pop(local, [])
    if query.scope == Scope.FAILOVER:
        nearest = [r for r in dict.fromkeys(proximity) if r in by_region]  # a repeated region counts once
        order = nearest + sorted(set(by_region) - set(nearest))
        for region in order:
            if sum(r.status == Status.SERVING for r in chosen) >= query.min_healthy:
                break
            chosen += by_region[region]
    elif query.scope == Scope.ALL:
        for region in sorted(by_region):
            chosen += by_region[region]
    return chosen
