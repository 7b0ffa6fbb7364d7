"""The resource builder: pure functions from instances to xDS resources, checked against the
rules a stock gRPC client enforces (docs/xds.md)."""

from __future__ import annotations

from envoy.config.core.v3.health_check_pb2 import HealthStatus
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)

from discovery.xds import cluster, listener, load_assignment, region_order
from discovery_pb.v1.types_pb2 import DRAINING, NOT_SERVING, SERVING, Instance


def inst(instance_id: str, address: str, region: str = "a", zone: str = "", **fields: object) -> Instance:
    return Instance(service="web", instance_id=instance_id, address=address, region=region, zone=zone, **fields)


def flat(cla) -> list[tuple[int, str, str, str, int, int]]:
    """(priority, region, zone, address, health, weight) per endpoint, in order."""
    return [
        (
            loc.priority,
            loc.locality.region,
            loc.locality.zone,
            f"{e.endpoint.address.socket_address.address}:{e.endpoint.address.socket_address.port_value}",
            e.health_status,
            e.load_balancing_weight.value,
        )
        for loc in cla.endpoints
        for e in loc.lb_endpoints
    ]


def test_listener_is_an_api_listener_with_router_and_a_catch_all_route() -> None:
    lis = listener("web")
    manager = HttpConnectionManager()
    assert lis.name == "web" and lis.api_listener.api_listener.Unpack(manager)
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.router"]
    assert manager.http_filters[0].typed_config.Is(Router.DESCRIPTOR)
    (vhost,) = manager.route_config.virtual_hosts
    assert list(vhost.domains) == ["*"]
    (route,) = vhost.routes
    assert route.match.HasField("prefix") and route.route.cluster == "web"


def test_cluster_is_eds_over_ads() -> None:
    c = cluster("web")
    assert c.name == "web" and c.type == c.EDS and c.lb_policy == c.ROUND_ROBIN
    assert c.eds_cluster_config.eds_config.HasField("ads") and c.eds_cluster_config.service_name == "web"


def test_region_order_client_region_then_local_then_peers_then_the_rest() -> None:
    assert region_order("a", "a", ("b", "c"), {"c", "a", "z", "b", "y"}) == ["a", "b", "c", "y", "z"]
    assert region_order("c", "a", ("b", "c"), {"a", "b", "c"}) == ["c", "a", "b"]
    assert region_order("", "a", ("b",), {"b"}) == ["b"]  # no gap when the local region has none


def test_priorities_follow_the_order_with_zones_as_localities_and_weights() -> None:
    instances = [
        inst("c1", "10.2.0.1:80", region="c"),
        inst("a2", "10.0.0.2:80", zone="z2", weight=5),
        inst("a1", "10.0.0.1:80", zone="z1", weight=100),
        inst("a3", "10.0.0.3:80", zone="z1", weight=300),
    ]
    cla, skipped = load_assignment("web", instances, ["a", "b", "c"], {})
    assert not skipped and cla.cluster_name == "web"
    healthy = HealthStatus.HEALTHY
    assert flat(cla) == [
        (0, "a", "z1", "10.0.0.1:80", healthy, 100),
        (0, "a", "z1", "10.0.0.3:80", healthy, 300),
        (0, "a", "z2", "10.0.0.2:80", healthy, 5),
        (1, "c", "", "10.2.0.1:80", healthy, 1),  # region b has none: no gap; weight at least 1
    ]
    assert [loc.load_balancing_weight.value for loc in cla.endpoints] == [400, 5, 1]


def test_status_maps_to_health_and_a_locality_with_nothing_usable_keeps_weight_1() -> None:
    instances = [
        inst("a1", "10.0.0.1:80", status=DRAINING, weight=50),
        inst("a2", "10.0.0.2:80", status=NOT_SERVING),
        inst("b1", "10.1.0.1:80", region="b", status=SERVING),
    ]
    cla, _ = load_assignment("web", instances, ["a", "b"], {})
    assert [(p, r, h) for p, r, _, _, h, _ in flat(cla)] == [
        (0, "a", HealthStatus.DRAINING),
        (0, "a", HealthStatus.UNHEALTHY),
        (1, "b", HealthStatus.HEALTHY),
    ]
    assert cla.endpoints[0].load_balancing_weight.value == 1


def test_stale_regions_are_served_marked() -> None:
    instances = [inst("a1", "10.0.0.1:80"), inst("b1", "10.1.0.1:80", region="b")]
    cla, _ = load_assignment("web", instances, ["a", "b"], {"b": True})
    assert [h for *_, h, _ in flat(cla)] == [HealthStatus.HEALTHY, HealthStatus.UNKNOWN]
    marks = [loc.metadata.filter_metadata["discovery"]["stale"] for loc in cla.endpoints]
    assert marks == [False, True]
    b1 = cla.endpoints[1].lb_endpoints[0].metadata.filter_metadata["discovery"]
    assert b1["stale"] is True and b1["instance_id"] == "b1"


def test_hostnames_and_repeated_addresses_are_left_out_not_nacked() -> None:
    instances = [
        inst("a1", "[::1]:80"),
        inst("a2", "[0:0::1]:80"),  # the same address spelled differently
        inst("a3", "db.internal:80"),
        inst("b1", "10.1.0.1:80", region="b"),
        inst("b2", "[::1]:80", region="b"),  # already at priority 0
    ]
    cla, skipped = load_assignment("web", instances, ["a", "b"], {})
    assert [a for *_, a, _, _ in flat(cla)] == ["::1:80", "10.1.0.1:80"]
    assert sorted((s.instance.instance_id, s.reason) for s in skipped) == [
        ("a2", "address repeated"),
        ("a3", "not an IP address"),
        ("b2", "address repeated"),
    ]


def test_a_serving_instance_wins_a_repeated_address() -> None:
    instances = [inst("a1", "10.0.0.1:80", status=DRAINING), inst("a2", "10.0.0.1:80")]
    cla, skipped = load_assignment("web", instances, ["a"], {})
    assert [h for *_, h, _ in flat(cla)] == [HealthStatus.HEALTHY]
    assert [s.instance.instance_id for s in skipped] == ["a1"]


def test_no_instances_is_an_empty_assignment() -> None:
    cla, skipped = load_assignment("web", [], ["a"], {})
    assert cla.cluster_name == "web" and not cla.endpoints and not skipped
