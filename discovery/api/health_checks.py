"""HealthChecks servicer: Recheck, for another server of this region's self-protection
(docs/health-checks.md). Only that region's servers may call it; it probes only instances
registered here, as their checks say, and answers within the caller's deadline."""

from __future__ import annotations

import asyncio

import grpc.aio

from discovery.api.errors import abort
from discovery.errors import DiscoveryError, InvalidArgument
from discovery.health import Checker
from discovery.health.protection import RECHECK_LIMIT
from discovery.keys import InstanceKey
from discovery.model import validate_instance_id, validate_region, validate_service
from discovery.security.guard import Guard
from discovery_pb.v1 import health_checks_pb2 as pb
from discovery_pb.v1.health_checks_pb2_grpc import HealthChecksServicer as _Base

_DEFAULT_DEADLINE = 10.0


class HealthChecksServicer(_Base):
    def __init__(self, checker: Checker, guard: Guard) -> None:
        self._checker = checker
        self._guard = guard

    async def Recheck(self, request: pb.RecheckRequest, context: grpc.aio.ServicerContext) -> pb.RecheckResponse:
        region = self._checker.region
        try:
            caller, grants = self._guard.caller(context, "Recheck")
            self._guard.require_region_server(caller, grants, "Recheck")
            validate_region(request.region, "region")
            if request.region != region:
                raise InvalidArgument("region", f"{request.region!r} is not this server's region {region!r}")
            if len(request.targets) > RECHECK_LIMIT:
                raise InvalidArgument("targets", f"at most {RECHECK_LIMIT} (got {len(request.targets)})")
            keys = [
                InstanceKey(
                    region,
                    validate_service(t.service, f"targets[{i}].service"),
                    validate_instance_id(t.instance_id, f"targets[{i}].instance_id"),
                )
                for i, t in enumerate(request.targets)
            ]
        except DiscoveryError as exc:
            await abort(context, exc)
        remaining = context.time_remaining()
        budget = min(remaining, _DEFAULT_DEADLINE) if remaining is not None else _DEFAULT_DEADLINE
        response = pb.RecheckResponse()
        try:
            async with asyncio.timeout(max(budget - 0.1, 0.01)):
                seen = await self._checker.recheck(keys)
        except TimeoutError:
            return response  # nothing known in time: the caller keeps holding
        for key, known, outcome in seen:
            response.outcomes.add(
                target=pb.CheckTarget(service=key.service, instance_id=key.instance_id),
                known=known,
                healthy=outcome is not None and outcome.healthy,
                reason=outcome.reason if outcome is not None else "",
            )
        return response
