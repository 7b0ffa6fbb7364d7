"""DirectClient, the low-level face: one call at a time to named servers, errors that carry the
gRPC code, "no connection" told apart from a server's UNAVAILABLE without reading messages,
and a Watch that resumes from its revision on another server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from discovery.devtools.process import free_port
from discovery_client import (
    DirectClient,
    DiscoveryClientError,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    Scope,
    Status,
    Unavailable,
    Unreachable,
)
from discovery_pb.v1 import lookup_pb2

ONE_ATTEMPT = RetryPolicy(attempts=1, deadline=3.0)


@pytest.fixture
async def direct() -> AsyncIterator[Callable[..., DirectClient]]:
    made: list[DirectClient] = []

    def _make(*servers: str, **settings: Any) -> DirectClient:
        settings = {"call_timeout": 2.0, "keepalive_seconds": 1.0, "watch_idle_timeout": 2.0} | settings
        client = DirectClient(servers, **settings)
        made.append(client)
        return client

    yield _make
    for client in made:
        await client.close()


async def test_register_resolve_status_deregister(etcd, servers, direct) -> None:
    server = await servers.start(etcd)
    api = direct(f"127.0.0.1:{server.port}")

    registered = await api.register("web", "10.0.0.1:80", instance_id="web-1", zone="z1", tags=["canary"])
    assert registered.instance_id == "web-1" and registered.lease_id == 0
    answer = await api.resolve("web", scope="all", min_revision=registered.revision)
    assert [(e.instance.instance_id, e.instance.zone) for e in answer.endpoints] == [("web-1", "z1")]
    assert (await api.resolve("web", tags=["other"])).endpoints == []
    assert (await api.resolve("web", statuses=[Status.DRAINING], scope=Scope.LOCAL)).endpoints == []

    status = await api.status()
    assert status.region == "us-east" and status.instance_count == 1

    await api.deregister("web", "web-1")
    with pytest.raises(NotFound) as missing:
        await api.deregister("web", "web-1")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert missing.value.server == f"127.0.0.1:{server.port}" and missing.value.details

    with pytest.raises(InvalidArgument) as bad:
        await api.resolve("web_x")
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "service" in bad.value.details


async def _aborting_server() -> tuple[grpc.aio.Server, int]:
    """A server whose Admin.Status answers UNAVAILABLE, as a server whose etcd is down does."""

    async def status(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "etcd is unavailable")
        return b""

    handler = grpc.unary_unary_rpc_method_handler(status)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("discovery.v1.Admin", {"Status": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_no_connection_is_told_from_a_server_answering_unavailable(direct) -> None:
    server, port = await _aborting_server()
    try:
        with pytest.raises(Unavailable) as answered:
            await direct(f"127.0.0.1:{port}", retry=ONE_ATTEMPT).status()
        assert not isinstance(answered.value, Unreachable)
        assert answered.value.code == grpc.StatusCode.UNAVAILABLE
        assert answered.value.details == "etcd is unavailable"
    finally:
        await server.stop(0)

    with pytest.raises(Unreachable) as refused:
        await direct(f"127.0.0.1:{free_port()}", retry=ONE_ATTEMPT).status()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE

    # A peer that accepts the connection and drops it, as a TLS port does to plain text.
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    closer = await asyncio.start_server(hang_up, "127.0.0.1", 0, family=socket.AF_INET)
    try:
        with pytest.raises(Unreachable):
            await direct(f"127.0.0.1:{closer.sockets[0].getsockname()[1]}", retry=ONE_ATTEMPT).status()
    finally:
        closer.close()
        await closer.wait_closed()


async def test_unreachable_only_when_no_server_connected(direct) -> None:
    server, port = await _aborting_server()
    try:
        api = direct(f"127.0.0.1:{free_port()}", f"127.0.0.1:{port}", retry=ONE_ATTEMPT)
        with pytest.raises(Unavailable) as failed:
            await api.status()
        assert type(failed.value) is Unavailable and failed.value.server == f"127.0.0.1:{port}"
        assert [(type(a), a.code) for a in failed.value.attempts] == [
            (Unreachable, grpc.StatusCode.UNAVAILABLE),
            (Unavailable, grpc.StatusCode.UNAVAILABLE),
        ]
    finally:
        await server.stop(0)


async def test_watch_resumes_from_its_revision_on_the_next_server(etcd, servers, direct) -> None:
    first, second = await servers.start(etcd), await servers.start(etcd)
    api = direct(f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}")
    await api.register("db", "10.0.0.1:5432", instance_id="db-1")
    interruptions: list[DiscoveryClientError] = []
    messages = api.watch("db", on_interrupt=interruptions.append)

    async def next_data() -> Any:
        async with asyncio.timeout(10):
            while (msg := await anext(messages)).kind == lookup_pb2.WatchResponse.KEEPALIVE:
                pass
        return msg

    try:
        snapshot = await next_data()
        assert snapshot.kind == lookup_pb2.WatchResponse.SNAPSHOT
        assert [i.instance_id for i in snapshot.instances] == ["db-1"]

        await servers.stop(first)  # its Watch streams end with UNAVAILABLE
        await api.register("db", "10.0.0.2:5432", instance_id="db-2")
        resumed = await next_data()
        while resumed.kind == lookup_pb2.WatchResponse.CHANGES and not resumed.changes:
            resumed = await next_data()  # the resumed stream's first message: nothing new yet
        # Changes after the snapshot's revision, not a new snapshot, and nobody told of an outage.
        assert resumed.kind == lookup_pb2.WatchResponse.CHANGES
        assert [c.instance_id for c in resumed.changes] == ["db-2"]
        assert resumed.revision > snapshot.revision
        assert interruptions == []
    finally:
        await messages.aclose()


async def test_watch_gives_up_after_its_retry_policy(direct) -> None:
    interruptions: list[DiscoveryClientError] = []
    api = direct(f"127.0.0.1:{free_port()}")
    retry = RetryPolicy(attempts=3, deadline=30, base_delay=0.05, max_delay=0.1)
    with pytest.raises(Unreachable):
        async with asyncio.timeout(20):
            async for _ in api.watch("db", retry=retry, on_interrupt=interruptions.append):
                pass
    assert len(interruptions) == 1 and isinstance(interruptions[0], Unreachable)


async def test_watch_refused_is_raised_at_once(etcd, servers, direct) -> None:
    server = await servers.start(etcd)
    with pytest.raises(InvalidArgument):
        async with asyncio.timeout(10):
            async for _ in direct(f"127.0.0.1:{server.port}").watch("Bad_Name"):
                pass
