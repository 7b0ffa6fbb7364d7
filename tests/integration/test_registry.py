"""The write path against a real etcd: Register, Heartbeat, Deregister, and Resolve's
read-your-writes and filters (docs/architecture.md: write and read paths)."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import pytest

from discovery_pb.v1 import admin_pb2, lookup_pb2, registry_pb2, types_pb2
from tests.support.helpers import ALL_STATUSES, CALL_TIMEOUT, register, resolve

SERVING, DRAINING, NOT_SERVING = types_pb2.SERVING, types_pb2.DRAINING, types_pb2.NOT_SERVING
LEASE_TTL = 2  # etcd's minimum lease TTL is about 2 s


def ids(response: lookup_pb2.ResolveResponse) -> list[str]:
    return sorted(e.instance.instance_id for e in response.endpoints)


async def instance_count(stubs, at_revision: int) -> int:
    """Instances the server's view holds once it has reached ``at_revision``."""
    await resolve(stubs, "sentinel", min_revision=at_revision)
    status = await stubs.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)
    return status.instance_count


async def heartbeat(stubs, lease_id: int) -> registry_pb2.HeartbeatResponse:
    """One heartbeat on a stream of its own; raises AioRpcError when the server ends it."""
    call = stubs.registry.Heartbeat(timeout=CALL_TIMEOUT)
    try:
        await call.write(registry_pb2.HeartbeatRequest(lease_id=lease_id))
        return await call.read()
    finally:
        call.cancel()


async def next_change(watch, kind: int, instance_id: str) -> types_pb2.Change:
    """Read a Watch stream until a change of ``kind`` for ``instance_id`` arrives."""
    while (message := await watch.read()) is not grpc.aio.EOF:
        for change in message.changes:
            if change.kind == kind and change.instance_id == instance_id:
                return change
    raise AssertionError("the watch ended before the change arrived")


# --- register, resolve ------------------------------------------------------------------


async def test_register_then_resolve_reads_its_own_write(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd, region="us-east"))
    reg = await register(
        stubs,
        "payments",
        "10.1.2.3:8443",
        instance_id="pay-1",
        zone="us-east-1a",
        tags=["canary", "v2"],
        metadata={"build": "42"},
        version="1.4.0",
        weight=50,
    )
    assert (reg.instance_id, reg.lease_id, reg.ttl_seconds) == ("pay-1", 0, 0)
    assert reg.revision > 0

    resp = await resolve(stubs, "payments", min_revision=reg.revision)
    assert resp.revision >= reg.revision and not resp.stale
    [endpoint] = resp.endpoints
    assert endpoint.mod_revision == reg.revision and not endpoint.stale
    got = endpoint.instance
    assert (got.service, got.instance_id, got.region, got.zone, got.address) == (
        "payments",
        "pay-1",
        "us-east",
        "us-east-1a",
        "10.1.2.3:8443",
    )
    assert (list(got.tags), dict(got.metadata), got.version, got.weight) == (
        ["canary", "v2"],
        {"build": "42"},
        "1.4.0",
        50,
    )
    assert got.status == SERVING and got.ttl_seconds == 0
    assert abs(got.registered_at_ms / 1000 - time.time()) < 60


async def test_leased_register_returns_its_lease(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    reg = await register(stubs, ttl_seconds=30)
    assert reg.lease_id != 0 and reg.ttl_seconds == 30
    assert (await heartbeat(stubs, reg.lease_id)).ttl_seconds > 0
    await stubs.registry.Deregister(
        registry_pb2.DeregisterRequest(service="web", instance_id=reg.instance_id), timeout=CALL_TIMEOUT
    )


# --- leases and heartbeats --------------------------------------------------------------


async def test_lease_expires_once_heartbeats_stop_and_the_watch_sees_the_delete(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    reg = await register(stubs, instance_id="short-lived", ttl_seconds=LEASE_TTL)
    await resolve(stubs, min_revision=reg.revision)  # the snapshot below must hold it
    assert (await heartbeat(stubs, reg.lease_id)).ttl_seconds > 0
    registered_at = time.monotonic()  # the last heartbeat: the TTL runs from here
    watch = stubs.lookup.Watch(lookup_pb2.WatchRequest(service="web", since_revision=0), timeout=LEASE_TTL + 5)
    first = await watch.read()
    assert first.kind == lookup_pb2.WatchResponse.SNAPSHOT
    assert [i.instance_id for i in first.instances] == ["short-lived"]

    async with asyncio.timeout(registered_at + LEASE_TTL + 2 - time.monotonic()):
        change = await next_change(watch, types_pb2.Change.DELETE, "short-lived")
    watch.cancel()
    assert change.revision > reg.revision
    assert ids(await resolve(stubs, min_revision=change.revision, statuses=ALL_STATUSES)) == []

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await heartbeat(stubs, reg.lease_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert str(reg.lease_id) in err.value.details()


async def test_heartbeats_keep_a_registration_past_its_ttl(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    reg = await register(stubs, instance_id="kept", ttl_seconds=LEASE_TTL)
    until = time.monotonic() + 2 * LEASE_TTL + 0.5
    call = stubs.registry.Heartbeat(timeout=3 * LEASE_TTL + 5)
    while time.monotonic() < until:
        await call.write(registry_pb2.HeartbeatRequest(lease_id=reg.lease_id))
        answer = await call.read()
        assert answer.lease_id == reg.lease_id and answer.ttl_seconds > 0
        await asyncio.sleep(LEASE_TTL / 4)  # the client's heartbeat interval, not a synchronisation
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK

    # Still there, at a revision later than any expiry could have happened.
    later = await register(stubs, "sentinel", "10.9.9.9:1")
    assert ids(await resolve(stubs, min_revision=later.revision)) == ["kept"]


@pytest.mark.parametrize(("lease_id", "code"), [(0x7E57_0000_0001, "NOT_FOUND"), (0, "INVALID_ARGUMENT")])
async def test_heartbeat_for_an_unknown_lease_ends_the_stream(etcd, servers, connect, lease_id, code) -> None:
    stubs = connect(await servers.start(etcd))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await heartbeat(stubs, lease_id)
    assert err.value.code() == getattr(grpc.StatusCode, code)


# --- idempotency ------------------------------------------------------------------------


async def test_reregistering_updates_the_one_instance(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    first = await register(stubs, instance_id="web-1", weight=10, tags=["old"])
    second = await register(stubs, instance_id="web-1", address="10.0.0.2:81", weight=20, tags=["new"])
    assert second.instance_id == first.instance_id
    assert second.revision > first.revision

    [endpoint] = (await resolve(stubs, min_revision=second.revision)).endpoints
    assert (endpoint.instance.address, endpoint.instance.weight, list(endpoint.instance.tags)) == (
        "10.0.0.2:81",
        20,
        ["new"],
    )
    assert endpoint.mod_revision == second.revision
    assert await instance_count(stubs, second.revision) == 1


async def test_reregistering_moves_to_a_new_lease_and_revokes_the_old(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    first = await register(stubs, instance_id="web-1", ttl_seconds=30)
    second = await register(stubs, instance_id="web-1", ttl_seconds=30)
    assert second.lease_id not in (0, first.lease_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await heartbeat(stubs, first.lease_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await heartbeat(stubs, second.lease_id)).ttl_seconds > 0

    # Leased to static: the old lease goes, the record stays (revoking it must not delete it).
    third = await register(stubs, instance_id="web-1", ttl_seconds=0)
    assert third.lease_id == 0
    with pytest.raises(grpc.aio.AioRpcError):
        await heartbeat(stubs, second.lease_id)
    later = await register(stubs, "sentinel", "10.9.9.9:1")
    [endpoint] = (await resolve(stubs, min_revision=later.revision)).endpoints
    assert endpoint.instance.ttl_seconds == 0 and endpoint.mod_revision == third.revision


@pytest.mark.parametrize(
    ("address", "expected_id"),
    [
        ("10.0.0.7:8080", "10.0.0.7-8080"),
        ("Api.Example.com:443", "api.example.com-443"),
        ("[2001:db8::7]:80", "2001-0db8-0000-0000-0000-0000-0000-0007-80"),
    ],
)
async def test_register_without_id_derives_a_stable_one(etcd, servers, connect, address, expected_id) -> None:
    stubs = connect(await servers.start(etcd))
    first = await register(stubs, address=address)
    again = await register(stubs, address=address, weight=5)
    assert first.instance_id == again.instance_id == expected_id
    resp = await resolve(stubs, min_revision=again.revision)
    assert [(e.instance.instance_id, e.instance.weight) for e in resp.endpoints] == [(expected_id, 5)]


# --- static registrations, deregister, several servers ----------------------------------


async def test_static_registration_survives_a_server_restart(etcd, servers, connect) -> None:
    server = await servers.start(etcd)
    reg = await register(connect(server), instance_id="static-1", ttl_seconds=0)
    await servers.stop(server)

    stubs = connect(await servers.start(etcd))
    assert ids(await resolve(stubs, min_revision=reg.revision)) == ["static-1"]


async def test_deregister_removes_the_instance(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    static = await register(stubs, instance_id="static-1")
    leased = await register(stubs, instance_id="leased-1", address="10.0.0.2:80", ttl_seconds=30)

    async def deregister(instance_id: str) -> registry_pb2.DeregisterResponse:
        request = registry_pb2.DeregisterRequest(service="web", instance_id=instance_id)
        return await stubs.registry.Deregister(request, timeout=CALL_TIMEOUT)

    gone = await deregister("static-1")
    assert gone.revision > static.revision
    assert ids(await resolve(stubs, min_revision=gone.revision)) == ["leased-1"]

    gone = await deregister("leased-1")
    assert ids(await resolve(stubs, min_revision=gone.revision, statuses=ALL_STATUSES)) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:  # its lease went with it
        await heartbeat(stubs, leased.lease_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await deregister("static-1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'static-1'" in err.value.details() and "'web'" in err.value.details()


async def test_two_servers_on_one_etcd_agree(etcd, servers, connect) -> None:
    one = connect(await servers.start(etcd))
    two = connect(await servers.start(etcd))
    reg = await register(one, instance_id="a")
    resp = await resolve(two, min_revision=reg.revision)
    assert ids(resp) == ["a"] and resp.endpoints[0].mod_revision == reg.revision

    reg = await register(two, instance_id="b", address="10.0.0.2:80")
    assert ids(await resolve(one, min_revision=reg.revision)) == ["a", "b"]

    gone = await two.registry.Deregister(
        registry_pb2.DeregisterRequest(service="web", instance_id="a"), timeout=CALL_TIMEOUT
    )
    assert ids(await resolve(one, min_revision=gone.revision)) == ["b"]


# --- Resolve: filters and min_revision --------------------------------------------------

FLEET = [
    # instance_id, status, zone, tags
    ("a", SERVING, "z1", ["canary", "v2"]),
    ("b", SERVING, "z1", ["v2"]),
    ("c", SERVING, "z2", ["canary", "v2", "gpu"]),
    ("d", DRAINING, "z2", ["canary"]),
    ("e", NOT_SERVING, "z1", []),
]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, ["a", "b", "c"]),  # SERVING only by default
        ({"statuses": [DRAINING]}, ["d"]),
        ({"statuses": [NOT_SERVING, DRAINING]}, ["d", "e"]),
        ({"statuses": ALL_STATUSES}, ["a", "b", "c", "d", "e"]),
        ({"tags": ["v2"]}, ["a", "b", "c"]),
        ({"tags": ["canary", "v2"]}, ["a", "c"]),  # every tag listed must be present
        ({"tags": ["canary", "missing"]}, []),
        ({"zone": "z1"}, ["a", "b"]),
        ({"zone": "z1", "statuses": ALL_STATUSES}, ["a", "b", "e"]),
        ({"zone": "z2", "tags": ["canary"], "statuses": [SERVING, DRAINING]}, ["c", "d"]),
        ({"zone": "nowhere"}, []),
    ],
)
async def test_resolve_filters(etcd, servers, connect, filters, expected) -> None:
    stubs = connect(await servers.start(etcd))
    for n, (ident, status, zone, tags) in enumerate(FLEET):
        reg = await register(
            stubs, address=f"10.0.0.{n + 1}:80", instance_id=ident, status=status, zone=zone, tags=tags
        )
    assert ids(await resolve(stubs, min_revision=reg.revision, **filters)) == expected


async def test_resolve_waits_for_a_revision_that_comes(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    base = await register(stubs, "other", "10.0.0.9:80")
    waiting = asyncio.create_task(resolve(stubs, min_revision=base.revision + 1))
    reg = await register(stubs, instance_id="late")
    resp = await waiting
    assert resp.revision >= base.revision + 1
    if reg.revision == base.revision + 1:  # nothing else wrote to the shared etcd in between
        assert ids(resp) == ["late"]


async def test_resolve_min_revision_beyond_ends_at_the_call_deadline(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    reg = await register(stubs)
    deadline = 0.5
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.lookup.Resolve(
            lookup_pb2.ResolveRequest(service="web", min_revision=reg.revision + 1_000_000), timeout=deadline
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < deadline + 0.5


async def test_resolve_min_revision_wait_is_bounded_by_the_server_too(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd, max_wait_seconds=0.3))
    reg = await register(stubs)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await resolve(stubs, min_revision=reg.revision + 1_000_000)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert str(reg.revision + 1_000_000) in err.value.details()  # the server's answer, not the client's
    assert time.monotonic() - started < 0.3 + 0.5


async def test_read_your_writes_on_a_server_whose_watch_is_just_starting(etcd, servers, connect) -> None:
    """A write read back at its revision from a server that has only just started, whose etcd
    watch is still being created (the etcd bug behind this is pinned in test_store.py)."""
    writer = connect(await servers.start(etcd))
    for i in range(15):
        reader_server = await servers.start(etcd)
        reader = connect(reader_server)
        reg = await register(writer, "churn", f"10.0.0.{i}:80", instance_id=f"churn-{i}")
        resp = await resolve(reader, "churn", min_revision=reg.revision)
        assert f"churn-{i}" in ids(resp), f"write {i} at revision {reg.revision} missing at {resp.revision}"
        await servers.stop(reader_server)


async def test_min_revision_of_a_write_outside_the_view_is_reached(etcd, servers, connect) -> None:
    """A revision made by a key the view does not watch has no event: etcd's progress answer,
    confirmed, must carry the view there."""
    from discovery.store import Store

    server = await servers.start(etcd)
    stubs = connect(server)
    async with Store([etcd.endpoint]) as store:
        revision, _, _ = await store.put(f"{servers.prefix}elsewhere".encode(), b"x")
    started = time.monotonic()
    resp = await resolve(stubs, "web", min_revision=revision)
    assert resp.revision >= revision
    assert time.monotonic() - started < 3


async def test_cached_answers_follow_every_change(etcd, servers, connect) -> None:
    """The common Resolve is served from a per-service cache: it must change with the service,
    including a service that empties and comes back, and not with its neighbours."""
    stubs = connect(await servers.start(etcd))
    a = await register(stubs, "cached", "10.0.0.1:80", instance_id="a")
    assert ids(await resolve(stubs, "cached", min_revision=a.revision)) == ["a"]
    other = await register(stubs, "neighbour", "10.0.0.9:80")
    assert ids(await resolve(stubs, "cached", min_revision=other.revision)) == ["a"]
    b = await register(stubs, "cached", "10.0.0.2:80", instance_id="b")
    assert ids(await resolve(stubs, "cached", min_revision=b.revision)) == ["a", "b"]
    drained = await register(stubs, "cached", "10.0.0.2:80", instance_id="b", status=DRAINING)
    assert ids(await resolve(stubs, "cached", min_revision=drained.revision)) == ["a"]
    for instance_id in ("a", "b"):
        gone = await stubs.registry.Deregister(
            registry_pb2.DeregisterRequest(service="cached", instance_id=instance_id), timeout=CALL_TIMEOUT
        )
    assert ids(await resolve(stubs, "cached", min_revision=gone.revision)) == []
    again = await register(stubs, "cached", "10.0.0.3:80", instance_id="c")
    assert ids(await resolve(stubs, "cached", min_revision=again.revision)) == ["c"]


async def test_shutdown_ends_heartbeat_streams_promptly(etcd, servers, connect) -> None:
    server = await servers.start(etcd, grace_seconds=10.0)
    stubs = connect(server)
    reg = await register(stubs, "web", "10.0.0.1:80", ttl_seconds=LEASE_TTL)
    call = stubs.registry.Heartbeat(timeout=30)
    await call.write(registry_pb2.HeartbeatRequest(lease_id=reg.lease_id))
    assert (await asyncio.wait_for(call.read(), CALL_TIMEOUT)).lease_id == reg.lease_id
    started = time.monotonic()
    await asyncio.wait_for(servers.stop(server), 8)
    assert time.monotonic() - started < 3, "an open Heartbeat stream held the stop (grace 10 s)"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (info.value.details() or "")


async def test_keys_the_view_cannot_read_do_not_block_read_your_writes(etcd, servers, connect) -> None:
    """A foreign key and a corrupt record under the instances prefix are not served, and a
    revision with no event for the view (a write elsewhere) is still reached."""
    from discovery.keys import KeySchema
    from discovery.store import Store

    server = await servers.start(etcd)
    stubs = connect(server)
    keys = KeySchema(servers.prefix)
    async with Store([etcd.endpoint]) as store:
        await store.put(keys.instances + b"not/an/instance/key", b"x")
        await store.put(keys.instance("us-east", "web", "corrupt"), b"\xff\xff not protobuf")
        reg = await register(stubs, "web", "10.0.0.1:80", instance_id="good")
        elsewhere, _, _ = await store.put(f"{servers.prefix}elsewhere".encode(), b"x")
    resp = await resolve(stubs, "web", min_revision=elsewhere, statuses=ALL_STATUSES)
    assert resp.revision >= elsewhere > reg.revision
    assert ids(resp) == ["good"]
