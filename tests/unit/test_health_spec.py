"""The pure parts of health checks: a check's rules and defaults, what re-registration keeps,
the serving predicate, rendezvous ownership, and self-protection's decisions."""

from __future__ import annotations

from collections import Counter

import pytest

from discovery.errors import InvalidArgument
from discovery.health import ProtectionSettings, SelfProtection, Spec, Verdict, keep_result, owner, validate_check
from discovery.keys import InstanceKey
from discovery.model import serving_status
from discovery_client import check
from discovery_pb.v1.types_pb2 import CheckResult, HealthCheck, Instance, Status


def test_defaults_are_10s_2s_3_2() -> None:
    spec = Spec.of(HealthCheck(kind=HealthCheck.TCP))
    assert (spec.interval, spec.timeout, spec.failures, spec.successes) == (10.0, 2.0, 3, 2)
    validate_check(HealthCheck(kind=HealthCheck.TCP))


def test_the_floor_is_the_server_s() -> None:
    with pytest.raises(InvalidArgument, match="from 1000"):
        validate_check(HealthCheck(kind=HealthCheck.TCP, interval_ms=500, timeout_ms=100))
    validate_check(HealthCheck(kind=HealthCheck.TCP, interval_ms=500, timeout_ms=100), min_interval_ms=100)


def test_serving_predicate() -> None:
    assert serving_status(Status.SERVING, 0) == Status.SERVING
    assert serving_status(Status.SERVING, CheckResult.PASSING) == Status.SERVING
    assert serving_status(Status.SERVING, CheckResult.CRITICAL) == Status.NOT_SERVING
    assert serving_status(Status.DRAINING, CheckResult.CRITICAL) == Status.DRAINING  # the owner wins
    assert serving_status(Status.DRAINING, CheckResult.PASSING) == Status.DRAINING
    assert serving_status(Status.NOT_SERVING, CheckResult.PASSING) == Status.NOT_SERVING


def test_reregistration_keeps_the_verdict_only_with_a_check() -> None:
    existing = Instance(check=HealthCheck(kind=HealthCheck.TCP), check_result=CheckResult(state=CheckResult.CRITICAL))
    again = Instance(check=HealthCheck(kind=HealthCheck.TCP))
    keep_result(again, existing)
    assert again.check_result.state == CheckResult.CRITICAL
    without = Instance()
    keep_result(without, existing)
    assert not without.HasField("check_result")


def test_rendezvous_spreads_and_moves_only_the_leaver_s_checks() -> None:
    members = ["10.0.0.1:7400", "10.0.0.2:7400", "10.0.0.3:7400"]
    checks = [f"us-east/db/db-{i}" for i in range(3000)]
    before = {c: owner(members, c) for c in checks}
    counts = Counter(before.values())
    assert all(800 < n < 1200 for n in counts.values()), counts
    after = {c: owner(members[:2], c) for c in checks}
    moved = [c for c in checks if before[c] != after[c]]
    assert all(before[c] == members[2] for c in moved)  # only the leaver's checks moved
    assert owner([], "x") == ""


def test_client_check_parsing() -> None:
    assert check("tcp").kind == HealthCheck.TCP
    grpc_check = check("grpcs:shop.Cart", interval=5, timeout=0.5)
    assert (grpc_check.kind, grpc_check.grpc_service, grpc_check.tls) == (HealthCheck.GRPC, "shop.Cart", True)
    assert (grpc_check.interval_ms, grpc_check.timeout_ms) == (5000, 500)
    assert check("http:/healthz").http_path == "/healthz"
    for bad in ("udp", "http", "tcp:80"):
        with pytest.raises(Exception, match="use tcp"):
            check(bad)


async def test_protection_mass_rule_and_alone_hold() -> None:
    async def never(*_: object) -> dict[InstanceKey, bool]:
        raise AssertionError("no peer to ask")

    guard = SelfProtection(ProtectionSettings(share=0.5, min_targets=10, hold_intervals=3), never)
    assert not guard.mass(9, 9)  # too few targets to judge
    assert not guard.mass(20, 10)  # half is not more than half
    assert guard.mass(20, 11)
    held = [InstanceKey("r", "s", str(i)) for i in range(11)]
    assert await guard.review(held, [], held_for=2.0, interval=1.0, timeout=1.0) == (Verdict.HOLD, [])
    assert await guard.review(held, [], held_for=3.0, interval=1.0, timeout=1.0) == (Verdict.APPLY, [])


async def test_protection_asks_a_peer() -> None:
    held = [InstanceKey("r", "s", str(i)) for i in range(11)]

    def peer(healthy: bool, *dead: InstanceKey) -> SelfProtection:
        async def recheck(_peer: str, keys: list[InstanceKey], _timeout: float) -> dict[InstanceKey, bool]:
            return {k: healthy and k not in dead for k in keys}

        return SelfProtection(ProtectionSettings(sample=len(held)), recheck)

    assert await peer(True).review(held, ["p:1"], held_for=0, interval=1, timeout=1) == (Verdict.REFUSED, [])
    assert await peer(False).review(held, ["p:1"], held_for=0, interval=1, timeout=1) == (Verdict.APPLY, [])
    # Refused, but what the other server saw failing too is real: it is marked.
    verdict, confirmed = await peer(True, held[3]).review(held, ["p:1"], held_for=0, interval=1, timeout=1)
    assert (verdict, confirmed) == (Verdict.REFUSED, [held[3]])

    async def broken(*_: object) -> dict[InstanceKey, bool]:
        raise OSError("unreachable")

    unreachable = SelfProtection(ProtectionSettings(), broken)
    assert await unreachable.review(held, ["p:1"], held_for=100, interval=1, timeout=1) == (Verdict.HOLD, [])


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("health_min_interval_seconds", 0.01, "from 0.05 to 3600"),
        ("health_mass_share", 1.0, "between 0 and 1"),
        ("health_mass_min_targets", 0, "must be >= 1"),
        ("health_hold_intervals", 0, "must be >= 1"),
    ],
)
def test_server_settings_are_checked(key: str, value: object, words: str) -> None:
    from discovery.config import ServerConfig

    with pytest.raises(InvalidArgument, match=words) as err:
        ServerConfig(region="us-east", insecure=True, **{key: value}).validate()  # type: ignore[arg-type]
    assert err.value.field == key
