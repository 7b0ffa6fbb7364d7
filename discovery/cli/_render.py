"""Instances, endpoints and changes as table rows and lines (their JSON form: discovery/answers.py)."""

from __future__ import annotations

import datetime

from discovery.answers import change_dict, endpoint_dict, instance_dict, origin_dict, region_dict, watch_dict
from discovery_pb.v1.admin_pb2 import HealthCheckerStatus, OriginStatus
from discovery_pb.v1.lookup_pb2 import RegionState, WatchResponse
from discovery_pb.v1.types_pb2 import Change, CheckResult, Instance, Status


def check_line(inst: Instance) -> str:
    """``db-1: check critical since 2026-11-30T23:01:02Z: tcp connect refused, ...``."""
    result = inst.check_result
    since = datetime.datetime.fromtimestamp(result.since_ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    state = CheckResult.State.Name(result.state).lower()
    return f"{inst.instance_id}: check {state} since {since}: {result.reason}"


def checks_line(h: HealthCheckerStatus) -> str:
    return (
        f"{h.checks_here} of the region's {h.checks} run here ({len(h.checkers)} checkers); "
        f"{h.probes} probes, {h.failures} failed, {h.transitions} verdicts written, {h.held} held "
        f"({h.refused} refused by a peer); probes late p50 {h.lateness_p50_ms:.1f} ms, "
        f"p99 {h.lateness_p99_ms:.1f} ms"
    )


def region_line(r: RegionState) -> str:
    where = "local" if r.local else "replica"
    if not r.stale:
        freshness = "fresh"
    elif r.stale_seconds < 0:
        freshness = "STALE (never heard from)"
    else:
        freshness = f"STALE for {r.stale_seconds:.1f}s"
    return f"{r.region}: {r.endpoints} endpoints ({where}, {freshness})"


# Two tables, so that each fits 80 columns: how each origin is doing, then who pulls it from where
# (two addresses alone take 44 columns).
ORIGIN_HEADER = ["ORIGIN", "STATE", "CHECKPOINT", "LAG", "CONTACT", "REPLICAS"]
ORIGIN_PATH_HEADER = ["ORIGIN", "LEADER (PULLS IT)", "SOURCE (PULLED FROM)"]


def origin_row(o: OriginStatus) -> list[str]:
    return [
        o.origin,
        "connected" if o.connected else "DISCONNECTED",
        str(o.checkpoint_revision),
        f"{o.lag_revisions} rev/{o.lag_seconds:.1f}s",
        f"{o.last_contact_seconds:.1f}s ago" if o.last_contact_seconds or o.connected else "never",
        str(o.replicas),
    ]


def origin_path_row(o: OriginStatus) -> list[str]:
    return [o.origin, o.leader or "-", o.source or "-"]


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


__all__ = [
    "INSTANCE_HEADER",
    "ORIGIN_HEADER",
    "ORIGIN_PATH_HEADER",
    "change_dict",
    "endpoint_dict",
    "instance_dict",
    "instance_row",
    "origin_dict",
    "origin_path_row",
    "origin_row",
    "region_dict",
    "region_line",
    "watch_dict",
    "watch_lines",
]
