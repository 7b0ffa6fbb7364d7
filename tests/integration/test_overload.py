"""Overload is graceful: a server over its limit of writes in flight refuses at once with
RESOURCE_EXHAUSTED, ``discovery-limit: overload`` and a retry-after (never INTERNAL, never a
silent drop), and a client that honours them gets every write through."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

from discovery_client import DirectClient, RetryPolicy
from discovery_pb.v1 import registry_pb2, types_pb2
from tests.support.helpers import CALL_TIMEOUT, resolve


async def test_a_server_over_its_write_limit_sheds_load_with_overload_and_a_retry_after(etcd, servers, connect) -> None:
    server = await servers.start(etcd, max_pending_writes=1)
    stubs = connect(server)

    async def register(n: int) -> tuple[int, dict[str, str]] | None:
        call = stubs.registry.Register(
            registry_pb2.RegisterRequest(
                instance=types_pb2.Instance(service="web", instance_id=f"w{n}", address=f"10.0.0.{n}:80")
            ),
            timeout=CALL_TIMEOUT,
        )
        try:
            await call
            return None
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return n, dict(await call.trailing_metadata())

    outcomes = await asyncio.gather(*(register(n) for n in range(40)))
    refused = [o for o in outcomes if o is not None]
    assert refused, "40 concurrent writes against a limit of 1: some must be refused"
    assert len(refused) < 40
    for _, trailers in refused:
        assert trailers["discovery-limit"] == "overload" and 0 < int(trailers["retry-after-ms"]) <= 2000
    assert server.admission.refused == len(refused)
    # What was acknowledged is there; what was refused is not.
    written = {f"w{n}" for n in range(40)} - {f"w{n}" for n, _ in refused}
    last = await resolve(stubs, "web")
    assert {e.instance.instance_id for e in last.endpoints} == written


async def test_a_client_that_honours_retry_after_gets_every_write_through(etcd, servers) -> None:
    server = await servers.start(etcd, max_pending_writes=2)
    # Sixty at once against a limit of two: each call may be refused several times before its
    # turn; the policy allows that many passes within its deadline.
    policy = RetryPolicy(attempts=30, deadline=20)
    async with DirectClient(f"127.0.0.1:{server.port}", call_timeout=10, retry=policy) as client:
        done = await asyncio.gather(*(client.register("api", f"10.1.0.{n}:80", instance_id=f"a{n}") for n in range(60)))
        assert len(done) == 60
        assert server.admission.refused > 0  # it did shed load on the way
        answer = await client.resolve("api", min_revision=max(d.revision for d in done))
        assert len(answer.endpoints) == 60
