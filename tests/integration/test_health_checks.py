"""Active health checks against real backends on 127.0.0.1 and a real etcd
(docs/health-checks.md). Intervals are 0.2 s (the servers allow it: health_min_interval_seconds)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from discovery.devtools.process import free_port
from discovery.errors import Conflict, Fenced
from discovery.health import Outcome, members_prefix, owner
from discovery.keys import InstanceKey
from discovery_pb.v1 import admin_pb2, lookup_pb2, registry_pb2, types_pb2
from discovery_pb.v1.types_pb2 import CheckResult, HealthCheck
from tests.support.backends import GrpcBackend, TcpBackend
from tests.support.health import (
    DETECT,
    FAILURES,
    HEALTH,
    INTERVAL_MS,
    check,
    endpoints,
    register,
    state_of,
    until_state,
)
from tests.support.helpers import ALL_STATUSES, CALL_TIMEOUT, eventually


async def test_killed_backend_stops_serving_and_comes_back(servers, etcd, connect) -> None:
    server = await servers.start(etcd, **HEALTH)
    stubs = connect(server)
    backend = await TcpBackend().start()
    await register(stubs, backend.address, "db-1", check())
    await eventually(lambda: _passing(stubs, "db-1"), timeout=5)
    assert "db-1" in await endpoints(stubs)

    await backend.stop()
    took = await until_state(stubs, "db-1", types_pb2.NOT_SERVING, timeout=DETECT * 4)
    assert took <= DETECT * 4
    found = (await endpoints(stubs, statuses=ALL_STATUSES))["db-1"]
    assert found.check_result.state == CheckResult.CRITICAL
    assert found.check_result.reason == "tcp connect refused, 3 consecutive failures"
    assert found.check_result.checker == server.address
    assert "db-1" not in await endpoints(stubs)  # default Resolve: SERVING only
    cla = server.xds.builder.load_assignment("db", "")
    statuses = [lb.health_status for group in cla.endpoints for lb in group.lb_endpoints]  # type: ignore[attr-defined]
    assert statuses and all(s == 2 for s in statuses)  # envoy HealthStatus.UNHEALTHY
    stored = types_pb2.Instance.FromString(
        (await server.store.get(server.keys.instance("us-east", "db", "db-1"))).value
    )
    assert stored.status == types_pb2.SERVING  # the owner's status is the owner's

    await backend.start()  # the same port
    await until_state(stubs, "db-1", types_pb2.SERVING, timeout=DETECT * 4)
    found = (await endpoints(stubs))["db-1"]
    assert found.check_result.reason == "tcp connect ok, 2 consecutive successes"
    status = (await stubs.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)).health_checks
    assert list(status.checkers) == [server.address] and (status.checks, status.checks_here) == (1, 1)
    assert status.transitions == 3 and status.failures >= FAILURES and status.probes > status.failures
    assert status.held == 0 and status.lateness_p99_ms >= status.lateness_p50_ms >= 0
    await backend.stop()


async def _passing(stubs: Any, instance_id: str) -> bool:
    return (await state_of(stubs, instance_id))[1] == CheckResult.PASSING


async def test_hung_http_backend_fails_by_timeout_and_redirects_pass(servers, etcd, connect) -> None:
    server = await servers.start(etcd, **HEALTH)
    stubs = connect(server)
    hung = await TcpBackend(hang=True).start()
    redirect = await TcpBackend(http_status=302).start()
    failing = await TcpBackend(http_status=503).start()
    await register(stubs, hung.address, "hung", check(HealthCheck.HTTP, http_path="/healthz"))
    await register(stubs, redirect.address, "redirect", check(HealthCheck.HTTP, http_path="/healthz"))
    await register(stubs, failing.address, "failing", check(HealthCheck.HTTP, http_path="/healthz"))
    await until_state(stubs, "hung", types_pb2.NOT_SERVING, timeout=DETECT * 4)
    await until_state(stubs, "failing", types_pb2.NOT_SERVING, timeout=DETECT * 4)
    await eventually(lambda: _passing(stubs, "redirect"), timeout=5)
    answer = await endpoints(stubs, statuses=ALL_STATUSES)
    assert answer["hung"].check_result.reason == "http timed out after 0.15s, 3 consecutive failures"
    assert answer["failing"].check_result.reason.startswith("http 503, ")
    for backend in (hung, redirect, failing):
        await backend.stop()


async def test_grpc_health_not_serving_is_honoured(servers, etcd, connect) -> None:
    server = await servers.start(etcd, **HEALTH)
    stubs = connect(server)
    backend = await GrpcBackend().start()
    await backend.set("shop.Cart", True)
    await register(stubs, backend.address, "cart", check(HealthCheck.GRPC, grpc_service="shop.Cart"))
    await eventually(lambda: _passing(stubs, "cart"), timeout=5)
    await backend.set("shop.Cart", False)
    await until_state(stubs, "cart", types_pb2.NOT_SERVING, timeout=DETECT * 4)
    assert (await endpoints(stubs, statuses=ALL_STATUSES))["cart"].check_result.reason.startswith("grpc NOT_SERVING")
    await backend.set("shop.Cart", True)
    await until_state(stubs, "cart", types_pb2.SERVING, timeout=DETECT * 4)
    await backend.stop()


async def test_draining_wins_and_reregistration_keeps_the_verdict(servers, etcd, connect) -> None:
    server = await servers.start(etcd, **HEALTH)
    stubs = connect(server)
    backend = await TcpBackend().start()
    await register(stubs, backend.address, "db-1", check())
    await eventually(lambda: _passing(stubs, "db-1"), timeout=5)
    await backend.stop()
    await until_state(stubs, "db-1", types_pb2.NOT_SERVING, timeout=DETECT * 4)
    # The operator re-registers it (same check): the verdict stays, it does not come back.
    await register(stubs, backend.address, "db-1", check())
    status, state = await state_of(stubs, "db-1")
    assert (status, state) == (types_pb2.NOT_SERVING, CheckResult.CRITICAL)
    # DRAINING from the operator wins over the check, and the checker never overwrites it.
    await register(stubs, backend.address, "db-1", check(), status=types_pb2.DRAINING)
    await backend.start()
    await eventually(lambda: _passing(stubs, "db-1"), timeout=DETECT * 4)
    assert (await state_of(stubs, "db-1"))[0] == types_pb2.DRAINING
    stored = types_pb2.Instance.FromString(
        (await server.store.get(server.keys.instance("us-east", "db", "db-1"))).value
    )
    assert stored.status == types_pb2.DRAINING
    await backend.stop()


@pytest.mark.parametrize(
    "case",
    [
        (HealthCheck(kind=HealthCheck.HTTP, http_path="healthz"), "http_path", "must start with '/'"),
        (HealthCheck(kind=HealthCheck.TCP, interval_ms=50), "interval_ms", "must be from 100"),
        (HealthCheck(kind=HealthCheck.TCP, interval_ms=1000, timeout_ms=1000), "timeout_ms", "less than the interval"),
        (HealthCheck(kind=HealthCheck.TCP, timeout_ms=120_000), "timeout_ms", "must be from"),
        (HealthCheck(kind=HealthCheck.TCP, failures_before_critical=1000), "failures_before_critical", "from 1 to 100"),
        (HealthCheck(), "kind", "TCP, GRPC or HTTP"),
        (HealthCheck(kind=HealthCheck.GRPC, tls=True), "tls_ca_pem", "needs the CA"),
        (HealthCheck(kind=HealthCheck.TCP, tls=True), "tls", "only connects"),
    ],
)
async def test_bad_checks_are_refused(servers, etcd, connect, case: tuple[HealthCheck, str, str]) -> None:
    spec, field, words = case
    server = await servers.start(etcd, **HEALTH)
    stubs = connect(server)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await register(stubs, "127.0.0.1:1", "bad", spec)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"instance.check.{field}" in (err.value.details() or "") and words in (err.value.details() or "")


async def test_owner_cannot_write_a_verdict(servers, etcd, connect) -> None:
    server = await servers.start(etcd, **HEALTH, health_checks=False)
    stubs = connect(server)
    await register(
        stubs, "127.0.0.1:1", "db-1", check(), check_result=CheckResult(state=CheckResult.CRITICAL, reason="mine")
    )
    found = (await endpoints(stubs))["db-1"]
    assert not found.HasField("check_result") and found.status == types_pb2.SERVING


async def test_checks_spread_over_servers_and_move_when_one_stops(servers, etcd, connect) -> None:
    a = await servers.start(etcd, **HEALTH)
    b = await servers.start(etcd, **HEALTH)
    stubs = connect(a)
    backends = [await TcpBackend().start() for _ in range(12)]
    for i, backend in enumerate(backends):
        await register(stubs, backend.address, f"db-{i}", check())

    async def spread() -> bool:
        ma, mb = a.health.checker.mine, b.health.checker.mine
        return len(ma) + len(mb) == 12 and not ma & mb and bool(ma) and bool(mb)

    await eventually(spread, timeout=10)
    await eventually(lambda: _all_passing(stubs, 12), timeout=10)
    moved = set(b.health.checker.mine)
    await servers.stop(b)  # its lease is revoked: a takes its checks at once
    await eventually(lambda: _owns_all(a, 12), timeout=5)
    # The moved checks keep running: a backend of b's share dies and a marks it.
    victim = sorted(moved)[0].instance_id
    await backends[int(victim.split("-")[1])].stop()
    await until_state(stubs, victim, types_pb2.NOT_SERVING, timeout=DETECT * 4)
    for backend in backends:
        await backend.stop()


async def _owns_all(server: Any, n: int) -> bool:
    return len(server.health.checker.mine) == n


async def _all_passing(stubs: Any, n: int) -> bool:
    answer = await endpoints(stubs, statuses=ALL_STATUSES)
    return len(answer) == n and all(i.check_result.state == CheckResult.PASSING for i in answer.values())


async def test_verdicts_are_fenced_on_the_membership(servers, etcd, connect) -> None:
    a = await servers.start(etcd, **HEALTH)
    stubs = connect(a)
    await register(stubs, "127.0.0.1:9", "db-1", check())
    membership = a.health.membership
    await eventually(lambda: _joined(membership), timeout=5)
    record = a.view.get(InstanceKey("us-east", "db", "db-1"))
    assert record is not None and membership.fence is not None
    key = a.keys.instance("us-east", "db", "db-1")
    stale_view = (membership.prefix, membership.listed_at)
    # A server joins after this checker listed the members: its write is refused.
    b = await servers.start(etcd, **HEALTH)
    await eventually(lambda: _joined(b.health.membership), timeout=5)
    with pytest.raises(Fenced):
        await a.store.put_fenced(
            key,
            record.value,
            lease=record.lease,
            mod_revision=record.mod_revision,
            fence=membership.fence,
            members=stale_view,
        )
    # A checker whose membership key is gone (lease lost, deposed) is refused too.
    with pytest.raises(Fenced):
        await a.store.put_fenced(
            key,
            record.value,
            lease=record.lease,
            mod_revision=record.mod_revision,
            fence=(members_prefix(a.keys, "us-east") + b"gone:1", 7),
            members=(membership.prefix, 10**12),
        )
    # A record changed since it was read is a conflict, never overwritten.
    await register(stubs, "127.0.0.1:9", "db-1", check(), zone="z1")
    with pytest.raises(Conflict):
        await a.store.put_fenced(
            key,
            record.value,
            lease=record.lease,
            mod_revision=record.mod_revision,
            fence=membership.fence,
            members=(membership.prefix, 10**12),
        )


async def _joined(membership: Any) -> bool:
    return bool(membership.joined)


async def test_self_protection_marks_nothing_when_another_server_sees_them_healthy(servers, etcd, connect) -> None:
    settings = {**HEALTH, "health_mass_min_targets": 4}
    a = await servers.start(etcd, **settings)
    b = await servers.start(etcd, **settings)
    stubs = connect(a)
    backends = [await TcpBackend().start() for _ in range(20)]
    for i, backend in enumerate(backends):
        await register(stubs, backend.address, f"db-{i}", check())
    await eventually(lambda: _all_passing(stubs, 20), timeout=10)
    cut = a.health.checker
    assert len(cut.mine) >= 4, "rendezvous gave the cut server too few targets to test"
    cut.seam = lambda key, address: Outcome(False, "tcp connect timed out (cut by the test)")
    await eventually(lambda: _refused(cut), timeout=10)
    # Long past interval x failures: still nothing marked anywhere.
    await asyncio.sleep(INTERVAL_MS / 1000 * FAILURES * 2)
    assert await _all_passing(stubs, 20)
    assert cut.stats.held >= 4
    # One of the cut server's targets really dies: the other server sees it failing too when
    # it re-checks, so that one (and only that one) is marked.
    victim = sorted(cut.mine)[0].instance_id
    await backends[int(victim.split("-")[1])].stop()

    async def only_victim_down() -> bool:
        answer = await endpoints(stubs, statuses=ALL_STATUSES)
        down = {i for i, inst in answer.items() if inst.status == types_pb2.NOT_SERVING}
        assert down <= {victim}, down
        return down == {victim}

    await eventually(only_victim_down, timeout=DETECT * 10)
    # Alone in the region, the same checker applies them after its hold (health_hold_intervals).
    await servers.stop(b)
    await eventually(lambda: _owns_all(a, 20), timeout=5)
    await eventually(lambda: _none_serving(stubs), timeout=DETECT * 10)
    for backend in backends:
        await backend.stop()


async def _refused(checker: Any) -> bool:
    return checker.stats.refused >= 1


async def _none_serving(stubs: Any) -> bool:
    return not await endpoints(stubs)


async def test_checks_run_only_in_their_own_region_and_verdicts_replicate(regions, region_etcds, connect) -> None:
    await regions.start({r: region_etcds[r] for r in "ab"}, **HEALTH)
    a, b = regions["a"][0], regions["b"][0]
    backend = await TcpBackend().start()
    stubs_a, stubs_b = connect(a), connect(b)
    await register(stubs_a, backend.address, "db-1", check())
    await eventually(lambda: _passing(stubs_a, "db-1"), timeout=5)
    await backend.stop()
    took = await until_state(stubs_b, "db-1", types_pb2.NOT_SERVING, timeout=DETECT * 6, scope=lookup_pb2.ALL)
    assert took > 0
    assert not b.health.checker.targets  # a's instance is never a target in b
    assert b.health.checker.stats.runs == 0
    await backend.start()
    await until_state(stubs_b, "db-1", types_pb2.SERVING, timeout=DETECT * 6, scope=lookup_pb2.ALL)
    await backend.stop()


async def test_every_verdict_is_written_by_the_check_s_owner_while_members_come_and_go(servers, etcd, connect) -> None:
    """Fencing under churn: one server sees every target failing (cut), the others see them
    healthy, so owners disagree and each move of a check writes a new verdict. Replaying etcd's
    history, every verdict was written by the check's rendezvous owner among the members of
    that moment: never by a deposed server or one that had not yet seen a newcomer."""
    settings = {**HEALTH, "health_mass_min_targets": 1000}  # no self-protection: verdicts flow
    a = await servers.start(etcd, **settings)
    b = await servers.start(etcd, **settings)
    stubs = connect(a)
    backends = [await TcpBackend().start() for _ in range(12)]
    a.health.checker.seam = lambda key, address: Outcome(False, "tcp connect refused (cut by the test)")
    prefix = members_prefix(a.keys, "us-east")
    listed, kvs = await a.store.list_prefix(prefix)
    members = {kv.key[len(prefix) :].decode() for kv in kvs}
    assert members == {a.address, b.address}
    for i, backend in enumerate(backends):
        await register(stubs, backend.address, f"db-{i}", check())
    for _ in range(3):
        c = await servers.start(etcd, **settings)
        await eventually(lambda c=c: _has_checks(c), timeout=10)
        await asyncio.sleep(INTERVAL_MS / 1000 * (FAILURES + 1))  # verdicts written under this membership
        await servers.stop(c)
        await eventually(lambda: _owns_both(a, b, 12), timeout=10)
    head = (await a.store.health()).revision
    writes, writers = 0, set()
    async with asyncio.timeout(10):
        async for batch in a.store.watch(a.keys.root, listed + 1):
            for event in batch.events:
                key = event.kv.key
                if key.startswith(prefix):
                    member = key[len(prefix) :].decode()
                    if event.deleted:
                        members.discard(member)
                    else:
                        members.add(member)
                    continue
                parsed = a.keys.parse_instance(key)
                if parsed is None or event.deleted:
                    continue
                record = types_pb2.Instance.FromString(event.kv.value)
                if record.HasField("check_result") and record.check_result.checker:
                    rank = "/".join(parsed)
                    assert record.check_result.checker == owner(sorted(members), rank), (
                        f"{rank} written by {record.check_result.checker} at {event.kv.mod_revision}; members {members}"
                    )
                    writes += 1
                    writers.add(record.check_result.checker)
            if batch.revision >= head:
                break
    assert writes > 12  # every check decided, and decided again as checks moved
    assert len(writers) >= 3  # a, b and the servers that came and went all wrote verdicts
    for backend in backends:
        await backend.stop()


async def _has_checks(server: Any) -> bool:
    return bool(server.health.checker.mine)


async def _owns_both(a: Any, b: Any, n: int) -> bool:
    return len(a.health.checker.mine) + len(b.health.checker.mine) == n


async def test_a_leased_instance_keeps_its_lease_under_a_verdict(servers, etcd, connect) -> None:
    """Both must hold: the check's verdict is written on the record's own lease (here a
    session's), so the lease still removes it; a CRITICAL check takes it out meanwhile."""
    server = await servers.start(etcd, **HEALTH)
    stubs = connect(server)
    session = await stubs.registry.OpenSession(registry_pb2.OpenSessionRequest(ttl_seconds=30), timeout=CALL_TIMEOUT)
    await stubs.registry.Register(
        registry_pb2.RegisterRequest(
            instance=types_pb2.Instance(service="db", instance_id="db-1", address="127.0.0.1:9", check=check()),
            session_id=session.session_id,
        ),
        timeout=CALL_TIMEOUT,
    )
    await until_state(stubs, "db-1", types_pb2.NOT_SERVING, timeout=DETECT * 4)
    stored = await server.store.get(server.keys.instance("us-east", "db", "db-1"))
    assert stored is not None and stored.lease == session.session_id
    closed = await stubs.registry.CloseSession(
        registry_pb2.CloseSessionRequest(session_id=session.session_id), timeout=CALL_TIMEOUT
    )
    await server.view.wait_for(closed.revision, CALL_TIMEOUT)
    assert await state_of(stubs, "db-1") == (0, 0)  # gone with its session


async def test_a_check_that_leaves_and_comes_back_is_probed_once_an_interval(servers, etcd, connect) -> None:
    """A server that loses its membership for a moment (its lease expired under load, and it
    joined again) gets its checks back within one interval: each must still run once an
    interval, not once per time it came back."""
    a = await servers.start(etcd, **HEALTH)
    stubs = connect(a)
    backend = await TcpBackend().start()
    for i in range(5):
        await register(stubs, backend.address, f"db-{i}", check())
    checker, membership = a.health.checker, a.health.membership
    await eventually(lambda: _owns_all(a, 5), timeout=5)
    for _ in range(3):  # as Membership does when it loses its key and when it joins again
        members, membership.members = membership.members, ()
        checker._reassign()
        membership.members = members
        checker._reassign()
    runs, seconds = checker.stats.runs, 2.0
    await asyncio.sleep(seconds)  # a measurement window, not a wait for an event
    assert checker.stats.runs - runs <= 5 * seconds / (INTERVAL_MS / 1000) * 1.3 + 2
    await backend.stop()


async def test_a_real_mass_outage_is_confirmed_by_another_server_and_marked(servers, etcd, connect) -> None:
    """Self-protection holds a mass failure only until another server confirms it: when the
    backends really are down, both servers see it, and every one is marked."""
    settings = {**HEALTH, "health_mass_min_targets": 4}
    a = await servers.start(etcd, **settings)
    await servers.start(etcd, **settings)
    stubs = connect(a)
    backends = [await TcpBackend().start() for _ in range(20)]
    for i, backend in enumerate(backends):
        await register(stubs, backend.address, f"db-{i}", check())
    await eventually(lambda: _all_passing(stubs, 20), timeout=10)
    for backend in backends:
        await backend.stop()
    await eventually(lambda: _none_serving(stubs), timeout=DETECT * 10)
    assert a.health.checker.stats.held >= 1  # it was held as a mass failure first, then confirmed
    assert a.health.checker.stats.refused == 0


async def test_a_membership_key_held_on_another_lease_is_waited_for_never_taken(servers, etcd) -> None:
    """An earlier run of this server (SIGKILLed, on the same address), or another server with
    the same address: its key is left to expire, never deleted from under it."""
    other = await servers.start(etcd, **HEALTH)
    port = free_port()
    key = members_prefix(other.keys, "us-east") + f"127.0.0.1:{port}".encode()
    lease = await other.store.grant(2)
    await other.store.put(key, b"127.0.0.1:1", lease=lease)
    server = await servers.start(etcd, listen=f"127.0.0.1:{port}", **HEALTH)
    assert not server.health.membership.joined
    held = await server.store.get(key)
    assert held is not None and held.lease == lease  # not taken
    await eventually(lambda: _joined(server.health.membership), timeout=10)  # once it expired
