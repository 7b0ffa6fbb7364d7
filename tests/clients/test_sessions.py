"""Sessions in the client library: one session and one Heartbeat stream for all of a client's
leased registrations; after losing it, one RegisterBatch brings them all back; per-instance
leases beside it, and instead of it on a server without sessions; overload answered with a
jittered back-off that never lets a lease expire."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import grpc.aio

from discovery.server import Server
from discovery_client import DirectClient, DiscoveryClient, Registration, RetryPolicy, Status
from discovery_client.config import ClientConfig
from discovery_client.tls import TlsConfig
from discovery_pb.v1 import registry_pb2 as pb
from discovery_pb.v1 import registry_pb2_grpc, types_pb2
from tests.support.clients import config
from tests.support.helpers import eventually

TTL = 2  # etcd's minimum lease TTL is about 2 s
REGION = "us-east"


def _count_calls(server: Server, method: str) -> list[Any]:
    """Every call of ``server.registry.<method>`` from now on, by its first argument."""
    calls: list[Any] = []
    inner = getattr(server.registry, method)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else None)
        return await inner(*args, **kwargs)

    setattr(server.registry, method, counted)
    return calls


def _heartbeat_streams(server: Server) -> int:
    api = server._registry_api
    assert api is not None
    return len(api.streams._streams)


async def _enter(registrations: list[Registration]) -> None:
    await asyncio.gather(*(r.__aenter__() for r in registrations))


async def _leave(registrations: list[Registration]) -> None:
    await asyncio.gather(*(r.close() for r in registrations))


async def _ids(client: DiscoveryClient, service: str) -> list[str]:
    return sorted(e.instance_id for e in (await client.resolve(service, scope="local")).endpoints)


async def test_many_registrations_share_one_session_and_one_heartbeat_stream(etcd, servers, make_client) -> None:
    server = await servers.start(etcd)
    heartbeats = _count_calls(server, "heartbeat")
    opened = _count_calls(server, "open_session")
    client = make_client(config([server]))
    regs = [client.register("web", f"10.0.0.{n}:80", ttl=TTL, drain_seconds=0) for n in range(30)]
    await _enter(regs)
    session = client.session
    assert session is not None and session.session_id and len(opened) == 1
    assert {r.session_id for r in regs} == {r.lease_id for r in regs} == {session.session_id}
    assert server.view.meta(server.keys.session(REGION, session.session_id)) is not None
    # Three TTLs later: every instance is still there, kept by heartbeats of the one lease.
    await eventually(lambda: _true(session.heartbeats >= 3 * 3), timeout=4 * TTL + 5)
    assert set(heartbeats) == {session.session_id} and _heartbeat_streams(server) == 1
    assert session.keeper.streams == 1
    assert len(await _ids(client, "web")) == 30
    assert all(r.registrations == 1 and r.lease_losses == 0 for r in regs)

    await _leave(regs[:10])  # leaving some keeps the session for the others
    assert len(await eventually(lambda: _len(_ids(client, "web"), 20))) == 20
    await _leave(regs[10:])
    await client.close()  # CloseSession
    await eventually(lambda: _true(server.view.meta(server.keys.session(REGION, session.session_id)) is None))


async def test_a_lost_session_comes_back_in_one_batch(etcd, servers, make_client) -> None:
    server = await servers.start(etcd)
    batches = _count_calls(server, "register_batch")
    client = make_client(config([server]))
    regs = [client.register("api", f"10.0.{n // 200}.{n % 200}:80", ttl=TTL, drain_seconds=0) for n in range(250)]
    await _enter(regs)
    await regs[3].set_status(Status.DRAINING)  # its status is what comes back
    session = client.session
    assert session is not None
    first = session.session_id
    await eventually(lambda: _len(_ids(client, "api"), 249), timeout=10)  # the client's view caught up

    await server.store.revoke(first)  # as an expiry would: every instance goes
    await eventually(lambda: _true(all(r.registrations == 2 for r in regs[4:])), timeout=10)
    assert len(batches) == 1 and session.batches == 1 and session.losses == 1 and session.opened == 2
    assert session.session_id != first and {r.lease_id for r in regs} == {session.session_id}
    assert all(r.lease_losses == 1 for r in regs)
    # One RegisterBatch: one etcd transaction, so one revision, per 100 instances.
    assert len({r.revision for r in regs}) == 3
    assert len(await eventually(lambda: _len(_ids(client, "api"), 249), timeout=10)) == 249
    drained = await client.resolve("api", statuses=["draining"])
    assert [e.instance_id for e in drained.endpoints] == [regs[3].instance_id]
    await _leave(regs)


async def test_session_and_per_instance_registrations_side_by_side(etcd, servers, make_client) -> None:
    server = await servers.start(etcd)
    heartbeats = _count_calls(server, "heartbeat")
    client = make_client(config([server]))
    shared = [client.register("mix", f"10.0.0.{n}:80", ttl=TTL, drain_seconds=0) for n in range(3)]
    alone = client.register("mix", "10.0.1.1:80", ttl=TTL, drain_seconds=0, session=False)
    static = client.register("mix", "10.0.2.1:80", ttl=0, drain_seconds=0)
    await _enter([*shared, alone, static])
    session = client.session
    assert session is not None
    assert alone.session_id == 0 and alone.lease_id not in (0, session.session_id)
    assert static.lease_id == 0 and static.session_id == 0
    await eventually(lambda: _true({session.session_id, alone.lease_id} <= set(heartbeats)), timeout=5)
    assert _heartbeat_streams(server) == 2  # the session's and the lone lease's

    await server.store.revoke(session.session_id)
    await eventually(lambda: _true(all(r.registrations == 2 for r in shared)), timeout=10)
    assert alone.registrations == 1 and alone.lease_losses == 0
    await server.store.revoke(alone.lease_id)
    await eventually(lambda: _true(alone.registrations == 2 and alone.lease_losses == 1), timeout=10)
    assert alone.session_id == 0 and alone.lease_id != session.session_id
    assert len(await eventually(lambda: _len(_ids(client, "mix"), 5), timeout=10)) == 5
    await _leave([*shared, alone, static])

    async def gone() -> bool:
        return await _ids(client, "mix") == []

    await eventually(gone)


async def test_the_cli_client_registers_on_a_session_and_closes_it(etcd, servers) -> None:
    server = await servers.start(etcd)
    address = f"127.0.0.1:{server.port}"
    async with DirectClient(address, tls=TlsConfig(insecure=True)) as api:
        session = await api.open_session(ttl=30, name="test")
        one = await api.register("low", "10.0.0.1:80", instance_id="low-1", session_id=session.session_id)
        batch = await api.register_batch(
            [types_pb2.Instance(service="low", instance_id=f"low-{n}", address=f"10.0.0.{n}:80") for n in range(2, 5)],
            session_id=session.session_id,
        )
        assert one.lease_id == session.session_id and {r.lease_id for r in batch.results} == {session.session_id}
        closed = await api.close_session(session.session_id)
        assert not (await api.resolve("low", min_revision=closed.revision)).endpoints

        async with api.registration("cli", "10.0.0.9:80", ttl=TTL, drain_seconds=0) as reg:
            assert api.session is not None and reg.session_id == api.session.session_id
        sid = api.session.session_id
    await eventually(lambda: _true(server.view.meta(server.keys.session(REGION, sid)) is None))


# --- fake servers: an old one without sessions, an overloaded one -----------------------------


class FakeRegistry(registry_pb2_grpc.RegistryServicer):
    """Leases kept in memory. ``sessions=False``: no OpenSession/CloseSession/RegisterBatch
    (the base class answers UNIMPLEMENTED), as a server from before sessions. ``refuse`` maps
    a method to how many of its calls (or Heartbeat streams) to refuse with RESOURCE_EXHAUSTED,
    ``discovery-limit: overload`` and ``retry-after-ms``. A lease expires ``ttl`` after its
    last heartbeat (``expired`` lists those that did)."""

    def __init__(self, *, sessions: bool, refuse: dict[str, int] | None = None, retry_after_ms: int = 200) -> None:
        self.sessions = sessions
        self.refuse = dict(refuse or {})
        self.retry_after_ms = retry_after_ms
        self.calls: dict[str, list[float]] = {}
        self.leases: dict[int, float] = {}  # lease -> loop time of its expiry
        self.ttl: dict[int, int] = {}
        self.expired: list[int] = []
        self.batches: list[int] = []
        self.registered: dict[str, int] = {}  # instance id -> lease
        self.lose_next_heartbeat = False
        self._next = 100

    def _lease(self, ttl: int) -> int:
        self._next += 1
        self.ttl[self._next] = ttl
        self.leases[self._next] = _now() + ttl
        return self._next

    def _alive(self, lease: int) -> bool:
        expiry = self.leases.get(lease)
        if expiry is not None and expiry < _now():
            self.expired.append(lease)
            del self.leases[lease]
        return lease in self.leases

    async def _gate(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls.setdefault(method, []).append(_now())
        if self.refuse.get(method, 0) > 0:
            self.refuse[method] -= 1
            context.set_trailing_metadata(
                (("discovery-limit", "overload"), ("retry-after-ms", str(self.retry_after_ms)))
            )
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded: retry later")

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterResponse:
        await self._gate("Register", context)
        instance = request.instance
        if request.session_id:
            if not self._alive(request.session_id):
                await context.abort(grpc.StatusCode.NOT_FOUND, "session expired")
            lease, ttl = request.session_id, self.ttl[request.session_id]
        else:
            lease, ttl = (self._lease(instance.ttl_seconds), instance.ttl_seconds) if instance.ttl_seconds else (0, 0)
        instance_id = instance.instance_id or instance.address
        self.registered[instance_id] = lease
        return pb.RegisterResponse(instance_id=instance_id, revision=1, lease_id=lease, ttl_seconds=ttl)

    async def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterResponse:
        self.registered.pop(request.instance_id, None)
        return pb.DeregisterResponse(revision=2)

    async def Heartbeat(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in request_iterator:
            await self._gate("Heartbeat", context)
            if self.lose_next_heartbeat:
                self.lose_next_heartbeat = False
                self.leases.pop(request.lease_id, None)
            if not self._alive(request.lease_id):
                await context.abort(grpc.StatusCode.NOT_FOUND, "lease gone")
            ttl = self.ttl[request.lease_id]
            self.leases[request.lease_id] = _now() + ttl
            yield pb.HeartbeatResponse(lease_id=request.lease_id, ttl_seconds=ttl)

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        if not self.sessions:
            return await super().OpenSession(request, context)  # type: ignore[misc]
        await self._gate("OpenSession", context)
        return pb.OpenSessionResponse(session_id=self._lease(request.ttl_seconds), ttl_seconds=request.ttl_seconds)

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        if not self.sessions:
            return await super().CloseSession(request, context)  # type: ignore[misc]
        self.leases.pop(request.session_id, None)
        return pb.CloseSessionResponse(revision=3)

    async def RegisterBatch(
        self, request: pb.RegisterBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterBatchResponse:
        if not self.sessions:
            return await super().RegisterBatch(request, context)  # type: ignore[misc]
        await self._gate("RegisterBatch", context)
        if not self._alive(request.session_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, "session expired")
        self.batches.append(len(request.instances))
        ttl = self.ttl[request.session_id]
        results = []
        for instance in request.instances:
            self.registered[instance.instance_id] = request.session_id
            results.append(
                pb.RegisterResponse(
                    instance_id=instance.instance_id, revision=4, lease_id=request.session_id, ttl_seconds=ttl
                )
            )
        return pb.RegisterBatchResponse(results=results, revision=4)


def _now() -> float:
    return asyncio.get_running_loop().time()


@contextlib.asynccontextmanager
async def fake_server(registry: FakeRegistry) -> AsyncIterator[str]:
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_permit_without_calls", 1),  # the clients ping every second, as the real one allows
            ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    )
    registry_pb2_grpc.add_RegistryServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def _config(address: str, **overrides: Any) -> ClientConfig:
    return config([address], **overrides)


async def test_an_old_server_without_sessions_gets_a_lease_per_instance(make_client) -> None:
    old = FakeRegistry(sessions=False)
    async with fake_server(old) as address:
        client = make_client(_config(address))
        regs = [client.register("old", f"10.0.0.{n}:80", ttl=TTL, drain_seconds=0) for n in range(3)]
        await _enter(regs)
        assert client.session is not None and client.session.supported is False
        leases = {r.lease_id for r in regs}
        assert len(leases) == 3 and all(r.session_id == 0 for r in regs)
        await eventually(lambda: _true(all(r.heartbeats >= 4 for r in regs)), timeout=3 * TTL + 5)
        assert not old.expired and all(old._alive(lease) for lease in leases)
        await _leave(regs)
        assert old.registered == {}
        await client.close()  # no CloseSession to send: nothing fails


async def test_overload_on_register_and_heartbeat_backs_off_with_jitter_and_no_lease_is_lost(make_client) -> None:
    fake = FakeRegistry(sessions=True, refuse={"OpenSession": 2, "Register": 2}, retry_after_ms=200)
    retry = RetryPolicy(attempts=5, deadline=10, base_delay=0.05, max_delay=0.3)
    async with fake_server(fake) as address:
        client = make_client(_config(address, retry=retry))
        reg = client.register("busy", "10.0.0.1:80", ttl=TTL, drain_seconds=0)
        await reg.__aenter__()
        # Each refused call waited retry-after x [1, 2] before the next: 0.2..0.4 s.
        for method in ("OpenSession", "Register"):
            times = fake.calls[method]
            assert len(times) == 3
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(0.19 <= g <= 0.5 for g in gaps), (method, gaps)

        # Heartbeat streams refused twice with a retry-after longer than the TTL: the client
        # comes back within the TTL anyway, and the lease never expires.
        fake.retry_after_ms = 5000
        beats = reg.heartbeats
        fake.refuse["Heartbeat"] = 2
        await eventually(lambda: _true(fake.refuse["Heartbeat"] == 0 and reg.heartbeats >= beats + 3), timeout=10)
        assert client.session is not None and client.session.keeper.refusals == 2
        assert not fake.expired and reg.lease_losses == 0 and reg.registrations == 1
        times = fake.calls["Heartbeat"]
        assert max(b - a for a, b in itertools.pairwise(times)) < TTL
        await reg.close()


async def test_a_session_lost_under_overload_comes_back_once_the_server_lets_it(make_client) -> None:
    fake = FakeRegistry(sessions=True, retry_after_ms=300)
    async with fake_server(fake) as address:
        client = make_client(_config(address))
        regs = [client.register("storm", f"10.0.0.{n}:80", ttl=TTL, drain_seconds=0) for n in range(5)]
        await _enter(regs)
        assert client.session is not None
        first = client.session.session_id
        # The session is lost, and the server refuses the new session and the batch for a while.
        fake.refuse.update({"OpenSession": 3, "RegisterBatch": 2})
        fake.lose_next_heartbeat = True
        await eventually(lambda: _true(all(r.registrations == 2 for r in regs)), timeout=15)
        assert fake.batches == [5] and client.session.session_id != first
        assert {fake.registered[r.instance_id] for r in regs} == {client.session.session_id}
        opens = fake.calls["OpenSession"][1:]  # the first opened the first session
        gaps = [b - a for a, b in itertools.pairwise(opens)]
        assert len(opens) == 4 and all(g >= 0.29 for g in gaps), gaps
        await _leave(regs)


async def _true(value: bool) -> bool:
    return value


async def _len(ids: Awaitable[list[str]], n: int) -> list[str] | bool:
    got = await ids
    return got if len(got) == n else False
