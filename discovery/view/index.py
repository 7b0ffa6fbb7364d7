"""The instance index: every instance under the prefix, by key and by service, with a
generation per service and a count per region. Resolve, Watch snapshots, xDS and Status read
it; only the view writes it, one etcd event at a time."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from discovery.keys import InstanceKey
from discovery_pb.v1.types_pb2 import Instance


@dataclass(slots=True)
class Record:
    instance: Instance
    mod_revision: int
    lease: int


class Index:
    def __init__(self) -> None:
        self._records: dict[InstanceKey, Record] = {}
        self._by_service: dict[str, dict[InstanceKey, Record]] = {}
        self._generations: dict[str, int] = {}
        self._next_generation = itertools.count(1)
        self._region_counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[InstanceKey]:
        return iter(self._records)

    def get(self, key: InstanceKey) -> Record | None:
        return self._records.get(key)

    @property
    def service_count(self) -> int:
        return len(self._by_service)

    def region_count(self, region: str) -> int:
        return self._region_counts.get(region, 0)

    def service(self, name: str) -> Iterable[Record]:
        return self._by_service.get(name, {}).values()

    def service_generation(self, name: str) -> int:
        """Changes whenever the service's instances change (0 while it has none); unique
        across services coming and going, so a cache keyed on it is never fooled."""
        return self._generations.get(name, 0)

    def snapshot(self, service: str, region: str = "") -> list[Instance]:
        records = self._by_service.get(service, {}).values() if service else self._records.values()
        return [r.instance for r in records if not region or r.instance.region == region]

    def put(self, key: InstanceKey, record: Record) -> None:
        if key not in self._records:
            self._count(key.region, 1)
        self._records[key] = record
        self._by_service.setdefault(key.service, {})[key] = record
        self._touch(key.service)

    def remove(self, key: InstanceKey) -> bool:
        """Whether there was such an instance (a delete of an unknown key is no change)."""
        if self._records.pop(key, None) is None:
            return False
        self._count(key.region, -1)
        bucket = self._by_service.get(key.service)
        if bucket is not None:
            bucket.pop(key, None)
            if not bucket:
                del self._by_service[key.service]
        self._touch(key.service)
        return True

    def _touch(self, service: str) -> None:
        if service in self._by_service:
            self._generations[service] = next(self._next_generation)
        else:
            self._generations.pop(service, None)

    def _count(self, region: str, delta: int) -> None:
        left = self._region_counts.get(region, 0) + delta
        if left:
            self._region_counts[region] = left
        else:
            self._region_counts.pop(region, None)
