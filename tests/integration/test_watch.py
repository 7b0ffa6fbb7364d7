"""Lookup.Watch against a real etcd: snapshot, ordered changes, resume, coalescing, keep-alive,
service filter, shutdown."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from discovery.api.lookup import SNAPSHOT_CHUNK
from discovery.store import Store
from discovery_pb.v1 import lookup_pb2, lookup_pb2_grpc, registry_pb2, types_pb2
from tests.support.helpers import CALL_TIMEOUT, eventually, instance, register, resolve, watch

SNAPSHOT = lookup_pb2.WatchResponse.SNAPSHOT
CHANGES = lookup_pb2.WatchResponse.CHANGES
KEEPALIVE = lookup_pb2.WatchResponse.KEEPALIVE
PUT = types_pb2.Change.PUT
DELETE = types_pb2.Change.DELETE


async def deregister(stubs, service: str, instance_id: str) -> int:
    request = registry_pb2.DeregisterRequest(service=service, instance_id=instance_id)
    return (await stubs.registry.Deregister(request, timeout=CALL_TIMEOUT)).revision


async def write_sequence(stubs, service: str = "web") -> list[tuple[int, int, str]]:
    """Puts, updates and deletes; returns the ground truth (revision, kind, instance_id)."""
    truth: list[tuple[int, int, str]] = []
    for round_ in range(4):
        for n in range(3):
            reg = await register(stubs, service, f"10.0.{round_}.{n}:80", instance_id=f"i{n}", version=str(round_))
            truth.append((reg.revision, PUT, f"i{n}"))
        truth.append((await deregister(stubs, service, f"i{round_ % 3}"), DELETE, f"i{round_ % 3}"))
    return truth


def async_true(condition):
    async def probe() -> bool:
        return bool(condition())

    return probe


def triples(changes) -> list[tuple[int, int, str]]:
    return [(c.revision, c.kind, c.instance_id) for c in changes]


async def test_snapshot_then_changes_in_revision_order(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    first = [await register(stubs, "web", f"10.0.0.{n}:80", instance_id=f"s{n}") for n in range(3)]
    await resolve(stubs, "web", min_revision=first[-1].revision)  # the view has them

    watcher = watch(stubs.lookup, "web")
    try:
        await watcher.until(lambda w: w.snapshots == 1)
        snapshot = watcher.messages[0]
        assert snapshot.kind == SNAPSHOT and not snapshot.more and not snapshot.stale
        assert snapshot.revision >= first[-1].revision
        assert sorted(i.instance_id for i in snapshot.instances) == ["s0", "s1", "s2"]

        truth = await write_sequence(stubs)
        last = truth[-1][0]
        await watcher.until(lambda w: w.changes and w.changes[-1].revision >= last)
        seen = triples(watcher.changes)
        revisions = [r for r, _, _ in seen]
        assert revisions == sorted(revisions), "changes out of revision order"
        assert all(r > snapshot.revision for r in revisions), "a change repeats the snapshot"
        # Coalescing may drop superseded states, never the latest one, and never invent one.
        assert set(seen) <= set(truth)
        latest = {}
        for revision, kind, iid in truth:
            latest[iid] = (revision, kind, iid)
        assert set(latest.values()) <= set(seen)
        for message in watcher.messages[1:]:
            if message.kind == CHANGES:
                assert message.revision >= message.changes[-1].revision
        # The folded stream equals what Resolve says.
        resolved = await resolve(stubs, "web", min_revision=last)
        assert {k[2]: v for k, v in watcher.state.items()} == {
            e.instance.instance_id: e.instance for e in resolved.endpoints
        }
    finally:
        await watcher.close()


async def test_large_snapshot_comes_in_parts(etcd, servers, connect, key_prefix) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    count = 2 * SNAPSHOT_CHUNK + 123
    async with Store([etcd.endpoint], op_timeout=10) as store:
        sem = asyncio.Semaphore(64)

        async def put(n: int) -> int:
            record = instance("big", f"10.1.{n // 250}.{n % 250}:80", instance_id=f"b{n}", region="us-east")
            async with sem:
                revision, _, _ = await store.put(
                    server.keys.instance("us-east", "big", f"b{n}"), record.SerializeToString()
                )
                return revision

        last = max(await asyncio.gather(*(put(n) for n in range(count))))
    await resolve(stubs, "big", min_revision=last)

    watcher = watch(stubs.lookup, "big")
    try:
        await watcher.until(lambda w: w.snapshots == 1, timeout=20)
        parts = watcher.messages
        assert [p.kind for p in parts] == [SNAPSHOT] * 3
        assert [p.more for p in parts] == [True, True, False]
        assert len({p.revision for p in parts}) == 1 and parts[0].revision >= last
        assert all(len(p.instances) <= SNAPSHOT_CHUNK for p in parts)
        assert len(watcher.state) == count
        # A change after a chunked snapshot follows it.
        reg = await register(stubs, "big", "10.9.9.9:80", instance_id="late")
        await watcher.until(lambda w: any(c.instance_id == "late" for c in w.changes))
        assert watcher.changes[-1].revision == reg.revision
    finally:
        await watcher.close()


async def test_resume_gives_exactly_the_changes_after_the_revision(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    start = await register(stubs, "web", "10.0.9.9:80", instance_id="anchor")
    truth = await write_sequence(stubs)
    # Changes to another service are not part of a filtered resume.
    other = await register(stubs, "other", "10.0.8.8:80")
    truth_all = [(start.revision, PUT, "anchor"), *truth]
    last = other.revision
    await resolve(stubs, "web", min_revision=last)

    for since in [start.revision, *(r for r, _, _ in truth[:-1])]:
        watcher = watch(stubs.lookup, "web", since_revision=since)
        try:
            await watcher.until(lambda w: w.messages)
            first = watcher.messages[0]
            assert first.kind == CHANGES, f"resume from {since} began with {first.kind}"
            assert first.revision >= last
            assert triples(first.changes) == [t for t in truth_all if t[0] > since]
            assert all(c.service == "web" for c in first.changes)
        finally:
            await watcher.close()

    # Resuming at the head: nothing to send but a keep-alive, then live changes, no snapshot.
    watcher = watch(stubs.lookup, "web", since_revision=last)
    try:
        await watcher.until(lambda w: w.messages)
        assert watcher.messages[0].kind == KEEPALIVE and not watcher.messages[0].changes
        reg = await register(stubs, "web", "10.0.7.7:80", instance_id="after")
        await watcher.until(lambda w: w.changes)
        assert triples(watcher.changes) == [(reg.revision, PUT, "after")]
        assert all(m.kind != SNAPSHOT for m in watcher.messages)
    finally:
        await watcher.close()


async def test_resume_older_than_the_history_gets_a_snapshot(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd, history=5))
    early = await register(stubs, "web", "10.0.0.1:80", instance_id="e")
    truth = await write_sequence(stubs)  # 16 changes: more than the history holds
    await resolve(stubs, "web", min_revision=truth[-1][0])

    watcher = watch(stubs.lookup, "web", since_revision=early.revision)
    try:
        await watcher.until(lambda w: w.snapshots == 1)
        assert watcher.messages[0].kind == SNAPSHOT
        assert watcher.messages[0].revision >= truth[-1][0]
        resolved = await resolve(stubs, "web")
        assert set(k[2] for k in watcher.state) == {e.instance.instance_id for e in resolved.endpoints}
    finally:
        await watcher.close()

    # Within the history: the changes, no snapshot.
    since = truth[-3][0]
    watcher = watch(stubs.lookup, "web", since_revision=since)
    try:
        await watcher.until(lambda w: w.messages)
        assert watcher.messages[0].kind == CHANGES
        assert triples(watcher.messages[0].changes) == [t for t in truth if t[0] > since]
    finally:
        await watcher.close()


def slow_reader_channel(server) -> grpc.aio.Channel:
    """A channel whose receive window stays small (no BDP probing): a reader that does not read
    pushes back on the server after a few messages, as a slow consumer on a real network does.
    (With the default window gRPC itself absorbs megabytes before the server feels it.)"""
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * 1024)]
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options)


async def test_slow_consumer_gets_coalesced_latest_state(etcd, servers, connect) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    padding = {f"k{n}": "x" * 1000 for n in range(12)}  # ~12 KB a record: the window fills fast
    ids = [f"i{n}" for n in range(4)]
    for iid in ids:
        reg = await register(stubs, "hot", "10.0.0.1:80", instance_id=iid, metadata=padding, version="0")
    await resolve(stubs, "hot", min_revision=reg.revision)

    channel = slow_reader_channel(server)
    try:
        call = channel.unary_stream(
            "/discovery.v1.Lookup/Watch",
            request_serializer=lookup_pb2.WatchRequest.SerializeToString,
            response_deserializer=lookup_pb2.WatchResponse.FromString,
        )(lookup_pb2.WatchRequest(service="hot"), timeout=60)
        first = await asyncio.wait_for(call.read(), CALL_TIMEOUT)
        assert first.kind == SNAPSHOT and len(first.instances) == 4

        # Hundreds of changes to the same four instances while the client reads nothing.
        writes = 300
        latest: dict[str, tuple[int, str]] = {}
        for n in range(writes):
            iid = ids[n % len(ids)]
            reg = await register(stubs, "hot", "10.0.0.1:80", instance_id=iid, metadata=padding, version=str(n))
            latest[iid] = (reg.revision, str(n))
        last = max(r for r, _ in latest.values())

        messages, received = 0, {}
        changes = 0
        while True:
            message = await asyncio.wait_for(call.read(), CALL_TIMEOUT)
            assert message is not grpc.aio.EOF
            messages += 1
            for change in message.changes:
                changes += 1
                assert change.kind == PUT
                previous = received.get(change.instance_id)
                assert previous is None or previous[0] < change.revision
                received[change.instance_id] = (change.revision, change.instance.version)
            if message.changes and message.changes[-1].revision >= last:
                break
        assert received == latest, "the final state per instance is not the latest written"
        assert messages < writes / 5 and changes < writes / 5, f"{messages} messages, {changes} changes"
        call.cancel()
    finally:
        await channel.close()


async def test_keepalive_on_an_idle_stream(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))  # watch_keepalive_seconds=0.5 in the fixture
    reg = await register(stubs, "web", "10.0.0.1:80")
    await resolve(stubs, "web", min_revision=reg.revision)
    watcher = watch(stubs.lookup, "web")
    try:
        await watcher.until(lambda w: w.snapshots == 1)
        started = time.monotonic()
        await watcher.until(lambda w: sum(m.kind == KEEPALIVE for m in w.messages) >= 3, timeout=10)
        elapsed = time.monotonic() - started
        keepalives = [m for m in watcher.messages if m.kind == KEEPALIVE]
        assert all(m.revision >= reg.revision and not m.stale and not m.changes for m in keepalives)
        assert 0.9 < elapsed < 6, f"3 keep-alives took {elapsed:.2f}s at a 0.5 s interval"
    finally:
        await watcher.close()


async def test_service_filter(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    await register(stubs, "web", "10.0.0.1:80", instance_id="w0")
    reg = await register(stubs, "api", "10.0.0.2:80", instance_id="a0")
    await resolve(stubs, "api", min_revision=reg.revision)
    web, everything = watch(stubs.lookup, "web"), watch(stubs.lookup, "")
    try:
        await web.until(lambda w: w.snapshots == 1)
        await everything.until(lambda w: w.snapshots == 1)
        assert [k[1:] for k in web.state] == [("web", "w0")]
        assert {k[1:] for k in everything.state} >= {("web", "w0"), ("api", "a0")}

        # The api change comes first: had the filter leaked it, it would precede the web one.
        await register(stubs, "api", "10.0.0.3:80", instance_id="a1")
        await deregister(stubs, "api", "a0")
        last = await register(stubs, "web", "10.0.0.4:80", instance_id="w1")
        await web.until(lambda w: w.changes and w.changes[-1].revision >= last.revision)
        await everything.until(lambda w: w.changes and w.changes[-1].revision >= last.revision)
        assert {c.service for c in web.changes} == {"web"}
        assert [(c.service, c.instance_id) for c in everything.changes] == [("api", "a1"), ("api", "a0"), ("web", "w1")]
    finally:
        await web.close()
        await everything.close()


async def test_bad_watch_requests_are_rejected(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    for request in (
        lookup_pb2.WatchRequest(service="Not_A_Service"),
        lookup_pb2.WatchRequest(service="web", since_revision=-1),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stubs.lookup.Watch(request, timeout=CALL_TIMEOUT):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_two_servers_on_one_etcd_agree(etcd, servers, connect) -> None:
    a, b = connect(await servers.start(etcd)), connect(await servers.start(etcd))
    wa, wb = watch(a.lookup, "web"), watch(b.lookup, "web")
    try:
        truth = await write_sequence(a)
        await register(b, "web", "10.0.5.5:80", instance_id="from-b")
        last = (await register(a, "web", "10.0.5.6:80", instance_id="from-a")).revision
        for w in (wa, wb):
            await w.until(lambda w: w.revision >= last and w.changes and w.changes[-1].revision >= last)
        assert wa.state == wb.state
        assert {k[2] for k in wa.state} == {"i0", "i1", "i2", "from-a", "from-b"} - {truth[-1][2]}
    finally:
        await wa.close()
        await wb.close()


async def test_shutdown_ends_watch_streams_promptly(etcd, servers, connect) -> None:
    server = await servers.start(etcd, grace_seconds=10.0)
    stubs = connect(server)
    await register(stubs, "web", "10.0.0.1:80")
    watchers = [watch(stubs.lookup, "web"), watch(stubs.lookup, ""), watch(stubs.lookup, "api")]
    for w in watchers:
        await w.until(lambda w: w.snapshots == 1)
    # And one waiting for a revision the view has not reached.
    ahead = watch(stubs.lookup, "web", since_revision=server.view.revision + 1000)
    await eventually(async_true(lambda: len(server._lookup.streams._streams) == 4))

    started = time.monotonic()
    await asyncio.wait_for(servers.stop(server), 8)
    took = time.monotonic() - started
    for w in [*watchers, ahead]:
        await asyncio.wait_for(w.ended.wait(), 5)
        assert w.error is not None and w.error.code() == grpc.StatusCode.UNAVAILABLE, w.error
        assert "shutting down" in w.error.details()
    assert took < 3, f"stop took {took:.2f}s with Watch streams open (grace 10 s)"


async def test_shutdown_with_a_reader_that_does_not_read(etcd, servers, connect) -> None:
    """The server is blocked writing to it: the status cannot overtake the unread data, so the
    call is cancelled at the end of the grace period, and the stop still completes."""
    server = await servers.start(etcd, grace_seconds=1.0)
    stubs = connect(server)
    padding = {f"k{n}": "x" * 1000 for n in range(12)}
    await register(stubs, "web", "10.0.0.1:80", metadata=padding)
    channel = slow_reader_channel(server)
    try:
        stuck = lookup_pb2_grpc.LookupStub(channel).Watch(lookup_pb2.WatchRequest(service="web"), timeout=60)
        assert (await asyncio.wait_for(stuck.read(), CALL_TIMEOUT)).kind == SNAPSHOT
        for n in range(20):
            await register(stubs, "web", "10.0.0.1:80", metadata=padding, version=str(n))

        started = time.monotonic()
        await asyncio.wait_for(servers.stop(server), 8)
        assert time.monotonic() - started < 4
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while await asyncio.wait_for(stuck.read(), CALL_TIMEOUT) is not grpc.aio.EOF:
                pass
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        await channel.close()
