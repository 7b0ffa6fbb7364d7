"""Helpers of the health-check tests: short intervals, registering with a check, reading
back what Resolve says of an instance."""

from __future__ import annotations

import time
from typing import Any

from discovery_pb.v1 import lookup_pb2, registry_pb2, types_pb2
from discovery_pb.v1.types_pb2 import HealthCheck
from tests.support.helpers import ALL_STATUSES, CALL_TIMEOUT, eventually

INTERVAL_MS, TIMEOUT_MS, FAILURES, SUCCESSES = 200, 150, 3, 2
HEALTH = {"health_min_interval_seconds": 0.1, "election_ttl_seconds": 2}
# Killed -> NOT_SERVING within interval x failures, plus one interval, plus the probe timeout
# and room for a loaded machine (2 shared cores): asserted as a bound, measured in the bench.
DETECT = INTERVAL_MS / 1000 * (FAILURES + 1) + TIMEOUT_MS / 1000


def check(kind: int = HealthCheck.TCP, **fields: Any) -> HealthCheck:
    return HealthCheck(kind=kind, interval_ms=INTERVAL_MS, timeout_ms=TIMEOUT_MS, **fields)  # type: ignore[arg-type]


async def register(stubs: Any, address: str, instance_id: str, spec: HealthCheck, **fields: Any) -> int:
    resp = await stubs.registry.Register(
        registry_pb2.RegisterRequest(
            instance=types_pb2.Instance(service="db", instance_id=instance_id, address=address, check=spec, **fields)
        ),
        timeout=CALL_TIMEOUT,
    )
    return int(resp.revision)


async def endpoints(stubs: Any, *, scope: int = lookup_pb2.LOCAL, statuses: tuple[int, ...] = ()) -> dict[str, Any]:
    resp = await stubs.lookup.Resolve(
        lookup_pb2.ResolveRequest(service="db", scope=scope, statuses=statuses), timeout=CALL_TIMEOUT
    )
    return {e.instance.instance_id: e.instance for e in resp.endpoints}


async def state_of(stubs: Any, instance_id: str, **kw: Any) -> tuple[int, int]:
    found = (await endpoints(stubs, statuses=ALL_STATUSES, **kw)).get(instance_id)
    return (found.status, found.check_result.state) if found is not None else (0, 0)


async def until_state(stubs: Any, instance_id: str, status: int, timeout: float, **kw: Any) -> float:
    start = time.monotonic()

    async def reached() -> bool:
        return (await state_of(stubs, instance_id, **kw))[0] == status

    await eventually(reached, timeout=timeout, interval=0.02)
    return time.monotonic() - start
