"""The instance index: every instance under the prefix, by key and by service, with a
generation per service, a count per region, and (for authorization) the instances on each
lease and the instances each owner holds per region. Resolve, Watch snapshots, xDS and Status read
it; only the view writes it, one etcd event at a time.

A record is kept compactly (issue 13, memory): the value as etcd stored it (protobuf bytes,
shared with the change history) and, decoded, only what the hot paths filter on (region,
status as served, check verdict, zone, tags, owner), with repeated strings and tag lists shared between records. The
full ``Instance`` is decoded on demand (``Record.instance``), a fresh message each time."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from discovery.keys import InstanceKey
from discovery.model import serving_status
from discovery_pb.v1.types_pb2 import Instance

_K = TypeVar("_K")
_SHARED_TAGS_LIMIT = 1 << 16  # distinct tag lists shared; past that the table starts again


class Shared:
    """Shares the strings and tag lists that repeat across records (regions, services, zones,
    owners, tags): one object each instead of one per record. Strings go through
    ``sys.intern`` (freed once no record holds them); tag lists through a bounded table."""

    def __init__(self) -> None:
        self._tags: dict[tuple[str, ...], tuple[str, ...]] = {}

    def tags(self, tags: Iterable[str]) -> tuple[str, ...]:
        key = tuple(tags)
        if not key:
            return ()
        shared = self._tags.get(key)
        if shared is None:
            if len(self._tags) >= _SHARED_TAGS_LIMIT:
                self._tags.clear()
            shared = self._tags[key] = tuple(sys.intern(t) for t in key)
        return shared

    @staticmethod
    def key(key: InstanceKey) -> InstanceKey:
        return InstanceKey(sys.intern(key.region), sys.intern(key.service), key.instance_id)


_SHARED = Shared()  # for records built outside a view (tests, tools)


class Record:
    """One instance as the view holds it: ``value`` (the record's protobuf bytes, exactly as
    stored), the etcd ``mod_revision`` and ``lease``, and the fields answers filter on."""

    __slots__ = ("check", "lease", "mod_revision", "owner", "region", "status", "tags", "value", "zone")

    def __init__(self, instance: Instance, mod_revision: int, lease: int) -> None:
        self._fill(instance.SerializeToString(), instance, mod_revision, lease, _SHARED)

    @classmethod
    def decoded(cls, value: bytes, instance: Instance, mod_revision: int, lease: int, shared: Shared) -> Record:
        """The record of ``value``, which decodes to ``instance`` (kept: ``value``, not ``instance``)."""
        record = cls.__new__(cls)
        record._fill(value, instance, mod_revision, lease, shared)
        return record

    def _fill(self, value: bytes, instance: Instance, mod_revision: int, lease: int, shared: Shared) -> None:
        self.value = value
        self.mod_revision = mod_revision
        self.lease = lease
        self.region = sys.intern(instance.region)
        # ``status`` is what the endpoint is served as (the one rule, model.serving_status);
        # ``check`` the check's verdict (0: none), so answers can show it without decoding.
        self.check = instance.check_result.state
        self.status = serving_status(instance.status, self.check)
        self.zone = sys.intern(instance.zone)
        self.tags = shared.tags(instance.tags)
        self.owner = sys.intern(instance.owner)

    @property
    def instance(self) -> Instance:
        """The record decoded: a new message each time (changing it changes nothing here)."""
        return Instance.FromString(self.value)

    def __repr__(self) -> str:
        return f"Record({self.instance!r}, mod_revision={self.mod_revision}, lease={self.lease})"


class Index:
    def __init__(self) -> None:
        self.shared = Shared()
        self._records: dict[InstanceKey, Record] = {}
        self._by_service: dict[str, dict[InstanceKey, Record]] = {}
        self._generations: dict[str, int] = {}
        self._next_generation = itertools.count(1)
        self._region_counts: dict[str, int] = {}
        self._leases: dict[int, set[InstanceKey]] = {}
        # (region, owner) -> total, and (region, owner, service) -> count: quotas read these.
        self._owned: dict[tuple[str, str], int] = {}
        self._owned_in_service: dict[tuple[str, str, str], int] = {}

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

    def service_names(self) -> list[str]:
        return list(self._by_service)

    def service(self, name: str) -> Iterable[Record]:
        return self._by_service.get(name, {}).values()

    def service_generation(self, name: str) -> int:
        """Changes whenever the service's instances change (0 while it has none); unique
        across services coming and going, so a cache keyed on it is never fooled."""
        return self._generations.get(name, 0)

    def snapshot(self, service: str, region: str = "") -> list[Instance]:
        records = self._by_service.get(service, {}).values() if service else self._records.values()
        return [Instance.FromString(r.value) for r in records if not region or r.region == region]

    def on_lease(self, lease: int) -> list[Record]:
        """The records attached to etcd lease ``lease`` (empty when none is known)."""
        return [self._records[k] for k in self._leases.get(lease, ())]

    def owned(self, region: str, owner: str, service: str = "") -> int:
        """How many instances of ``region`` ``owner`` holds (in ``service``, when given)."""
        if service:
            return self._owned_in_service.get((region, owner, service), 0)
        return self._owned.get((region, owner), 0)

    def put(self, key: InstanceKey, record: Record) -> InstanceKey:
        """Returns ``key`` as kept (its strings shared)."""
        key = Shared.key(key)  # its region and service shared with every other key's
        old = self._records.get(key)
        if old is None:
            self._count(key.region, 1)
        else:
            self._unlink(key, old)
        self._link(key, record)
        self._records[key] = record
        self._by_service.setdefault(key.service, {})[key] = record
        self._touch(key.service)
        return key

    def remove(self, key: InstanceKey) -> bool:
        """Whether there was such an instance (a delete of an unknown key is no change)."""
        old = self._records.pop(key, None)
        if old is None:
            return False
        self._unlink(key, old)
        self._count(key.region, -1)
        bucket = self._by_service.get(key.service)
        if bucket is not None:
            bucket.pop(key, None)
            if not bucket:
                del self._by_service[key.service]
        self._touch(key.service)
        return True

    def _link(self, key: InstanceKey, record: Record) -> None:
        if record.lease:
            self._leases.setdefault(record.lease, set()).add(key)
        owner = record.owner
        _bump(self._owned, (key.region, owner), 1)
        _bump(self._owned_in_service, (key.region, owner, key.service), 1)

    def _unlink(self, key: InstanceKey, record: Record) -> None:
        if record.lease:
            keys = self._leases.get(record.lease)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._leases[record.lease]
        owner = record.owner
        _bump(self._owned, (key.region, owner), -1)
        _bump(self._owned_in_service, (key.region, owner, key.service), -1)

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


def _bump(counts: dict[_K, int], key: _K, delta: int) -> None:
    left = counts.get(key, 0) + delta
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
