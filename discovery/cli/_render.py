"""Instances, endpoints and changes as JSON-ready dicts and table rows."""

from __future__ import annotations

from typing import Any

from discovery_pb.v1.lookup_pb2 import WatchResponse
from discovery_pb.v1.types_pb2 import Change, Endpoint, Instance, Status


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
    }


def endpoint_dict(ep: Endpoint) -> dict[str, Any]:
    return instance_dict(ep.instance, ep.stale)


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
