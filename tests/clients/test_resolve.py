"""resolve(): a local cache fed by Watch, failover between servers and regions, stale
answers when every server is gone, the cache file on a cold start, recovery."""

from __future__ import annotations

import json

import pytest

from discovery_client import InvalidArgument, Scope, Status, Unavailable
from tests.support.clients import config
from tests.support.helpers import eventually, register


async def test_first_resolve_subscribes_later_ones_are_in_memory(etcd, servers, connect, make_client) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    await register(stubs, "web", "10.0.0.1:80", zone="a")
    await register(stubs, "web", "10.0.0.2:80", zone="b")
    client = make_client(config([server]))

    first = await client.resolve("web")
    assert sorted(first.addresses) == ["10.0.0.1:80", "10.0.0.2:80"]
    assert not first.stale and first.source == server.address and first.revision > 0
    assert all(e.region == "us-east" and e.status is Status.SERVING for e in first.endpoints)
    assert await client.resolve("web") is first  # answered from memory: the same object

    watch = client.watch_of("web")
    assert watch is not None
    done = await register(stubs, "web", "10.0.0.3:80")

    async def has_three() -> bool:
        r = await client.resolve("web")
        return len(r) == 3 and r.revision >= done.revision

    await eventually(has_three)
    assert client.watch_of("web") is watch  # still the one stream


async def test_filters_and_invalid_arguments(etcd, servers, connect, make_client) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    await register(stubs, "api", "10.0.1.1:80", tags=["canary"], zone="a")
    await register(stubs, "api", "10.0.1.2:80", status=Status.DRAINING, zone="b")
    client = make_client(config([server]))

    assert (await client.resolve("api")).addresses == ["10.0.1.1:80"]
    both = await client.resolve("api", statuses=["serving", Status.DRAINING])
    assert sorted(both.addresses) == ["10.0.1.1:80", "10.0.1.2:80"]
    assert (await client.resolve("api", tags=["canary"], scope="local")).addresses == ["10.0.1.1:80"]
    assert (await client.resolve("api", zone="b")).addresses == []
    with pytest.raises(InvalidArgument):
        await client.resolve("api", scope="everywhere")
    with pytest.raises(InvalidArgument):
        await client.resolve("Not A Service!")


async def test_fails_over_between_the_servers_of_a_region(etcd, servers, connect, make_client) -> None:
    first, second = await servers.start(etcd), await servers.start(etcd)
    stubs = connect(second)
    await register(stubs, "web", "10.0.0.1:80")
    client = make_client(config([first, second]))
    assert (await client.resolve("web")).source == first.address

    await servers.stop(first)
    await register(stubs, "web", "10.0.0.2:80")

    async def moved() -> bool:
        r = await client.resolve("web")
        return r.source == second.address and len(r) == 2 and not r.stale

    await eventually(moved, timeout=10)
    # A service resolved for the first time now goes straight to the server that answers.
    await register(stubs, "db", "10.0.2.1:5432")
    assert (await client.resolve("db")).source == second.address


async def test_fails_over_to_another_region_and_comes_back(etcd, private_etcd, servers, connect, make_client) -> None:
    east = await servers.start(etcd, region="us-east")
    west = await servers.start(private_etcd, region="eu-west")  # its own etcd: no replication needed
    await register(connect(east), "web", "10.0.0.1:80")
    await register(connect(west), "web", "10.1.0.1:80")
    client = make_client(config([east], failover={"eu-west": [west]}))

    home = await client.resolve("web")
    assert home.addresses == ["10.0.0.1:80"] and home.source == east.address

    port = east.port
    await servers.stop(east)

    async def in_west() -> bool:
        r = await client.resolve("web")
        return r.source == west.address and r.addresses == ["10.1.0.1:80"] and not r.stale

    await eventually(in_west, timeout=10)
    assert (await client.resolve("web", scope=Scope.LOCAL)).addresses == []  # nothing of us-east is known there

    east = await servers.start(etcd, region="us-east", listen=f"127.0.0.1:{port}")

    async def back_home() -> bool:
        r = await client.resolve("web")
        return r.source == east.address and r.addresses == ["10.0.0.1:80"]

    await eventually(back_home, timeout=10)


async def test_every_server_down_then_cold_start_from_file_then_recovery(
    etcd, servers, connect, make_client, tmp_path
) -> None:
    cache_file = tmp_path / "discovery-cache.json"
    server = await servers.start(etcd)
    port = server.port
    stubs = connect(server)
    await register(stubs, "web", "10.0.0.1:80")
    await register(stubs, "web", "10.0.0.2:80")
    client = make_client(config([server], cache_file=str(cache_file)))
    fresh = await client.resolve("web")
    assert len(fresh) == 2 and not fresh.stale

    async def persisted() -> bool:
        return cache_file.exists() and len(json.loads(cache_file.read_text())["services"]["web"]["instances"]) == 2

    await eventually(persisted)

    # 1. Every server gone: the last good view, flagged stale.
    await servers.stop(server)

    async def stale() -> bool:
        return (await client.resolve("web")).stale

    await eventually(stale, timeout=10)
    cached = await client.resolve("web")
    assert sorted(cached.addresses) == sorted(fresh.addresses) and cached.source == server.address
    with pytest.raises(Unavailable):
        await client.resolve("never-seen", timeout=3)
    await client.close()

    # 2. A process that starts during the outage answers from the file.
    cold = make_client(config([server], cache_file=str(cache_file)))
    from_file = await cold.resolve("web")
    assert from_file.stale and from_file.source == "file"
    assert sorted(from_file.addresses) == sorted(fresh.addresses)

    # 3. The server comes back (same address): fresh answers again, changes flow.
    server = await servers.start(etcd, listen=f"127.0.0.1:{port}")
    await register(connect(server), "web", "10.0.0.3:80")

    async def recovered() -> bool:
        r = await cold.resolve("web")
        return not r.stale and r.source == server.address and len(r) == 3

    await eventually(recovered, timeout=10)
