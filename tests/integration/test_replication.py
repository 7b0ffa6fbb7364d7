"""Replication between regions, each with its own real etcd, all in this process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from discovery.devtools.etcd import EtcdProcess
from discovery_pb.v1 import admin_pb2, lookup_pb2, registry_pb2, types_pb2
from tests.support.helpers import CALL_TIMEOUT, eventually, register, resolve
from tests.support.regions import Regions


def addresses(response: lookup_pb2.ResolveResponse) -> dict[str, str]:
    return {e.instance.address: e.instance.region for e in response.endpoints}


async def test_register_in_one_region_is_seen_in_the_others(regions, region_etcds, connect) -> None:
    await regions.start(region_etcds)
    a, b, c = (connect(regions[r][0]) for r in "abc")
    reg = await register(a, "pay", "10.0.0.1:80")
    await register(a, "pay", "10.0.0.2:80", ttl_seconds=2)

    async def seen_everywhere() -> bool:
        for stubs in (b, c):
            got = await resolve(stubs, "pay", scope=lookup_pb2.ALL)
            if addresses(got) != {"10.0.0.1:80": "a", "10.0.0.2:80": "a"}:
                return False
        return True

    await eventually(seen_everywhere, timeout=2.0)
    # Replicas are served, marked fresh, and LOCAL does not include them.
    got = await resolve(b, "pay", scope=lookup_pb2.ALL)
    assert [(r.region, r.endpoints, r.stale, r.local) for r in got.regions] == [("a", 2, False, False)]
    assert not (await resolve(b, "pay")).endpoints

    # Deregistration replicates; so does the expiry of a lease nobody keeps alive.
    await a.registry.Deregister(
        registry_pb2.DeregisterRequest(service="pay", instance_id=reg.instance_id), timeout=CALL_TIMEOUT
    )

    async def deregistered_gone() -> bool:
        return all(["10.0.0.1:80" not in addresses(await resolve(s, "pay", scope=lookup_pb2.ALL)) for s in (b, c)])

    await eventually(deregistered_gone, timeout=2.0)

    async def all_gone() -> bool:
        return all([not (await resolve(s, "pay", scope=lookup_pb2.ALL)).endpoints for s in (a, b, c)])

    await eventually(all_gone, timeout=8.0)


async def test_failover_follows_proximity_and_min_healthy(regions, region_etcds, connect) -> None:
    await regions.start(region_etcds)
    a, b, c = (connect(regions[r][0]) for r in "abc")
    await register(b, "db", "10.1.0.1:5432")
    await register(c, "db", "10.2.0.1:5432")
    await register(c, "db", "10.2.0.2:5432")

    async def replicated() -> bool:
        return len((await resolve(a, "db", scope=lookup_pb2.ALL)).endpoints) == 3

    await eventually(replicated, timeout=2.0)
    # a's proximity is b then c: b alone satisfies one healthy endpoint.
    got = await resolve(a, "db", scope=lookup_pb2.FAILOVER)
    assert set(addresses(got).values()) == {"b"}
    assert [r.region for r in got.regions] == ["b"]
    got = await resolve(a, "db", scope=lookup_pb2.FAILOVER, min_healthy=2)
    assert addresses(got) == {"10.1.0.1:5432": "b", "10.2.0.1:5432": "c", "10.2.0.2:5432": "c"}
    # A local endpoint is enough: nothing else is added.
    await register(a, "db", "10.0.0.1:5432")
    got = await resolve(a, "db", scope=lookup_pb2.FAILOVER, min_revision=0)
    await eventually(lambda: _only_local(a), timeout=2.0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await resolve(a, "db", min_healthy=100_000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _only_local(stubs) -> bool:
    got = await resolve(stubs, "db", scope=lookup_pb2.FAILOVER)
    return set(addresses(got).values()) == {"a"} and [r.local for r in got.regions] == [True]


async def test_status_shows_each_origin(regions, region_etcds, connect) -> None:
    await regions.start(region_etcds, servers=2)
    await register(connect(regions["a"][0]), "web", "10.0.0.1:80")

    async def both_connected() -> admin_pb2.StatusResponse | None:
        status = await connect(regions["b"][1]).admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)
        origins = {o.origin: o for o in status.origins}
        ready = sorted(origins) == ["a", "c"] and all(o.connected and o.leader for o in origins.values())
        if ready and origins["a"].replicas == 1:  # connected may come before the replica
            return status
        return None

    status = await eventually(both_connected, timeout=5.0)
    a = next(o for o in status.origins if o.origin == "a")
    leader = regions.leader("b", "a")
    assert leader is not None and a.leader == leader.address
    assert a.source in {f"127.0.0.1:{p}" for p in regions.ports["a"]}
    assert a.replicas == 1 and a.checkpoint_revision > 0 and a.lag_revisions == 0
    assert a.last_contact_seconds < 3


async def test_restart_resumes_from_the_checkpoint_without_a_snapshot(regions, region_etcds, connect) -> None:
    await regions.start({r: region_etcds[r] for r in "ab"})
    a = connect(regions["a"][0])
    await register(a, "web", "10.0.0.1:80")
    await eventually(lambda: _count(connect(regions["b"][0]), 1), timeout=2.0)
    await regions.stop_server(regions["b"][0])
    for i in range(2, 6):
        await register(a, "web", f"10.0.0.{i}:80")
    server = await regions.start_server("b", 0)
    await eventually(lambda: _count(connect(server), 5), timeout=3.0)
    assert server.replicators["a"].snapshots == 0


async def _count(stubs, n: int, service: str = "web") -> bool:
    return len((await resolve(stubs, service, scope=lookup_pb2.ALL)).endpoints) == n


async def test_compaction_while_cut_off_resyncs_by_snapshot(regions, servers, connect, tmp_path: Path) -> None:
    etcds = {r: EtcdProcess(tmp_path / r).start() for r in "ab"}
    try:
        await regions.start(etcds)
        a = connect(regions["a"][0])
        keep = await register(a, "web", "10.0.0.1:80")
        gone = await register(a, "web", "10.0.0.2:80")
        await eventually(lambda: _count(connect(regions["b"][0]), 2), timeout=2.0)
        await regions.stop_server(regions["b"][0])  # b is cut off
        await a.registry.Deregister(
            registry_pb2.DeregisterRequest(service="web", instance_id=gone.instance_id), timeout=CALL_TIMEOUT
        )
        new = await register(a, "web", "10.0.0.3:80")
        await regions["a"][0].store.compact(new.revision)
        # A's server holds recent changes in memory beyond etcd's compaction; a restarted one
        # starts its history at its listing, so b's checkpoint is gone everywhere.
        await regions.stop_server(regions["a"][0])
        await regions.start_server("a", 0)
        server = await regions.start_server("b", 0)
        b = connect(server)

        async def resynced() -> bool:
            got = await resolve(b, "web", scope=lookup_pb2.ALL)
            return set(addresses(got)) == {"10.0.0.1:80", "10.0.0.3:80"}

        await eventually(resynced, timeout=3.0)
        assert server.replicators["a"].snapshots == 1
        assert keep.instance_id
    finally:
        for member in etcds.values():
            member.stop()


async def test_leader_stop_hands_over_without_losing_a_change(regions, region_etcds, connect) -> None:
    await regions.start({r: region_etcds[r] for r in "ab"}, servers=2)
    a = connect(regions["a"][0])
    leader = await eventually(lambda: _leader(regions, "b", "a"), timeout=5.0)
    standby = next(s for s in regions["b"] if s is not leader)
    writes = asyncio.create_task(_register_many(a, 40))
    await asyncio.sleep(0)  # let the first registrations start before the handover
    await regions.stop_server(leader)  # a clean stop revokes its lease: the standby takes over at once
    await writes
    await eventually(lambda: _count(connect(standby), 40, "burst"), timeout=5.0)
    assert regions.leader("b", "a") is standby


async def _leader(regions: Regions, region: str, origin: str):
    return regions.leader(region, origin)


async def _register_many(stubs, n: int) -> None:
    for i in range(n):
        await register(stubs, "burst", f"10.9.{i // 250}.{i % 250}:80")


async def test_a_peer_named_for_the_wrong_region_is_refused(regions, region_etcds, connect) -> None:
    await regions.start({r: region_etcds[r] for r in "ab"})
    from discovery_pb.v1 import replication_pb2, replication_pb2_grpc

    stub = replication_pb2_grpc.ReplicationStub(connect(regions["a"][0]).channel)
    call = stub.Stream(replication_pb2.StreamRequest(origin="b"), timeout=CALL_TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert types_pb2.SERVING  # the feed never carries third-region replicas: see test_feed


async def test_cli_shows_origins_and_contributing_regions(regions, region_etcds, connect) -> None:
    import json

    from tests.integration.test_cli import run

    await regions.start({r: region_etcds[r] for r in "ab"})
    await register(connect(regions["a"][0]), "web", "10.0.0.1:80")
    await eventually(lambda: _count(connect(regions["b"][0]), 1), timeout=2.0)
    b = ("--server", regions["b"][0].address)

    async def status_connected() -> dict | None:
        code, out, _ = await run("status", *b, "--json")
        data = json.loads(out)
        return data if code == 0 and data["origins"] and data["origins"][0]["connected"] else None

    data = await eventually(status_connected, timeout=5.0)
    assert data["origins"][0]["origin"] == "a" and data["origins"][0]["replicas"] == 1
    code, out, _ = await run("status", *b)
    assert code == 0 and "ORIGIN" in out and "connected" in out
    code, out, _ = await run("resolve", "web", "--scope", "failover", *b)
    assert code == 0 and "10.0.0.1:80" in out and "# a: 1 endpoints (replica, fresh)" in out
    code, out, _ = await run("resolve", "web", "--scope", "failover", "--min-healthy", "0", *b)
    assert code == 2 and "min-healthy" in out + _


async def test_a_servers_elections_share_the_one_lease_it_keeps_alive(regions, region_etcds) -> None:
    # Elections start together; each granting its own lease left all but one unrefreshed,
    # and their leaders were deposed after the TTL (found by the replication benchmark).
    await regions.start(region_etcds)
    server = regions["a"][0]

    async def both_leading() -> bool:
        return all(e.leading for e in server.elections.values())

    await eventually(both_leading, timeout=5.0)
    for origin in ("b", "c"):
        held = await server.store.get(server.keys.election(origin))
        assert held is not None and held.lease == server.session.lease_id


async def test_the_replicator_rotates_to_another_server_of_the_origin(regions, region_etcds, connect) -> None:
    await regions.start({r: region_etcds[r] for r in "ab"}, servers=2)
    b = connect(regions["b"][0])
    await register(connect(regions["a"][0]), "web", "10.0.0.1:80")
    await eventually(lambda: _count(b, 1), timeout=2.0)
    source = next(o.source for o in (await b.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)).origins)
    doomed = next(s for s in regions["a"] if s.address == source)
    survivor = next(s for s in regions["a"] if s is not doomed)
    await regions.stop_server(doomed)
    await register(connect(survivor), "web", "10.0.0.2:80")
    await eventually(lambda: _count(b, 2), timeout=5.0)

    async def streams_from_survivor() -> bool:
        status = await b.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)
        return status.origins[0].source == survivor.address

    await eventually(streams_from_survivor, timeout=3.0)


async def test_a_rebuilt_origin_is_resynced_by_snapshot(regions, servers, connect, tmp_path: Path) -> None:
    etcds = {r: EtcdProcess(tmp_path / r).start() for r in "ab"}
    rebuilt = EtcdProcess(tmp_path / "a-rebuilt")
    try:
        await regions.start(etcds)
        a = connect(regions["a"][0])
        for i in range(1, 20):  # move the old cluster's revision well past the new one's
            await register(a, "web", f"10.0.0.{i}:80")
        b_server = regions["b"][0]
        b = connect(b_server)
        await eventually(lambda: _count(b, 19), timeout=3.0)
        # Region a is rebuilt from nothing: a new etcd cluster (new id, revision back to 1).
        await regions.stop_server(regions["a"][0])
        etcds["a"].stop()
        regions.etcd["a"] = rebuilt.start()
        await regions.start_server("a", 0)
        await register(connect(regions["a"][0]), "web", "10.0.9.9:80")

        async def resynced() -> bool:
            got = await resolve(b, "web", scope=lookup_pb2.ALL)
            return set(addresses(got)) == {"10.0.9.9:80"}

        # The new origin was never impaired (a fresh start): its deletions apply at once.
        await eventually(resynced, timeout=8.0)
        assert b_server.replicators["a"].snapshots >= 2
    finally:
        for member in (*etcds.values(), rebuilt):
            member.stop()


async def test_max_staleness_drops_a_silent_regions_replicas(regions, region_etcds, connect) -> None:
    await regions.start({r: region_etcds[r] for r in "ab"}, max_staleness_seconds=2.0)
    a = connect(regions["a"][0])
    await register(connect(regions["b"][0]), "web", "10.1.0.1:80")
    await eventually(lambda: _count(a, 1), timeout=2.0)
    await regions.stop_server(regions["b"][0])  # b falls silent

    async def served_stale() -> bool:
        got = await resolve(a, "web", scope=lookup_pb2.ALL)
        return len(got.endpoints) == 1 and got.endpoints[0].stale

    await eventually(served_stale, timeout=4.0)  # stale after 1.5 s, still served up to 2 s
    await eventually(lambda: _count(a, 0), timeout=4.0)  # then dropped
    got = await resolve(a, "web", scope=lookup_pb2.ALL)
    assert not got.regions


async def test_a_server_cut_off_from_its_etcd_refuses_to_feed_replicas(private_etcd, servers, connect) -> None:
    from discovery_pb.v1 import replication_pb2, replication_pb2_grpc

    server = await servers.start(private_etcd, region="a", stale_after_seconds=1.5)
    stub = replication_pb2_grpc.ReplicationStub(connect(server).channel)
    feed = stub.Stream(replication_pb2.StreamRequest(origin="a"), timeout=30)
    assert (await feed.read()).kind == replication_pb2.StreamResponse.SNAPSHOT
    private_etcd.pause()
    try:
        # An open stream ends (so the receiver moves to another server of the region) ...
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while True:
                await feed.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "etcd" in (err.value.details() or "")
        # ... and a new one is refused: stale records would roll the receiver's replicas back.
        call = stub.Stream(replication_pb2.StreamRequest(origin="a", since_revision=1), timeout=CALL_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        private_etcd.resume()
