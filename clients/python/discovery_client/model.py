"""What the client hands out: endpoints and resolutions (immutable), and the query that selects them."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from discovery_client.checks import CheckState
from discovery_client.errors import InvalidArgument

# The weight of an instance registered without one (a record's 0): the server writes it too.
DEFAULT_WEIGHT = 100


class Status(enum.IntEnum):
    """An instance's health as its owner reports it (the values of discovery.v1.Status)."""

    SERVING = 1
    DRAINING = 2
    NOT_SERVING = 3


class Scope(enum.IntEnum):
    """Which regions an answer draws from (the values of discovery.v1.Scope).

    LOCAL: this client's region only. FAILOVER: this region, then the failover regions in
    configured order (then any other, by name) until ``min_healthy`` SERVING endpoints are
    found. ALL: every region the view holds.
    """

    LOCAL = 1
    FAILOVER = 2
    ALL = 3


InstanceKey = tuple[str, str]  # (region, instance_id): unique within a service


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One resolved instance of a service."""

    service: str
    instance_id: str
    region: str
    zone: str
    address: str
    weight: int
    status: Status
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    version: str = ""
    check: CheckState | None = None  # the health check's verdict, when it has one

    @property
    def key(self) -> InstanceKey:
        return (self.region, self.instance_id)

    @property
    def host(self) -> str:
        host = self.address.rpartition(":")[0]
        return host[1:-1] if host.startswith("[") else host

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @classmethod
    def from_proto(cls, inst: Any) -> Endpoint:
        return cls(
            service=inst.service,
            instance_id=inst.instance_id,
            region=inst.region,
            zone=inst.zone,
            address=inst.address,
            weight=inst.weight or DEFAULT_WEIGHT,
            status=Status(inst.status) if inst.status in _STATUS_VALUES else Status.SERVING,
            tags=tuple(inst.tags),
            metadata=MappingProxyType(dict(inst.metadata)),
            version=inst.version,
            check=CheckState.from_proto(inst),
        )


_STATUS_VALUES = frozenset(int(s) for s in Status)


@dataclass(frozen=True, slots=True)
class Resolution:
    """The endpoints of a service as this client knows them.

    Attributes:
        service: the service name.
        endpoints: the matching endpoints, this region first (then failover order), each
            region's sorted by instance id.
        revision: the revision of the view that answered (a server's etcd revision).
        stale: True when the answer may be out of date: no server is reachable (the
            client answers from its last view, or from its cache file), or the server that
            fed it has itself lost contact with its etcd.
        source: the server (``host:port``) whose Watch fed the view, or ``"file"``.
        held: True while the guard holds back a destructive update of this service.
    """

    service: str
    endpoints: tuple[Endpoint, ...]
    revision: int
    stale: bool
    source: str
    held: bool = False

    def __len__(self) -> int:
        return len(self.endpoints)

    @property
    def addresses(self) -> list[str]:
        return [e.address for e in self.endpoints]


_SCOPE_NAMES = {s.name.lower(): s for s in Scope}
_STATUS_NAMES = {s.name.lower(): s for s in Status}
_DEFAULT_STATUSES = frozenset({Status.SERVING})


def to_scope(scope: Scope | str | int) -> Scope:
    if isinstance(scope, str):
        try:
            return _SCOPE_NAMES[scope.lower()]
        except KeyError:
            raise InvalidArgument(f"unknown scope {scope!r}; use local, failover or all") from None
    return Scope(scope)


def to_statuses(statuses: Iterable[Status | str | int] | None) -> frozenset[Status]:
    if not statuses:
        return _DEFAULT_STATUSES
    out = set()
    for s in statuses:
        if isinstance(s, str):
            if s.lower() not in _STATUS_NAMES:
                raise InvalidArgument(f"unknown status {s!r}; use serving, draining or not_serving")
            out.add(_STATUS_NAMES[s.lower()])
        else:
            out.add(Status(s))
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Query:
    """Which endpoints of a service to return (as the server's ResolveRequest)."""

    scope: Scope = Scope.FAILOVER
    statuses: frozenset[Status] = _DEFAULT_STATUSES
    tags: frozenset[str] = frozenset()
    zone: str = ""
    min_healthy: int = 1

    def matches(self, e: Endpoint) -> bool:
        return (
            e.status in self.statuses
            and (not self.zone or e.zone == self.zone)
            and (not self.tags or self.tags.issubset(e.tags))
        )


def select(endpoints: Iterable[Endpoint], query: Query, local: str, proximity: Sequence[str]) -> tuple[Endpoint, ...]:
    """The client-side twin of the server's selection: local region first; FAILOVER adds
    regions in ``proximity`` order (then by name) until ``min_healthy`` are SERVING."""
    by_region: dict[str, list[Endpoint]] = {}
    for e in endpoints:
        if query.matches(e):
            by_region.setdefault(e.region, []).append(e)
    for group in by_region.values():
        group.sort(key=lambda e: e.instance_id)
    chosen = by_region.pop(local, [])
    if query.scope == Scope.FAILOVER:
        nearest = [r for r in proximity if r in by_region]
        for region in nearest + sorted(set(by_region) - set(nearest)):
            if sum(e.status == Status.SERVING for e in chosen) >= max(1, query.min_healthy):
                break
            chosen += by_region[region]
    elif query.scope == Scope.ALL:
        nearest = [r for r in proximity if r in by_region]
        for region in nearest + sorted(set(by_region) - set(nearest)):
            chosen += by_region[region]
    return tuple(chosen)
