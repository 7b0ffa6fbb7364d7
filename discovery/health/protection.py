"""Checker self-protection: a checker that sees a large share of its targets start failing at
once suspects its own network before it believes them all down (docs/health-checks.md).

While that holds, transitions to CRITICAL wait ("held"); another server of the region re-checks
a sample (``HealthChecks.Recheck``). If it sees most of them healthy, nothing is marked: the
event is logged and counted, and the hold goes on until this checker's own probes recover
(only what the other server saw failing too is marked).
If it sees them failing too, they are applied. With no other server in the region, they are
applied after ``hold_intervals`` intervals, logged with the reason."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from discovery.keys import InstanceKey
from discovery.security.certs import server_id
from discovery.security.tls import TlsFiles, channel_credentials, check_peer, peer_uris
from discovery_pb.v1 import health_checks_pb2 as pb
from discovery_pb.v1.health_checks_pb2_grpc import HealthChecksStub

log = logging.getLogger(__name__)
_NO_PROXY = (("grpc.enable_http_proxy", 0),)  # a peer of the region is dialled directly

RECHECK_LIMIT = 64  # targets per Recheck call


@dataclass(frozen=True, slots=True)
class ProtectionSettings:
    share: float = 0.5  # more than this share of a checker's targets failing at once...
    min_targets: int = 10  # ...of at least this many is a mass failure
    hold_intervals: int = 3  # alone in the region: held this many intervals, then applied
    sample: int = 8  # targets another server re-checks


class Verdict:
    APPLY = "apply"
    HOLD = "hold"
    REFUSED = "refused"  # another server sees them healthy: this checker's view is suspect


Recheck = Callable[[str, Sequence[InstanceKey], float], Awaitable[dict[InstanceKey, bool]]]


class SelfProtection:
    def __init__(self, settings: ProtectionSettings, recheck: Recheck) -> None:
        self.settings = settings
        self._recheck = recheck

    def mass(self, targets: int, newly_failing: int) -> bool:
        """Whether ``newly_failing`` of ``targets`` (failing now, not yet marked) is a mass failure."""
        s = self.settings
        return targets >= s.min_targets and newly_failing > s.share * targets

    async def review(
        self, held: Sequence[InstanceKey], peers: Sequence[str], held_for: float, interval: float, timeout: float
    ) -> tuple[str, list[InstanceKey]]:
        """What to do with the held transitions now, and (REFUSED) those of the sample the
        other server saw failing too: two vantage points agree on them, so they are real."""
        if not peers:
            if held_for >= self.settings.hold_intervals * interval:
                log.warning(
                    "health checks: applying %d transitions to CRITICAL held for %.1fs: a mass failure, and no "
                    "other server in the region to confirm it (this server's network may be at fault)",
                    len(held),
                    held_for,
                )
                return Verdict.APPLY, []
            return Verdict.HOLD, []
        sample = random.sample(list(held), min(len(held), self.settings.sample))
        for peer in random.sample(list(peers), len(peers)):
            try:
                seen = await self._recheck(peer, sample, timeout)
            except Exception as exc:  # another peer may answer; none: keep holding
                log.info("health checks: re-check by %s failed: %s", peer, exc)
                continue
            if not seen:
                continue
            healthy = sum(seen.values())
            if healthy * 2 >= len(seen):
                log.warning(
                    "health checks: %d targets failing at once here, but %s sees %d of %d sampled healthy: "
                    "suspecting this server's network, marking nothing",
                    len(held),
                    peer,
                    healthy,
                    len(seen),
                )
                return Verdict.REFUSED, [k for k, healthy in seen.items() if not healthy]
            log.warning(
                "health checks: %d targets failing at once; %s confirms %d of %d sampled failing: applying",
                len(held),
                peer,
                len(seen) - healthy,
                len(seen),
            )
            return Verdict.APPLY, []
        return Verdict.HOLD, []


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """mTLS to the other servers of the region (their identity: this region's server id)."""

    files: TlsFiles
    trust_domain: str
    region: str


class PeerRecheck:
    """``Recheck`` over gRPC to another server of the region."""

    def __init__(self, region: str, tls: PeerCredentials | None) -> None:
        self._region = region
        self._tls = tls

    async def __call__(self, peer: str, targets: Sequence[InstanceKey], timeout: float) -> dict[InstanceKey, bool]:
        request = pb.RecheckRequest(
            region=self._region,
            targets=[pb.CheckTarget(service=k.service, instance_id=k.instance_id) for k in targets[:RECHECK_LIMIT]],
        )
        async with asyncio.timeout(timeout):
            async with await self._channel(peer, timeout) as channel:
                response = await HealthChecksStub(channel).Recheck(request, timeout=timeout)
        return {
            InstanceKey(self._region, o.target.service, o.target.instance_id): o.healthy
            for o in response.outcomes
            if o.known
        }

    async def _channel(self, peer: str, timeout: float) -> grpc.aio.Channel:
        if self._tls is None:
            return grpc.aio.insecure_channel(peer, options=_NO_PROXY)
        uris = await peer_uris(peer, self._tls.files, timeout=timeout)
        check_peer(uris, server_id(self._tls.trust_domain, self._tls.region), address=peer)
        credentials = await asyncio.to_thread(channel_credentials, self._tls.files)
        return grpc.aio.secure_channel(peer, credentials, options=_NO_PROXY)
