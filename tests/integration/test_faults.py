"""The read path when etcd goes away, hangs, or compacts under the watch (each test has its
own etcd, to stop, SIGSTOP or compact).

A hung etcd (SIGSTOP) accepts TCP and never answers: only deadlines and gRPC keep-alive notice
it. The fixture's etcd timeout is 2 s and the keep-alive 1 s, so "fast" here means a few
seconds, with room for a loaded machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from discovery.devtools.etcd import EtcdProcess
from discovery.keys import KeySchema
from discovery.store import Store
from discovery_pb.v1 import admin_pb2, lookup_pb2, registry_pb2, types_pb2
from tests.support.helpers import CALL_TIMEOUT, eventually, register, resolve, watch

KEEPALIVE = lookup_pb2.WatchResponse.KEEPALIVE
PUT = types_pb2.Change.PUT
DELETE = types_pb2.Change.DELETE
FAST = 5.0  # seconds: a write against a dead or hung etcd must fail within this
NOTICE = 5.0  # seconds: the view must notice a dead or hung etcd within this


@asynccontextmanager
async def etcd_client(endpoint: str) -> AsyncIterator[Store]:
    """A second etcd client, not the server's: 'another client' in the scenarios."""
    async with Store([endpoint], op_timeout=5.0) as store:
        yield store


def record(service: str, instance_id: str, address: str, region: str = "us-east", **fields) -> bytes:
    """A record as Register would store it (a second client writing behind the server's back)."""
    return types_pb2.Instance(
        service=service,
        instance_id=instance_id,
        address=address,
        region=region,
        status=types_pb2.SERVING,
        weight=100,
        **fields,
    ).SerializeToString()


async def status(stubs) -> admin_pb2.StatusResponse:
    return await stubs.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)


async def etcd_listing(store: Store, keys: KeySchema, service: str) -> dict[str, str]:
    _, items = await store.list_prefix(keys.instances)
    found = {}
    for kv in items:
        key = keys.parse_instance(kv.key)
        if key is not None and key.service == service:
            found[key.instance_id] = types_pb2.Instance.FromString(kv.value).address
    return found


def addresses(response) -> dict[str, str]:
    return {e.instance.instance_id: e.instance.address for e in response.endpoints}


class Outage:
    """Takes etcd away in one of two ways and brings it back with the same data."""

    def __init__(self, member: EtcdProcess, kind: str) -> None:
        self.member, self.kind = member, kind
        self.begun = False

    def begin(self) -> None:
        self.begun = True
        if self.kind == "hung":
            self.member.pause()
        else:
            self.member.stop()

    def end(self) -> None:
        if not self.begun:
            return
        self.begun = False
        if self.kind == "hung":
            self.member.resume()
        else:
            self.member.start()


async def fails_fast(attempt, kind: str) -> float:
    """Run ``attempt`` (a write); it must fail with UNAVAILABLE naming etcd, within FAST seconds."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await attempt
    took = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    assert "etcd" in info.value.details(), info.value.details()
    assert took < FAST, f"a write against a {kind} etcd took {took:.1f}s to fail"
    return took


async def heartbeat_once(call, lease_id: int, timeout: float = CALL_TIMEOUT) -> registry_pb2.HeartbeatResponse:
    await call.write(registry_pb2.HeartbeatRequest(lease_id=lease_id))
    return await asyncio.wait_for(call.read(), timeout)


async def expect_serving_stale(stubs, watcher, before, kind: str) -> None:
    """etcd is gone: reads answer the last view marked stale, writes fail fast."""

    async def stale_answer():
        response = await resolve(stubs, "web")
        return response if response.stale else None

    response = await eventually(stale_answer, timeout=NOTICE + 5)
    assert addresses(response) == addresses(before)
    assert all(e.stale for e in response.endpoints)
    assert response.revision == before.revision and response.stale_seconds > 0

    async def unhealthy():
        answer = await status(stubs)
        return answer if not answer.etcd.healthy and answer.stale else None

    answer = await eventually(unhealthy, timeout=10)
    assert "etcd" in answer.etcd.error and answer.etcd.last_contact_seconds > 0
    assert answer.instance_count == 2

    # Open Watch streams stay open and say they are stale.
    await watcher.until(lambda w: w.messages[-1].kind == KEEPALIVE and w.messages[-1].stale)
    assert not watcher.ended.is_set() and len(watcher.state) == 2


async def expect_recovered(stubs, watcher, server, endpoint: str, before) -> None:
    """etcd is back: stale clears by itself, writes succeed, changes by anyone show up."""

    async def fresh():
        answer = await status(stubs)
        return answer if answer.etcd.healthy and not answer.stale else None

    answer = await eventually(fresh, timeout=15)
    assert answer.etcd.error == ""
    assert not (await resolve(stubs, "web")).stale
    await watcher.until(lambda w: w.messages[-1].kind == KEEPALIVE and not w.messages[-1].stale)

    after = await register(stubs, "web", "10.0.0.4:80", instance_id="after")
    assert after.revision > before.revision
    await watcher.until(lambda w: any(c.instance_id == "after" for c in w.changes))

    # A change by another client after etcd returns shows up in Watch and Resolve.
    async with etcd_client(endpoint) as other:
        revision, _, _ = await other.put(
            server.keys.instance("us-east", "web", "other"), record("web", "other", "10.0.0.5:80")
        )
        await watcher.until(lambda w: any(c.instance_id == "other" for c in w.changes))
        response = await resolve(stubs, "web", min_revision=revision)
        assert not response.stale and not any(e.stale for e in response.endpoints)
        assert addresses(response) == await etcd_listing(other, server.keys, "web")
    assert set(addresses(response)) == {"static", "leased", "after", "other"}
    assert {k[2] for k in watcher.state} == set(addresses(response))


@pytest.mark.parametrize("kind", ["stopped", "hung"])
async def test_etcd_outage_serves_stale_fails_writes_fast_and_recovers(private_etcd, servers, connect, kind) -> None:
    server = await servers.start(private_etcd)
    stubs = connect(server)
    await register(stubs, "web", "10.0.0.1:80", instance_id="static")
    leased = await register(stubs, "web", "10.0.0.2:80", instance_id="leased", ttl_seconds=60)
    await resolve(stubs, "web", min_revision=leased.revision)
    watcher = watch(stubs.lookup, "web")
    heartbeats = stubs.registry.Heartbeat(timeout=60)
    outage = Outage(private_etcd, kind)
    try:
        await watcher.until(lambda w: w.snapshots == 1)
        assert (await heartbeat_once(heartbeats, leased.lease_id)).ttl_seconds > 0
        before = await resolve(stubs, "web", min_revision=leased.revision)
        assert not before.stale and len(before.endpoints) == 2

        outage.begin()
        began = time.monotonic()
        await eventually(lambda: asyncio.sleep(0, server.view.stale), timeout=NOTICE + 5)
        noticed = time.monotonic() - began
        assert noticed < NOTICE, f"the view noticed the {kind} etcd after {noticed:.1f}s"

        # Register, Deregister and a heartbeat at once: each fails fast, naming etcd.
        deregister = registry_pb2.DeregisterRequest(service="web", instance_id="static")
        await asyncio.gather(
            fails_fast(register(stubs, "web", "10.0.0.3:80", instance_id="during"), kind),
            fails_fast(stubs.registry.Deregister(deregister, timeout=CALL_TIMEOUT + 5), kind),
            fails_fast(heartbeat_once(heartbeats, leased.lease_id, timeout=CALL_TIMEOUT + 5), kind),
        )
        await expect_serving_stale(stubs, watcher, before, kind)
        assert server.view.recovered_at == 0
    finally:
        outage.end()
    try:
        await expect_recovered(stubs, watcher, server, private_etcd.endpoint, before)
        # A hung etcd wakes under the same leader and expires the leases whose TTL ran out:
        # the server says it came back, and receivers in other regions hold its deletions for
        # their resume grace. A restarted etcd elected itself anew, which extends every lease:
        # nothing to hold (docs/replication.md).
        assert (server.view.recovered_at > 0) == (kind == "hung")
        # The lease survived the outage, and a new heartbeat stream keeps it.
        fresh_heartbeats = stubs.registry.Heartbeat(timeout=CALL_TIMEOUT)
        assert (await heartbeat_once(fresh_heartbeats, leased.lease_id)).ttl_seconds > 0
        await fresh_heartbeats.done_writing()
    finally:
        heartbeats.cancel()
        await watcher.close()


@asynccontextmanager
async def cut_off(member: EtcdProcess) -> AsyncIterator[Store]:
    """Stop ``member`` and run its data on another client port, where the server cannot reach
    it, with a client of our own; at exit, bring ``member`` back on its own port."""
    member.stop()
    elsewhere = EtcdProcess(member.data_dir, name=member.name, peer_port=member.peer_port)
    elsewhere.log_path = member.log_path
    elsewhere.start()
    try:
        async with etcd_client(elsewhere.endpoint) as other:
            yield other
    finally:
        elsewhere.stop()
        member.start()


async def changes_behind_the_servers_back(other: Store, keys: KeySchema) -> list[tuple[int, int, str]]:
    """Deletes, an update, a put, an instance that comes and goes; returns (revision, kind, id)."""

    async def put(iid: str, address: str) -> tuple[int, int, str]:
        revision, _, _ = await other.put(keys.instance("us-east", "web", iid), record("web", iid, address))
        return (revision, PUT, iid)

    async def delete(iid: str) -> tuple[int, int, str]:
        revision, _ = await other.delete(keys.instance("us-east", "web", iid))
        return (revision, DELETE, iid)

    return [
        await delete("a0"),
        await delete("a1"),
        await put("a2", "10.0.2.2:80"),
        await put("b0", "10.0.1.0:80"),
        await put("gone", "10.0.9.9:80"),
        await delete("gone"),
        await put("b1", "10.0.1.1:80"),
    ]


@pytest.mark.parametrize("compact", [False, True], ids=["resume", "compacted"])
async def test_changes_made_while_the_server_was_cut_off(private_etcd, servers, connect, compact) -> None:
    """Without compaction the view's watch resumes and replays each change; with the resume
    revision compacted away it re-lists, and watchers get the difference. Nothing is lost."""
    server = await servers.start(private_etcd)
    stubs = connect(server)
    keys = server.keys
    for n in range(5):
        reg = await register(stubs, "web", f"10.0.0.{n}:80", instance_id=f"a{n}")
    await resolve(stubs, "web", min_revision=reg.revision)
    watcher = watch(stubs.lookup, "web")
    try:
        await watcher.until(lambda w: w.snapshots == 1)
        resume_point = watcher.revision

        async with cut_off(private_etcd) as other:
            await eventually(lambda: asyncio.sleep(0, server.view.stale), timeout=NOTICE + 5)

            truth = await changes_behind_the_servers_back(other, keys)
            last = truth[-1][0]
            if compact:
                await other.compact(last)
            expected = await etcd_listing(other, keys, "web")
        assert expected == {
            "a2": "10.0.2.2:80",
            "a3": "10.0.0.3:80",
            "a4": "10.0.0.4:80",
            "b0": "10.0.1.0:80",
            "b1": "10.0.1.1:80",
        }

        def folded(w) -> dict[str, str]:
            return {k[2]: v.address for k, v in w.state.items()}

        await watcher.until(lambda w: folded(w) == expected and not w.stale, timeout=20)
        assert watcher.snapshots == 1, "the watcher was sent a second snapshot instead of changes"
        response = await resolve(stubs, "web", min_revision=last)
        assert not response.stale and addresses(response) == expected
        assert server.view.reloads == (1 if compact else 0)

        seen = [(c.revision, c.kind, c.instance_id) for c in watcher.changes]
        if compact:
            # The difference, at the revision of the re-list: what vanished, what appeared or changed.
            assert sorted((k, i) for _, k, i in seen) == [
                (PUT, "a2"),
                (PUT, "b0"),
                (PUT, "b1"),
                (DELETE, "a0"),
                (DELETE, "a1"),
            ]
            assert len({r for r, _, _ in seen}) == 1 and seen[0][0] >= last
            difference = seen
        else:
            # Each change with its own revision, in order; a live watcher may get only the
            # latest state of an instance that changed twice in one batch ("gone").
            assert [r for r, _, _ in seen] == sorted(r for r, _, _ in seen)
            assert set(seen) <= set(truth) and {t for t in truth if t[2] != "gone"} <= set(seen)
            difference = truth

        # A client resuming from before the outage gets every change from the history, exactly.
        resumed = watch(stubs.lookup, "web", since_revision=resume_point)
        try:
            await resumed.until(lambda w: w.messages)
            assert resumed.messages[0].kind == lookup_pb2.WatchResponse.CHANGES
            assert [(c.revision, c.kind, c.instance_id) for c in resumed.messages[0].changes] == difference
        finally:
            await resumed.close()

        # And the view keeps watching after a reload.
        reg = await register(stubs, "web", "10.0.3.3:80", instance_id="c0")
        await watcher.until(lambda w: w.changes[-1].instance_id == "c0")
        assert watcher.changes[-1].revision == reg.revision
    finally:
        await watcher.close()


@pytest.mark.parametrize("kind", ["stopped", "hung"])
async def test_server_stops_promptly_while_etcd_is_away(private_etcd, servers, connect, kind) -> None:
    server = await servers.start(private_etcd)
    stubs = connect(server)
    await register(stubs, "web", "10.0.0.1:80")
    watcher = watch(stubs.lookup, "web")
    outage = Outage(private_etcd, kind)
    try:
        await watcher.until(lambda w: w.snapshots == 1)
        outage.begin()
        await eventually(lambda: asyncio.sleep(0, server.view.stale), timeout=NOTICE + 5)
        # A write in flight against the dead etcd when the stop begins.
        write = asyncio.create_task(register(stubs, "web", "10.0.0.2:80", instance_id="in-flight"))
        started = time.monotonic()
        await asyncio.wait_for(servers.stop(server), 10)
        took = time.monotonic() - started
        assert took < 4, f"stopping with a {kind} etcd took {took:.1f}s"
        await asyncio.wait_for(watcher.ended.wait(), CALL_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await write  # cut off at the end of the grace period (which code depends on timing)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        outage.end()
        await watcher.close()
