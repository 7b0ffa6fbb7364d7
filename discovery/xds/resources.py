"""xDS resources from view records: pure functions, no gRPC, no I/O.

One service is four resources, all named after the service, so ``xds:///web`` needs no
name mapping: Listener ``web`` (an api_listener whose HttpConnectionManager carries the route
inline), RouteConfiguration ``web`` (served too, for clients that ask for it by RDS), Cluster
``web`` (EDS over ADS) and ClusterLoadAssignment ``web``. Every rule below is one a stock gRPC
client enforces; breaking it gets the whole update NACKed (docs/xds.md lists them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.address_pb2 import Address, SocketAddress
from envoy.config.core.v3.base_pb2 import Locality, Metadata
from envoy.config.core.v3.config_source_pb2 import AggregatedConfigSource, ApiVersion, ConfigSource
from envoy.config.core.v3.health_check_pb2 import HealthStatus
from envoy.config.endpoint.v3.endpoint_components_pb2 import Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.api_listener_pb2 import ApiListener
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_components_pb2 import Route, RouteAction, RouteMatch, VirtualHost
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
    HttpFilter,
)
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import UInt32Value

from discovery_pb.v1.types_pb2 import Instance, Status

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPE_URLS = (LISTENER, ROUTE, CLUSTER, ENDPOINTS)
SHORT_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINTS: "EDS"}

METADATA_KEY = "discovery"  # filter_metadata key of our endpoint and locality metadata
_ROUTER = "envoy.filters.http.router"
_MAX_LOCALITY_WEIGHT = 2**32 - 1


def listener(service: str) -> Listener:
    """An api_listener for ``xds:///<service>``: gRPC insists on the router filter, a virtual
    host with domains and a route with a match."""
    manager = HttpConnectionManager(
        stat_prefix=service,
        route_config=route_configuration(service),
        http_filters=[HttpFilter(name=_ROUTER, typed_config=_pack(Router()))],
    )
    return Listener(name=service, api_listener=ApiListener(api_listener=_pack(manager)))


def route_configuration(service: str) -> RouteConfiguration:
    route = Route(match=RouteMatch(prefix=""), route=RouteAction(cluster=service))
    return RouteConfiguration(name=service, virtual_hosts=[VirtualHost(name=service, domains=["*"], routes=[route])])


def cluster(service: str) -> Cluster:
    """EDS over the same ADS stream; round robin within a locality."""
    source = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)
    return Cluster(
        name=service,
        type=Cluster.EDS,
        eds_cluster_config=Cluster.EdsClusterConfig(eds_config=source, service_name=service),
        lb_policy=Cluster.ROUND_ROBIN,
    )


def health(status: int, stale: bool) -> int:
    """Our status as an xDS health status. gRPC uses HEALTHY and UNKNOWN endpoints, keeps
    DRAINING ones only for existing affinity, and drops every other status. A serving replica
    of a region we have lost contact with is UNKNOWN: still used (serving stale beats serving
    nothing, docs/replication.md), yet told apart from a fresh one."""
    if status == Status.DRAINING:
        return int(HealthStatus.DRAINING)
    if status == Status.NOT_SERVING:
        return int(HealthStatus.UNHEALTHY)
    return int(HealthStatus.UNKNOWN if stale else HealthStatus.HEALTHY)


def usable(status: int) -> bool:
    return status not in (Status.DRAINING, Status.NOT_SERVING)


def region_order(perspective: str, local: str, peers: Sequence[str], present: Iterable[str]) -> list[str]:
    """The regions of ``present`` in priority order: the client's region, then this server's,
    then its peers in proximity order, then any other region by name (as FAILOVER does)."""
    wanted = set(present)
    order = [r for r in dict.fromkeys((perspective, local, *peers)) if r in wanted]
    return order + sorted(wanted - set(order))


@dataclass(frozen=True, slots=True)
class Skipped:
    """An instance left out of a ClusterLoadAssignment, and why (for the log)."""

    instance: Instance
    reason: str


def load_assignment(
    service: str,
    instances: Iterable[Instance],
    order: Sequence[str],
    stale: Mapping[str, bool],
) -> tuple[ClusterLoadAssignment, list[Skipped]]:
    """Endpoints of ``service``: the regions of ``order`` at priorities 0, 1, 2, ... (only
    regions that have instances, so there is never a gap), one locality per (region, zone),
    instance weight as endpoint weight, status as health status, stale regions marked.

    A region whose instances all drain or are not serving keeps its priority: gRPC finds
    nothing usable there and moves on to the next priority by itself (queueing calls while
    that region connects), and comes back as soon as an instance serves again.

    gRPC rejects the whole resource for a hostname address, a repeated address, a zero
    weight or a gap in priorities, so those never reach it: hostnames and repeats are left out
    and returned as ``Skipped`` (the first occurrence in priority order wins, a serving
    instance before others); every weight is at least 1.
    """
    by_region: dict[str, list[Instance]] = {}
    for inst in instances:
        by_region.setdefault(inst.region, []).append(inst)
    skipped: list[Skipped] = []
    seen: set[tuple[str, int]] = set()
    built: list[list[LocalityLbEndpoints]] = []
    for region in order:
        members = sorted(by_region.get(region, ()), key=lambda i: (not usable(i.status), i.instance_id))
        localities = _localities(region, members, stale.get(region, False), seen, skipped)
        if localities:
            built.append(localities)
    cla = ClusterLoadAssignment(cluster_name=service)
    for priority, localities in enumerate(built):
        for locality in localities:
            locality.priority = priority
            cla.endpoints.append(locality)
    return cla, skipped


def _localities(
    region: str, members: list[Instance], stale: bool, seen: set[tuple[str, int]], skipped: list[Skipped]
) -> list[LocalityLbEndpoints]:
    """One locality per zone of the region."""
    zones: dict[str, list[LbEndpoint]] = {}
    weights: dict[str, int] = {}
    for inst in members:
        parsed = _socket(inst.address)
        if parsed is None or parsed in seen:
            skipped.append(Skipped(inst, "not an IP address" if parsed is None else "address repeated"))
            continue
        seen.add(parsed)
        zones.setdefault(inst.zone, []).append(_endpoint(inst, parsed, stale))
        if usable(inst.status):
            weights[inst.zone] = weights.get(inst.zone, 0) + max(1, inst.weight)
    return [
        LocalityLbEndpoints(
            locality=Locality(region=region, zone=zone),
            lb_endpoints=zones[zone],
            # Weight 0 drops the locality, and a priority left without any is a NACK: a
            # locality with nothing usable keeps weight 1 (its calls go elsewhere anyway).
            load_balancing_weight=UInt32Value(value=min(_MAX_LOCALITY_WEIGHT, max(1, weights.get(zone, 0)))),
            metadata=_metadata(region=region, stale=stale),
        )
        for zone in sorted(zones)
    ]


def _endpoint(inst: Instance, socket: tuple[str, int], stale: bool) -> LbEndpoint:
    host, port = socket
    return LbEndpoint(
        endpoint=Endpoint(address=Address(socket_address=SocketAddress(address=host, port_value=port))),
        health_status=health(inst.status, stale),
        load_balancing_weight=UInt32Value(value=max(1, inst.weight)),
        metadata=_metadata(instance_id=inst.instance_id, stale=stale),
    )


def _socket(address: str) -> tuple[str, int] | None:
    """(IP, port) of a ``host:port`` address, the IP normalised so that two spellings of one
    address count as a repeat; None for a hostname (EDS for gRPC takes IP addresses only)."""
    host, _, port = address.rpartition(":")
    try:
        ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
        return str(ip), int(port)
    except ValueError:
        return None


def _metadata(**fields: str | bool) -> Metadata:
    data = Struct()
    data.update(fields)
    return Metadata(filter_metadata={METADATA_KEY: data})


def _pack(message: object) -> AnyPb:
    packed = AnyPb()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed
