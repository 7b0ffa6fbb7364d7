"""The sync face: the same methods, blocking, for threaded code. The servers run on the
test's event loop, so the sync calls run in a worker thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from discovery_client import Status, SyncDiscoveryClient
from tests.support.clients import config
from tests.support.helpers import register


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


async def test_sync_resolve_pick_register(etcd, servers, connect) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    await register(stubs, "web", "10.0.0.1:80", zone="a")
    await register(stubs, "web", "10.0.0.2:80", zone="b")

    def scenario() -> None:
        with SyncDiscoveryClient(config([server], zone="b")) as client:
            first = client.resolve("web")
            assert sorted(first.addresses) == ["10.0.0.1:80", "10.0.0.2:80"] and not first.stale
            assert client.resolve("web") is first  # from memory, without a trip to the loop
            assert {client.pick("web").address for _ in range(4)} == {"10.0.0.2:80"}  # local zone first

            with client.register("pay", "10.0.0.9:443", ttl=2, drain_seconds=0.3) as reg:
                assert reg.lease_id and reg.registrations == 1
                wait_until(lambda: client.resolve("pay").addresses == ["10.0.0.9:443"])
                reg.set_status(Status.NOT_SERVING)
                wait_until(lambda: client.resolve("pay").addresses == [])
                wait_until(lambda: client.resolve("pay", statuses=["not_serving"]).addresses == ["10.0.0.9:443"])
            wait_until(lambda: client.resolve("pay", statuses=list(Status)).addresses == [])

    await asyncio.to_thread(scenario)
