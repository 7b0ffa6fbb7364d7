"""Priorities across regions, as a stock gRPC client sees them: the local region first, the
next region when the local one has no healthy instance, and back."""

from __future__ import annotations

import grpc.aio
from envoy.config.core.v3.health_check_pb2 import HealthStatus

from discovery_pb.v1 import lookup_pb2, types_pb2
from tests.support.helpers import eventually, register, resolve
from tests.xds.ads_client import AdsClient


async def replicated(stubs, service: str, count: int) -> None:
    """Wait until the region of ``stubs`` holds ``count`` instances of ``service`` (its own
    and replicas), so that what follows does not race replication."""

    async def enough() -> bool:
        return len((await resolve(stubs, service, scope=lookup_pb2.ALL)).endpoints) == count

    await eventually(enough, timeout=5.0)


async def test_draining_local_region_fails_over_to_the_next_and_back(
    regions, region_etcds, connect, backends, stock_clients
) -> None:
    await regions.start({r: region_etcds[r] for r in "ab"})
    a, b = connect(regions["a"][0]), connect(regions["b"][0])
    a1, a2, b1 = await backends.start("a1", "a2", "b1")
    for backend in (a1, a2):
        await register(a, "pay", backend.address, instance_id=backend.name, zone="z1")
    await register(b, "pay", b1.address, instance_id="b1")
    await replicated(a, "pay", 3)
    client = await stock_clients.start(regions["a"][0].address, "pay")

    await client.until(lambda c: len(c.answers()) >= 20, timeout=15)
    assert set(client.answers()) == {"a1", "a2"}  # b1 is known in region a, yet gets nothing

    for backend in (a1, a2):
        await register(a, "pay", backend.address, instance_id=backend.name, zone="z1", status=types_pb2.DRAINING)
    mark = client.mark()
    await client.until(lambda c: c.answers(mark)[-10:] == ["b1"] * 10, timeout=3.0)
    assert not client.errors(mark), client.errors(mark)[:3]

    for backend in (a1, a2):
        await register(a, "pay", backend.address, instance_id=backend.name, zone="z1")
    mark = client.mark()
    await client.until(lambda c: set(c.answers(mark)[-10:]) <= {"a1", "a2"} and len(c.answers(mark)) >= 10, 2.0)
    assert not client.errors(mark)


async def test_bootstrap_region_comes_first_and_stale_replicas_are_marked(
    regions, region_etcds, connect, backends, stock_clients
) -> None:
    await regions.start({r: region_etcds[r] for r in "ab"})
    a, b = connect(regions["a"][0]), connect(regions["b"][0])
    a1, b1 = await backends.start("a1", "b1")
    await register(a, "pay", a1.address, instance_id="a1")
    await register(b, "pay", b1.address, instance_id="b1")
    await replicated(a, "pay", 2)

    # A client that says it is in region b, talking to region a's server, prefers b.
    client = await stock_clients.start(regions["a"][0].address, "pay", region="b")
    await client.until(lambda c: c.answers()[-10:] == ["b1"] * 10, timeout=15)

    channel = grpc.aio.insecure_channel(regions["a"][0].address)
    raw = AdsClient(channel)
    try:
        raw.subscribe_service("pay")
        await raw.until(lambda r: len(r.endpoints("pay")) == 2)
        assert raw.endpoints("pay") == {
            a1.address: (0, HealthStatus.HEALTHY, "a"),
            b1.address: (1, HealthStatus.HEALTHY, "b"),
        }
        # Region b goes dark: region a keeps serving its replica, marked stale (UNKNOWN health
        # and metadata), and a stock client in region b keeps using it.
        await regions.stop_server(regions["b"][0])
        await raw.until(lambda r: r.endpoints("pay").get(b1.address, (0, 0, ""))[1] == HealthStatus.UNKNOWN, 5.0)
        cla = raw.resources["type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"]["pay"]
        stale = {loc.locality.region: loc.metadata.filter_metadata["discovery"]["stale"] for loc in cla.endpoints}
        assert stale == {"a": False, "b": True}
        mark = client.mark()
        await client.until(lambda c: c.answers(mark)[-10:] == ["b1"] * 10, timeout=5)
    finally:
        await raw.close()
        await channel.close()
