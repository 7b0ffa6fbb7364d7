"""The destructive-update guard: an update that empties a service, or removes more than a
share of it at once, is held unless a fresh read confirms it."""

from __future__ import annotations

import time

from discovery_client import GuardPolicy
from discovery_pb.v1 import registry_pb2
from tests.support.clients import config
from tests.support.helpers import CALL_TIMEOUT, eventually, register


async def deregister(stubs, service: str, instance_id: str) -> None:
    await stubs.registry.Deregister(
        registry_pb2.DeregisterRequest(service=service, instance_id=instance_id), timeout=CALL_TIMEOUT
    )


async def register_all(stubs, service: str, addresses: list[str]) -> list[str]:
    return [(await register(stubs, service, a)).instance_id for a in addresses]


async def two_servers_with_web(etcd, private_etcd, servers, connect):
    """Two servers of one region on separate etcds (so they can disagree, as after a bad
    write to one etcd), both with the same two instances of "web"; the client follows the
    first. Returns (bad, good, the instance ids on bad, on good)."""
    bad, good = await servers.start(etcd), await servers.start(private_etcd)
    addresses = ["10.0.0.1:80", "10.0.0.2:80"]
    return (
        bad,
        good,
        await register_all(connect(bad), "web", addresses),
        await register_all(connect(good), "web", addresses),
    )


async def test_unconfirmed_emptying_update_is_held_for_the_grace_period(
    etcd, private_etcd, servers, connect, make_client
) -> None:
    # The server the client follows drops every instance, the other still has them.
    bad, good, ids, _ = await two_servers_with_web(etcd, private_etcd, servers, connect)
    client = make_client(config([bad, good], guard=GuardPolicy(grace_seconds=1.5)))
    assert len(await client.resolve("web")) == 2
    watch = client.watch_of("web")
    assert watch is not None

    for instance_id in ids:
        await deregister(connect(bad), "web", instance_id)
    removed_at = time.monotonic()

    async def held() -> bool:
        r = await client.resolve("web")
        return r.held and len(r) >= 1  # still answering from a view before the removal

    await eventually(held)
    assert watch.holds == 1

    async def applied() -> bool:
        r = await client.resolve("web")
        return not r.held and len(r) == 0

    await eventually(applied, timeout=6)
    assert time.monotonic() - removed_at >= 1.4  # not before the grace period (minus timer slack)


async def test_a_read_that_does_not_confirm_is_retried_within_the_grace_period(
    etcd, private_etcd, servers, connect, make_client
) -> None:
    # The fresh read first disagrees (the other server still has the instances); once the
    # other server has them removed too, a later read confirms: applied long before the grace.
    bad, good, ids_bad, ids_good = await two_servers_with_web(etcd, private_etcd, servers, connect)
    client = make_client(config([bad, good], guard=GuardPolicy(grace_seconds=60)))
    assert len(await client.resolve("web")) == 2

    for instance_id in ids_bad:
        await deregister(connect(bad), "web", instance_id)

    async def held() -> bool:
        return (await client.resolve("web")).held

    await eventually(held)
    for instance_id in ids_good:
        await deregister(connect(good), "web", instance_id)

    async def applied() -> bool:
        r = await client.resolve("web")
        return not r.held and len(r) == 0

    await eventually(applied, timeout=10)  # the retries' pauses reach 2-4 s by then; the grace is 60
    assert client.watch_of("web").holds == 1  # type: ignore[union-attr]


async def test_a_confirmed_removal_applies_at_once(etcd, servers, connect, make_client) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    ids = await register_all(stubs, "web", ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])
    client = make_client(config([server], guard=GuardPolicy(grace_seconds=60)))
    assert len(await client.resolve("web")) == 3

    for instance_id in ids:
        await deregister(stubs, "web", instance_id)

    async def empty() -> bool:
        return len(await client.resolve("web")) == 0

    await eventually(empty)  # well within the 60 s grace: the fresh Resolve confirmed it
    watch = client.watch_of("web")
    assert watch is not None and watch.holds >= 1


async def test_small_removals_and_guard_off_apply_directly(etcd, servers, connect, make_client) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    ids = await register_all(stubs, "web", [f"10.0.0.{i}:80" for i in range(1, 5)])
    ids_api = await register_all(stubs, "api", ["10.0.1.1:80", "10.0.1.2:80"])
    guarded = make_client(config([server], guard=GuardPolicy(grace_seconds=60)))
    trusting = make_client(config([server], guard=GuardPolicy(enabled=False)))
    assert len(await guarded.resolve("web")) == 4
    assert len(await trusting.resolve("api")) == 2

    await deregister(stubs, "web", ids[0])  # 1 of 4: under the 50 % share
    for instance_id in ids_api:
        await deregister(stubs, "api", instance_id)

    async def applied() -> bool:
        return len(await guarded.resolve("web")) == 3 and len(await trusting.resolve("api")) == 0

    await eventually(applied)
    assert guarded.watch_of("web").holds == 0  # type: ignore[union-attr]
    assert trusting.watch_of("api").holds == 0  # type: ignore[union-attr]
