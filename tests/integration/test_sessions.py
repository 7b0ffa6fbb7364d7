"""Sessions: one lease for many instances (docs/architecture.md, write path), on a real etcd.

One heartbeat keeps a session's instances; losing the session removes them all, in every
region; a new session brings them back in one batch; a session belongs to its opener."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest

from discovery_pb.v1 import lookup_pb2, registry_pb2, types_pb2
from tests.support.helpers import CALL_TIMEOUT, eventually
from tests.support.secure import ADMIN, Pki, svc
from tests.support.servers import Stubs

TTL = 2  # etcd's minimum lease TTL is about 2 s


def instance(service: str, n: int, ttl: int = 0) -> types_pb2.Instance:
    return types_pb2.Instance(
        service=service, instance_id=f"{service}-{n}", address=f"10.0.{n // 250}.{n % 250}:80", ttl_seconds=ttl
    )


async def open_session(stubs: Stubs, ttl: int = TTL) -> int:
    resp = await stubs.registry.OpenSession(
        registry_pb2.OpenSessionRequest(ttl_seconds=ttl, name="test"), timeout=CALL_TIMEOUT
    )
    assert resp.session_id > 0 and resp.ttl_seconds == ttl
    return resp.session_id


async def ids(stubs: Stubs, service: str, scope: int = lookup_pb2.LOCAL, min_revision: int = 0) -> list[str]:
    resp = await stubs.lookup.Resolve(
        lookup_pb2.ResolveRequest(service=service, scope=scope, min_revision=min_revision), timeout=CALL_TIMEOUT
    )
    return sorted(e.instance.instance_id for e in resp.endpoints)


class Heartbeats:
    """Keeps one lease alive over one Heartbeat stream until stopped."""

    def __init__(self, stubs: Stubs, lease: int, every: float = 0.4) -> None:
        self.sent = 0
        self._task = asyncio.create_task(self._run(stubs, lease, every))

    async def _run(self, stubs: Stubs, lease: int, every: float) -> None:
        call = stubs.registry.Heartbeat()
        try:
            while True:
                await call.write(registry_pb2.HeartbeatRequest(lease_id=lease))
                assert (await call.read()).ttl_seconds > 0
                self.sent += 1
                await asyncio.sleep(every)  # the heartbeat period itself, not synchronisation
        finally:
            call.cancel()

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_one_heartbeat_keeps_every_instance_of_a_session(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    session = await open_session(stubs)
    batch = await stubs.registry.RegisterBatch(
        registry_pb2.RegisterBatchRequest(instances=[instance("web", n) for n in range(150)], session_id=session),
        timeout=CALL_TIMEOUT,
    )
    assert len(batch.results) == 150 and {r.lease_id for r in batch.results} == {session}
    one = await stubs.registry.Register(
        registry_pb2.RegisterRequest(instance=instance("db", 1), session_id=session), timeout=CALL_TIMEOUT
    )
    assert one.lease_id == session and one.ttl_seconds == TTL
    beats = Heartbeats(stubs, session)
    try:
        # Three TTLs on one heartbeat stream: everything is still there.
        await eventually(lambda: _at_least(beats, 3 * TTL / 0.4), timeout=15)
        assert len(await ids(stubs, "web")) == 150 and await ids(stubs, "db") == ["db-1"]
        resolved = await stubs.lookup.Resolve(lookup_pb2.ResolveRequest(service="db"), timeout=CALL_TIMEOUT)
        assert resolved.endpoints[0].instance.session_id == session
    finally:
        await beats.stop()
    # No more heartbeats: the session expires and takes every instance with it.
    await eventually(lambda: _gone(stubs, "web"), timeout=3 * TTL + 5)
    assert await ids(stubs, "db") == []


async def _at_least(beats: Heartbeats, count: float) -> bool:
    return beats.sent >= count


async def _gone(stubs: Stubs, service: str, scope: int = lookup_pb2.LOCAL) -> bool:
    return await ids(stubs, service, scope) == []


async def test_deregistering_or_moving_one_instance_keeps_the_rest_of_the_session(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    session = await open_session(stubs, ttl=30)
    await stubs.registry.RegisterBatch(
        registry_pb2.RegisterBatchRequest(instances=[instance("web", n) for n in range(3)], session_id=session),
        timeout=CALL_TIMEOUT,
    )
    await stubs.registry.Deregister(
        registry_pb2.DeregisterRequest(service="web", instance_id="web-0"), timeout=CALL_TIMEOUT
    )
    # web-1 moves to a lease of its own, web-2 becomes static: the session lease is not revoked.
    await stubs.registry.Register(
        registry_pb2.RegisterRequest(instance=instance("web", 1, ttl=30)), timeout=CALL_TIMEOUT
    )
    done = await stubs.registry.Register(
        registry_pb2.RegisterRequest(instance=instance("web", 2)), timeout=CALL_TIMEOUT
    )
    assert await ids(stubs, "web", min_revision=done.revision) == ["web-1", "web-2"]
    again = await stubs.registry.Register(
        registry_pb2.RegisterRequest(instance=instance("web", 3), session_id=session), timeout=CALL_TIMEOUT
    )
    assert again.lease_id == session  # the session is alive
    closed = await stubs.registry.CloseSession(
        registry_pb2.CloseSessionRequest(session_id=session), timeout=CALL_TIMEOUT
    )
    assert await ids(stubs, "web", min_revision=closed.revision) == ["web-1", "web-2"]
    error = await _error(
        stubs.registry.Register(
            registry_pb2.RegisterRequest(instance=instance("web", 4), session_id=session), timeout=CALL_TIMEOUT
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and "open a new one" in error.details()


async def _error(call: object) -> grpc.aio.AioRpcError:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


async def test_a_lost_session_leaves_every_region_and_one_batch_brings_it_back(regions, region_etcds, connect) -> None:
    await regions.start({r: region_etcds[r] for r in "ab"})
    a, b = connect(regions["a"][0]), connect(regions["b"][0])
    session = await open_session(a)
    instances = [instance("api", n) for n in range(40)]
    await a.registry.RegisterBatch(
        registry_pb2.RegisterBatchRequest(instances=instances, session_id=session), timeout=CALL_TIMEOUT
    )
    await eventually(lambda: _count(b, "api", 40), timeout=15)
    await a.registry.CloseSession(
        registry_pb2.CloseSessionRequest(session_id=session), timeout=CALL_TIMEOUT
    )  # as a crash would, at once
    await eventually(lambda: _gone(b, "api", lookup_pb2.ALL), timeout=15)

    again = await open_session(a, ttl=30)
    batch = await a.registry.RegisterBatch(
        registry_pb2.RegisterBatchRequest(instances=instances, session_id=again), timeout=CALL_TIMEOUT
    )
    assert len({r.revision for r in batch.results}) == 1  # 40 instances, one transaction
    await eventually(lambda: _count(b, "api", 40), timeout=15)


async def _count(stubs: Stubs, service: str, count: int) -> bool:
    return len(await ids(stubs, service, lookup_pb2.ALL)) == count


async def test_a_batch_is_checked_whole_before_anything_is_written(etcd, servers, connect) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    before = (await server.store.health()).revision
    bad = [instance("web", 1), types_pb2.Instance(service="Bad Name", address="10.0.0.1:80")]
    error = await _error(
        stubs.registry.RegisterBatch(registry_pb2.RegisterBatchRequest(instances=bad), timeout=CALL_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    leased = [instance("web", 1, ttl=10)]
    error = await _error(
        stubs.registry.RegisterBatch(registry_pb2.RegisterBatchRequest(instances=leased), timeout=CALL_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "open a session" in error.details()
    twice = [instance("web", 1), instance("web", 1)]
    error = await _error(
        stubs.registry.RegisterBatch(registry_pb2.RegisterBatchRequest(instances=twice), timeout=CALL_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "twice" in error.details()
    assert (await server.store.health()).revision == before


# --- a session belongs to its opener ------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def test_only_the_opener_or_an_admin_may_use_a_session(etcd, servers, pki) -> None:
    server = await servers.start(etcd, **pki.settings("us-east"))
    address = f"127.0.0.1:{server.port}"
    web = Stubs(pki.channel(address, pki.client(svc("web"))))
    other = Stubs(pki.channel(address, pki.client(svc("web2"))))
    admin = Stubs(pki.channel(address, pki.client(ADMIN)))
    try:
        session = await open_session(web, ttl=30)
        await web.registry.Register(
            registry_pb2.RegisterRequest(instance=instance("web", 1), session_id=session), timeout=CALL_TIMEOUT
        )
        error = await _error(
            other.registry.Register(
                registry_pb2.RegisterRequest(instance=instance("web2", 1), session_id=session), timeout=CALL_TIMEOUT
            )
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        stream = other.registry.Heartbeat(timeout=CALL_TIMEOUT)
        await stream.write(registry_pb2.HeartbeatRequest(lease_id=session))
        error = await _error(stream.read())
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        error = await _error(
            other.registry.CloseSession(registry_pb2.CloseSessionRequest(session_id=session), timeout=CALL_TIMEOUT)
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        stream = admin.registry.Heartbeat(timeout=CALL_TIMEOUT)
        await stream.write(registry_pb2.HeartbeatRequest(lease_id=session))
        assert (await stream.read()).ttl_seconds > 0
        stream.cancel()
    finally:
        for stubs in (web, other, admin):
            await stubs.channel.close()


async def test_open_session_refuses_a_bad_ttl_and_an_identity_that_may_register_nothing(etcd, servers, pki) -> None:
    only_reads = "spiffe://test.local/ops/reader"  # outside svc/*: no register grant at all
    policy = pki.policy(
        pki.policy().read_text() + f'\n[[grant]]\nidentity = "{only_reads}"\nread = ["*"]\n', name="r.toml"
    )
    server = await servers.start(etcd, **pki.settings("us-east", policy=policy))
    address = f"127.0.0.1:{server.port}"
    web = Stubs(pki.channel(address, pki.client(svc("web"))))
    reader = Stubs(pki.channel(address, pki.client(only_reads)))
    try:
        for ttl in (0, 3601):
            error = await _error(
                web.registry.OpenSession(registry_pb2.OpenSessionRequest(ttl_seconds=ttl), timeout=CALL_TIMEOUT)
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "ttl_seconds" in error.details()
        error = await _error(
            reader.registry.OpenSession(registry_pb2.OpenSessionRequest(ttl_seconds=10), timeout=CALL_TIMEOUT)
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        for stubs in (web, reader):
            await stubs.channel.close()
