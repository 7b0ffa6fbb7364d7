"""register(): register, keep the lease alive, register again after losing it, drain, deregister."""

from __future__ import annotations

import asyncio

from discovery.store import Store
from discovery_client import Status
from tests.support.clients import config
from tests.support.helpers import eventually, watch


async def test_register_keepalive_lease_loss_reregister_drain_deregister(etcd, servers, connect, make_client) -> None:
    server = await servers.start(etcd)
    observer = watch(connect(server).lookup, "pay")
    client = make_client(config([server], zone="z1"))
    key = ("us-east", "pay", "pay-1")
    try:
        async with client.register("pay", "10.0.0.9:443", instance_id="pay-1", ttl=2, drain_seconds=1.0) as reg:
            assert reg.instance_id == "pay-1" and reg.lease_id and reg.registrations == 1
            await observer.until(lambda w: key in w.state)
            assert observer.state[key].zone == "z1"

            # Keep-alive: six heartbeats at ttl/3 span 4 s, twice the lease's TTL.
            first_lease = reg.lease_id
            await eventually(lambda: _true(reg.heartbeats >= 6), timeout=10)
            assert key in observer.state and reg.lease_id == first_lease

            # Lease loss (revoked behind the server's back): the next heartbeat says NOT_FOUND.
            async with Store([etcd.endpoint]) as store:
                await store.revoke(first_lease)
            await observer.until(lambda w: key not in w.state)
            await eventually(lambda: _true(reg.registrations == 2 and reg.lease_losses == 1), timeout=10)
            await observer.until(lambda w: key in w.state)
            assert reg.lease_id != first_lease

            exiting = asyncio.create_task(reg.__aexit__(None, None, None))
            # Drain: still registered, now DRAINING, so resolve (SERVING only) drops it.
            await observer.until(lambda w: key in w.state and w.state[key].status == Status.DRAINING)
            assert not exiting.done()

            async def draining_in_client() -> bool:
                r = await client.resolve("pay", statuses=["draining"])
                return r.addresses == ["10.0.0.9:443"] and (await client.resolve("pay")).addresses == []

            await eventually(draining_in_client)
            await asyncio.wait_for(exiting, timeout=10)
            # Deregistered: gone from the server's view.
            await observer.until(lambda w: key not in w.state)
    finally:
        await observer.close()


async def test_static_registration_without_drain(etcd, servers, make_client) -> None:
    server = await servers.start(etcd)
    client = make_client(config([server]))
    async with client.register("static", "10.0.0.1:80", ttl=0, drain_seconds=0) as reg:
        assert reg.lease_id == 0

        async def visible() -> bool:
            return (await client.resolve("static")).addresses == ["10.0.0.1:80"]

        await eventually(visible)

    async def gone() -> bool:
        return (await client.resolve("static")).addresses == []

    await eventually(gone)


async def _true(value: bool) -> bool:
    return value
