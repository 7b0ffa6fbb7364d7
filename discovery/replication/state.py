"""How fresh each region's records are, as every server of the region sees it.

The replicator's leader writes its checkpoint (with the time it last heard from the origin)
at every message from the origin, which heartbeats several times per stale-after; every
server's view watches those keys, so any server, leader or not, can say how stale its
replicas of a region are without asking anyone. What it answers is plain data: the API layer
turns it into its messages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from discovery.keys import KeySchema
from discovery.view import View
from discovery_pb.v1.replication_pb2 import Checkpoint

HEARTBEATS_PER_SILENCE = 3  # silence (stale-after) must span this many origin heartbeats
OLD_ORIGIN_HEARTBEAT_MS = 1000  # what an origin that does not say heartbeats at


def silence_warning(origin: str, silence: float, heartbeat_ms: int) -> str:
    """Advice when ``silence`` is too short to tell a healthy ``origin`` from a silent one."""
    heartbeat = heartbeat_ms / 1000
    if not heartbeat_ms or silence >= HEARTBEATS_PER_SILENCE * heartbeat:
        return ""
    return (
        f"stale-after {silence:g}s is under {HEARTBEATS_PER_SILENCE} heartbeats of {origin} "
        f"(it heartbeats every {heartbeat:g}s): a healthy {origin} may be marked stale; "
        f"raise --stale-after to {HEARTBEATS_PER_SILENCE * heartbeat:g}s or more, "
        f"or lower {origin}'s --replication-heartbeat"
    )


@dataclass(frozen=True, slots=True)
class Freshness:
    stale: bool
    age: float  # seconds since the source was last heard from (inf: never)


@dataclass(frozen=True, slots=True)
class OriginState:
    """Replication from one origin into this region, as its checkpoint records it (Status)."""

    origin: str
    connected: bool  # heard from within stale-after
    leader: str  # the server running this origin's replicator ("": none)
    checkpoint_revision: int  # the origin's revision applied up to
    head_revision: int  # the origin's latest revision, as last heard
    lag_revisions: int
    lag_seconds: float  # how far behind the origin the replicas are, in time
    last_contact_seconds: float
    source: str  # the origin server the replicator streams from
    replicas: int  # the origin's instances held here
    heartbeat_seconds: float  # the origin's feed heartbeat period (0: not known yet)
    warning: str  # advice when stale-after cannot tell a healthy origin from a silent one


class RegionStates:
    def __init__(
        self,
        view: View,
        keys: KeySchema,
        region: str,
        peers: Sequence[str],
        *,
        stale_after: float,
        max_staleness: float = 0.0,
    ) -> None:
        self._view = view
        self._keys = keys
        self.region = region
        self.peers = tuple(peers)  # proximity order
        self._stale_after = stale_after
        self._max_staleness = max_staleness

    def checkpoint(self, origin: str) -> Checkpoint | None:
        raw = self._view.meta(self._keys.checkpoint(origin))
        if raw is None:
            return None
        try:
            return Checkpoint.FromString(raw)
        except Exception:  # written by a newer or broken server: as if absent
            return None

    def leader(self, origin: str) -> str:
        raw = self._view.meta(self._keys.election(origin))
        return raw.decode(errors="replace") if raw is not None else ""

    def freshness(self, region: str) -> Freshness:
        view = self._view
        own = view.stale_seconds()
        if region == self.region:
            return Freshness(view.stale, own)
        cp = self.checkpoint(region)
        if cp is None or not cp.last_contact_ms:
            return Freshness(True, math.inf)
        age = max(0.0, time.time() - cp.last_contact_ms / 1000)
        if view.stale:  # our own etcd is gone: we do not even know what the replicator heard
            age = max(age, own)
        stale = view.stale or age > self._stale_after
        return Freshness(stale, age if stale else 0.0)

    def servable(self, region: str) -> bool:
        """Whether records of ``region`` may be served (``--max-staleness``)."""
        if not self._max_staleness or region == self.region:
            return True
        fresh = self.freshness(region)
        return not fresh.stale or fresh.age <= self._max_staleness

    def origins(self) -> list[OriginState]:
        out = []
        for origin in self.peers:
            cp = self.checkpoint(origin) or Checkpoint()
            fresh = self.freshness(origin)
            now_ms = time.time() * 1000
            out.append(
                OriginState(
                    origin=origin,
                    connected=not fresh.stale,
                    leader=self.leader(origin),
                    checkpoint_revision=cp.revision,
                    head_revision=cp.head_revision,
                    lag_revisions=max(0, cp.head_revision - cp.revision),
                    lag_seconds=max(0.0, (now_ms - cp.caught_up_ms) / 1000) if cp.caught_up_ms else 0.0,
                    last_contact_seconds=max(0.0, (now_ms - cp.last_contact_ms) / 1000) if cp.last_contact_ms else 0.0,
                    source=cp.source,
                    replicas=self._view.region_count(origin),
                    heartbeat_seconds=cp.origin_heartbeat_ms / 1000,
                    warning=silence_warning(origin, self._stale_after, cp.origin_heartbeat_ms),
                )
            )
        return out
