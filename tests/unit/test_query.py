"""discovery.query.select: scopes across regions, min_healthy, status/tag/zone filters."""

from __future__ import annotations

import pytest

from discovery.query import Query, select
from discovery.view import Record
from discovery_pb.v1.lookup_pb2 import Scope
from discovery_pb.v1.types_pb2 import Instance, Status

SERVING, DRAINING, NOT_SERVING = Status.SERVING, Status.DRAINING, Status.NOT_SERVING


def rec(ident: str, region: str = "us", status: int = SERVING, zone: str = "", tags: tuple[str, ...] = ()) -> Record:
    instance = Instance(
        service="web", instance_id=ident, region=region, zone=zone, address="10.0.0.1:80", status=status, tags=tags
    )
    return Record(instance, mod_revision=1, lease=0)


def ids(records: list[Record]) -> list[str]:
    return [r.instance.instance_id for r in records]


# Three regions: the local one ("us") has one serving and one draining instance.
FLEET = [
    rec("us-1"),
    rec("us-2", status=DRAINING),
    rec("eu-1", region="eu"),
    rec("eu-2", region="eu"),
    rec("ap-1", region="ap"),
    rec("sa-1", region="sa", status=NOT_SERVING),
]


@pytest.mark.parametrize(
    ("scope", "min_healthy", "proximity", "expected"),
    [
        (Scope.LOCAL, 1, (), ["us-1"]),
        (Scope.LOCAL, 5, ("eu",), ["us-1"]),  # LOCAL never leaves the region
        (Scope.SCOPE_UNSPECIFIED, 5, (), ["us-1"]),  # unspecified is LOCAL
        (Scope.FAILOVER, 1, ("eu",), ["us-1"]),  # enough at home
        (Scope.FAILOVER, 2, ("eu", "ap"), ["us-1", "eu-1", "eu-2"]),  # nearest first, whole region
        (Scope.FAILOVER, 2, ("ap", "eu"), ["us-1", "ap-1"]),
        (Scope.FAILOVER, 3, ("ap",), ["us-1", "ap-1", "eu-1", "eu-2"]),  # then the rest, by name
        (Scope.FAILOVER, 2, (), ["us-1", "ap-1"]),  # no proximity: by name
        (Scope.FAILOVER, 10, ("eu",), ["us-1", "eu-1", "eu-2", "ap-1"]),  # not enough anywhere: all
        (Scope.FAILOVER, 10, ("eu", "eu", "us"), ["us-1", "eu-1", "eu-2", "ap-1"]),  # repeats count once
        (Scope.FAILOVER, 0, ("eu",), ["us-1"]),
        (Scope.ALL, 1, ("eu",), ["us-1", "ap-1", "eu-1", "eu-2"]),  # local first, then by name
    ],
)
def test_scopes(scope: int, min_healthy: int, proximity: tuple[str, ...], expected: list[str]) -> None:
    query = Query("web", scope=scope, min_healthy=min_healthy)
    assert ids(select(FLEET, query, "us", proximity)) == expected


def test_failover_when_local_region_is_empty() -> None:
    query = Query("web", scope=Scope.FAILOVER)
    assert ids(select(FLEET, query, "af", ("ap", "eu"))) == ["ap-1"]


def test_failover_counts_only_serving_as_healthy() -> None:
    query = Query("web", scope=Scope.FAILOVER, statuses=frozenset({SERVING, DRAINING}), min_healthy=2)
    # us-2 is DRAINING: it is returned but does not count towards min_healthy.
    assert ids(select(FLEET, query, "us", ("ap", "eu"))) == ["us-1", "us-2", "ap-1"]


def test_all_with_every_status() -> None:
    query = Query("web", scope=Scope.ALL, statuses=frozenset({SERVING, DRAINING, NOT_SERVING}))
    assert ids(select(FLEET, query, "us")) == ["us-1", "us-2", "ap-1", "eu-1", "eu-2", "sa-1"]


TAGGED = [
    rec("a", zone="z1", tags=("canary", "v2")),
    rec("b", zone="z1", tags=("v2",)),
    rec("c", zone="z2", tags=("canary", "v2", "gpu")),
    rec("d", zone="z2", status=DRAINING, tags=("canary",)),
    rec("e", status=NOT_SERVING),
]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, ["a", "b", "c"]),
        ({"statuses": frozenset({DRAINING})}, ["d"]),
        ({"statuses": frozenset({SERVING, NOT_SERVING})}, ["a", "b", "c", "e"]),
        ({"tags": frozenset({"v2"})}, ["a", "b", "c"]),
        ({"tags": frozenset({"canary", "v2"})}, ["a", "c"]),  # every tag must match
        ({"tags": frozenset({"canary", "nope"})}, []),
        ({"zone": "z1"}, ["a", "b"]),
        ({"zone": "z3"}, []),
        ({"zone": "z2", "tags": frozenset({"canary"})}, ["c"]),
        ({"zone": "z2", "tags": frozenset({"canary"}), "statuses": frozenset({SERVING, DRAINING})}, ["c", "d"]),
    ],
)
def test_filters(filters: dict[str, object], expected: list[str]) -> None:
    query = Query("web", **filters)
    assert ids(select(TAGGED, query, "us")) == expected


def test_filters_apply_before_failover() -> None:
    records = [rec("us-1", zone="z1"), rec("eu-1", region="eu", zone="z2"), rec("ap-1", region="ap", zone="z2")]
    query = Query("web", scope=Scope.FAILOVER, zone="z2")
    assert ids(select(records, query, "us", ("eu",))) == ["eu-1"]


def test_select_on_nothing() -> None:
    assert select([], Query("web", scope=Scope.ALL), "us") == []


def test_regions_past_the_maximum_staleness_are_left_out_but_never_the_local_one() -> None:
    query = Query("web", scope=Scope.ALL)
    too_old = {"eu", "us"}  # "us" is local: its own records are always served
    got = select(FLEET, query, "us", ("eu", "ap"), servable=lambda region: region not in too_old)
    assert ids(got) == ["us-1", "ap-1"]
    failover = select(
        [rec("eu-1", region="eu"), rec("ap-1", region="ap")],
        Query("web", scope=Scope.FAILOVER),
        "us",
        ("eu", "ap"),
        servable=lambda region: region != "eu",
    )
    assert ids(failover) == ["ap-1"]  # the nearest region is too stale: the next one serves
