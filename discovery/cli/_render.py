"""Instances, endpoints and changes as JSON-ready dicts and table rows."""

from __future__ import annotations

import datetime
from typing import Any

from discovery_pb.v1.admin_pb2 import HealthCheckerStatus, OriginStatus
from discovery_pb.v1.lookup_pb2 import RegionState, WatchResponse
from discovery_pb.v1.types_pb2 import Change, CheckResult, Endpoint, Instance, Status


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


def check_line(inst: Instance) -> str:
    """``db-1: check critical since 2026-11-30T23:01:02Z: tcp connect refused, ...``."""
    result = inst.check_result
    since = datetime.datetime.fromtimestamp(result.since_ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    state = CheckResult.State.Name(result.state).lower()
    return f"{inst.instance_id}: check {state} since {since}: {result.reason}"


def checks_dict(h: HealthCheckerStatus) -> dict[str, Any]:
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


def checks_line(h: HealthCheckerStatus) -> str:
    return (
        f"{h.checks_here} of the region's {h.checks} run here ({len(h.checkers)} checkers); "
        f"{h.probes} probes, {h.failures} failed, {h.transitions} verdicts written, {h.held} held "
        f"({h.refused} refused by a peer); probes late p50 {h.lateness_p50_ms:.1f} ms, "
        f"p99 {h.lateness_p99_ms:.1f} ms"
    )


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


def region_line(r: RegionState) -> str:
    where = "local" if r.local else "replica"
    if not r.stale:
        freshness = "fresh"
    elif r.stale_seconds < 0:
        freshness = "STALE (never heard from)"
    else:
        freshness = f"STALE for {r.stale_seconds:.1f}s"
    return f"{r.region}: {r.endpoints} endpoints ({where}, {freshness})"


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


ORIGIN_HEADER = ["ORIGIN", "STATE", "LEADER", "SOURCE", "CHECKPOINT", "LAG", "LAST CONTACT", "REPLICAS"]


def origin_row(o: OriginStatus) -> list[str]:
    return [
        o.origin,
        "connected" if o.connected else "DISCONNECTED",
        o.leader or "-",
        o.source or "-",
        str(o.checkpoint_revision),
        f"{o.lag_revisions} rev / {o.lag_seconds:.1f}s",
        f"{o.last_contact_seconds:.1f}s ago" if o.last_contact_seconds or o.connected else "never",
        str(o.replicas),
    ]


def instance_row(inst: Instance, stale: bool = False) -> list[str]:
    return [
        inst.instance_id,
        inst.address,
        inst.region,
        inst.zone or "-",
        Status.Name(inst.status),
        str(inst.weight),
        ",".join(inst.tags) or "-",
        ",".join(f"{k}={v}" for k, v in sorted(inst.metadata.items())) or "-",
        "stale" if stale else "",
    ]


INSTANCE_HEADER = ["ID", "ADDRESS", "REGION", "ZONE", "STATUS", "WEIGHT", "TAGS", "METADATA", ""]


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


def watch_lines(msg: WatchResponse) -> list[str]:
    """Human lines for one Watch message: one per instance or change."""
    stale = " (stale)" if msg.stale else ""
    if msg.kind == WatchResponse.SNAPSHOT:
        lines = [f"= {i.service} {i.instance_id} {i.address} {Status.Name(i.status)}" for i in msg.instances]
        return [*lines, f"# snapshot at revision {msg.revision}{stale}"] if not msg.more else lines
    lines = []
    for c in msg.changes:
        if c.kind == Change.PUT:
            inst = c.instance
            lines.append(f"+ {c.service} {c.instance_id} {inst.address} {Status.Name(inst.status)} @{c.revision}")
        else:
            lines.append(f"- {c.service} {c.instance_id} @{c.revision}")
    return lines
