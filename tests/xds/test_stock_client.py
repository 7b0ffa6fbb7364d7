"""Stock gRPC clients (``xds:///SERVICE``, no library of ours) against one region's server."""

from __future__ import annotations

from collections import Counter

from discovery_pb.v1 import registry_pb2
from tests.support.helpers import CALL_TIMEOUT, register


async def test_round_robin_and_endpoints_that_come_and_go(server, connect, backends, stock_clients) -> None:
    stubs = connect(server)
    b1, b2, b3, b4 = await backends.start("b1", "b2", "b3", "b4")
    for b in (b1, b2, b3):
        await register(stubs, "web", b.address, instance_id=b.name)
    client = await stock_clients.start(server.address, "web")

    await client.until(lambda c: set(c.answers()[-30:]) == {"b1", "b2", "b3"}, timeout=15)
    counts = Counter(await client.next_answers(60))
    assert set(counts) == {"b1", "b2", "b3"} and max(counts.values()) - min(counts.values()) <= 2, counts

    # A registration reaches the client within a second of being acknowledged.
    await register(stubs, "web", b4.address, instance_id="b4")
    mark = client.mark()
    await client.until(lambda c: "b4" in c.answers(mark), timeout=1.0)

    # And so does a deregistration: b1 gets no more calls.
    await stubs.registry.Deregister(
        registry_pb2.DeregisterRequest(service="web", instance_id="b1"), timeout=CALL_TIMEOUT
    )
    mark = client.mark()
    await client.until(lambda c: len(c.answers(mark)) >= 10 and "b1" not in c.answers(mark)[-10:], timeout=1.0)
    assert not client.errors(mark)


async def test_unregistered_service_fails_fast_then_resolves_once_registered(
    server, connect, backends, stock_clients
) -> None:
    (n1,) = await backends.start("n1")
    client = await stock_clients.start(server.address, "nobody")
    # Its endpoints are answered as an empty set: calls fail at once with UNAVAILABLE, not
    # after gRPC's 15 s does-not-exist timer (or the call's deadline).
    await client.until(lambda c: c.errors(), timeout=5.0)
    first = client.errors()[0]
    assert first["error"] == "UNAVAILABLE" and first["t"] - client.lines[0]["t"] < 1.0, client.lines[:3]
    assert not client.answers()

    await register(connect(server), "nobody", n1.address, instance_id="n1")
    mark = client.mark()
    await client.until(lambda c: c.answers(mark)[-5:] == ["n1"] * 5, timeout=2.0)
