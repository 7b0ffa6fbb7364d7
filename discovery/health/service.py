"""This server's part in the region's health checks, put together: membership, the checker
and its self-protection. The server builds one, runs it, and closes it on the way out (the
membership lease is revoked, so the other servers take its checks at once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from discovery.health.checker import Checker
from discovery.health.membership import Membership
from discovery.health.protection import PeerCredentials, PeerRecheck, ProtectionSettings, SelfProtection
from discovery.keys import KeySchema
from discovery.store import Store
from discovery.telemetry import Instruments
from discovery.view import View
from discovery_pb.v1.admin_pb2 import HealthCheckerStatus

log = logging.getLogger(__name__)


def members_prefix(keys: KeySchema, region: str) -> bytes:
    """``<prefix>health/members/<region>/``: the region's checkers, one key each on its lease."""
    return keys.health_members(region)


class HealthChecks:
    def __init__(
        self,
        view: View,
        store: Store,
        keys: KeySchema,
        *,
        region: str,
        identity: str,
        instruments: Instruments,
        member_ttl: int,
        protection: ProtectionSettings,
        peer_tls: PeerCredentials | None,
        poll: float = 1.0,
    ) -> None:
        self.membership = Membership(store, members_prefix(keys, region), identity, ttl=member_ttl, poll=poll)
        self.checker = Checker(
            view,
            store,
            keys,
            region=region,
            membership=self.membership,
            protection=SelfProtection(protection, PeerRecheck(region, peer_tls)),
            instruments=instruments,
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.membership.run(), name="health membership")
            tasks.create_task(self.checker.run(), name="health checker")

    def status(self) -> HealthCheckerStatus:
        """For Admin Status: the region's checkers, this server's share, and its counts."""
        stats = self.checker.stats
        recent = sorted(list(stats.lateness)[-10_000:])

        def quantile(q: float) -> float:
            return recent[min(len(recent) - 1, int(q * len(recent)))] * 1000 if recent else 0.0

        return HealthCheckerStatus(
            checkers=list(self.membership.members),
            checks=len(self.checker.targets),
            checks_here=len(self.checker.mine),
            probes=stats.runs,
            failures=stats.failures,
            transitions=stats.transitions,
            held=stats.held,
            refused=stats.refused,
            lateness_p50_ms=quantile(0.5),
            lateness_p99_ms=quantile(0.99),
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.membership.leave()
