"""Answers as JSON-ready dicts, one form for every door: the command line's ``--json``
(``discovery resolve``, ``status``, ``watch``) and the HTTP API (discovery/http/) print the
same fields, built here from the same protobuf messages the gRPC API answers with."""

from __future__ import annotations

from typing import Any

from discovery_pb.v1.admin_pb2 import HealthCheckerStatus, OriginStatus, StatusResponse
from discovery_pb.v1.lookup_pb2 import RegionState, ResolveResponse, WatchResponse
from discovery_pb.v1.types_pb2 import Change, CheckResult, Endpoint, Instance, Status

__all__ = [
    "change_dict",
    "check_dict",
    "checks_dict",
    "endpoint_dict",
    "instance_dict",
    "origin_dict",
    "region_dict",
    "resolve_dict",
    "status_dict",
    "watch_dict",
]


def instance_dict(inst: Instance, stale: bool = False) -> dict[str, Any]:
    return {
        "instance_id": inst.instance_id,
        "address": inst.address,
        "region": inst.region,
        "zone": inst.zone,
        "status": Status.Name(inst.status),
        "weight": inst.weight,
        "tags": list(inst.tags),
        "metadata": dict(inst.metadata),
        "stale": stale,
        "ttl_seconds": inst.ttl_seconds,
        "version": inst.version,
        **({"check": check_dict(inst)} if inst.HasField("check_result") else {}),
    }


def check_dict(inst: Instance) -> dict[str, Any]:
    """The health check's verdict (docs/health-checks.md)."""
    result = inst.check_result
    return {
        "state": CheckResult.State.Name(result.state).lower(),
        "since_ms": result.since_ms,
        "reason": result.reason,
        "checker": result.checker,
    }


def checks_dict(h: HealthCheckerStatus) -> dict[str, Any]:
    """This server's share of its region's health checks (Status)."""
    return {
        "checkers": list(h.checkers),
        "checks": h.checks,
        "checks_here": h.checks_here,
        "probes": h.probes,
        "failures": h.failures,
        "transitions": h.transitions,
        "held": h.held,
        "refused": h.refused,
        "lateness_p50_ms": round(h.lateness_p50_ms, 2),
        "lateness_p99_ms": round(h.lateness_p99_ms, 2),
    }


def endpoint_dict(ep: Endpoint) -> dict[str, Any]:
    out = instance_dict(ep.instance, ep.stale)
    if ep.stale:
        out["age_seconds"] = round(ep.age_seconds, 1)
    return out


def region_dict(r: RegionState) -> dict[str, Any]:
    return {
        "region": r.region,
        "local": r.local,
        "endpoints": r.endpoints,
        "stale": r.stale,
        "stale_seconds": round(r.stale_seconds, 1),
    }


def origin_dict(o: OriginStatus) -> dict[str, Any]:
    return {
        "origin": o.origin,
        "connected": o.connected,
        "leader": o.leader,
        "source": o.source,
        "checkpoint_revision": o.checkpoint_revision,
        "head_revision": o.head_revision,
        "lag_revisions": o.lag_revisions,
        "lag_seconds": round(o.lag_seconds, 3),
        "last_contact_seconds": round(o.last_contact_seconds, 3),
        "replicas": o.replicas,
        "heartbeat_seconds": round(o.heartbeat_seconds, 3),
        "warning": o.warning,
    }


def change_dict(change: Change) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": Change.Kind.Name(change.kind),
        "revision": change.revision,
        "service": change.service,
        "region": change.region,
        "instance_id": change.instance_id,
    }
    if change.kind == Change.PUT:
        out["instance"] = instance_dict(change.instance)
    return out


def watch_dict(msg: WatchResponse) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": WatchResponse.Kind.Name(msg.kind), "revision": msg.revision, "stale": msg.stale}
    if msg.kind == WatchResponse.SNAPSHOT:
        out["instances"] = [instance_dict(i, msg.stale) for i in msg.instances]
        out["more"] = msg.more
    elif msg.kind == WatchResponse.CHANGES:
        out["changes"] = [change_dict(c) for c in msg.changes]
    return out


def resolve_dict(resp: ResolveResponse) -> dict[str, Any]:
    """``discovery resolve --json`` and ``GET /v1/services/{name}``."""
    return {
        "service": resp.service,
        "revision": resp.revision,
        "stale": resp.stale,
        "endpoints": [endpoint_dict(ep) for ep in resp.endpoints],
        "regions": [region_dict(r) for r in resp.regions],
    }


def status_dict(resp: StatusResponse) -> dict[str, Any]:
    """``discovery status --json`` and ``GET /v1/status``."""
    return {
        "region": resp.region,
        "revision": resp.revision,
        "instance_count": resp.instance_count,
        "service_count": resp.service_count,
        "stale": resp.stale,
        "etcd": {
            "endpoints": list(resp.etcd.endpoints),
            "healthy": resp.etcd.healthy,
            "error": resp.etcd.error,
            "last_contact_seconds": round(resp.etcd.last_contact_seconds, 3),
        },
        "server_version": resp.server_version,
        "uptime_seconds": round(resp.uptime_seconds, 1),
        "origins": [origin_dict(o) for o in resp.origins],
        **({"health_checks": checks_dict(resp.health_checks)} if resp.HasField("health_checks") else {}),
    }
