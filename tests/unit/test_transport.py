"""The replicator's gRPC feed against an in-process origin: messages pass through as they
arrive, every way a feed fails reaches the loop as FeedLost, and no other module of the
replication package speaks gRPC."""

from __future__ import annotations

import ast
import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

import discovery.replication
from discovery.replication.feed import Feed, FeedLost
from discovery.replication.transport import GrpcFeed
from discovery_pb.v1 import replication_pb2 as pb
from discovery_pb.v1.replication_pb2_grpc import ReplicationServicer, add_ReplicationServicer_to_server

Script = Callable[[pb.StreamRequest, grpc.aio.ServicerContext], AsyncIterator[pb.StreamResponse]]


class Origin(ReplicationServicer):
    """Answers every Stream with ``script``; remembers the requests and whether each call ended."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[pb.StreamRequest] = []
        self.ended = asyncio.Event()

    async def Stream(  # type: ignore[override]
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        self.requests.append(request)
        try:
            async for message in self.script(request, context):
                yield message
        finally:
            self.ended.set()


@contextlib.asynccontextmanager
async def origin(script: Script) -> AsyncIterator[tuple[Origin, str]]:
    servicer = Origin(script)
    server = grpc.aio.server()
    add_ReplicationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def heartbeat(revision: int) -> pb.StreamResponse:
    return pb.StreamResponse(kind=pb.StreamResponse.HEARTBEAT, origin="a", revision=revision)


async def drain(feed: Feed, endpoint: str, since: int = 0, cluster_id: int = 0) -> list[pb.StreamResponse]:
    got = []
    async with contextlib.aclosing(feed.follow(endpoint, since, cluster_id)) as messages:
        async for message in messages:
            got.append(message)
    return got


async def test_the_request_says_where_to_resume_and_messages_pass_through() -> None:
    async def script(request: pb.StreamRequest, _: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamResponse]:
        yield heartbeat(request.since_revision)
        yield heartbeat(request.since_revision + 1)

    async with origin(script) as (servicer, endpoint):
        feed = GrpcFeed("a", requester="b", silence=2.0)
        got: list[pb.StreamResponse] = []
        with pytest.raises(FeedLost, match="the origin ended the stream"):
            async with contextlib.aclosing(feed.follow(endpoint, 41, 7)) as messages:
                async for message in messages:
                    got.append(message)
    assert [m.revision for m in got] == [41, 42]
    request = servicer.requests[0]
    assert (request.since_revision, request.cluster_id, request.origin, request.requester) == (41, 7, "a", "b")


async def test_a_silent_origin_is_lost_after_the_silence() -> None:
    async def script(_: pb.StreamRequest, __: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamResponse]:
        yield heartbeat(1)
        await asyncio.sleep(30)  # a hung peer: the connection stays, nothing comes
        yield heartbeat(2)

    async with origin(script) as (_, endpoint):
        with pytest.raises(FeedLost, match=r"nothing heard for 0\.3s"):
            await drain(GrpcFeed("a", requester="b", silence=0.3), endpoint)


async def test_an_error_from_the_origin_is_lost_with_its_status() -> None:
    async def script(_: pb.StreamRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamResponse]:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        yield heartbeat(1)

    async with origin(script) as (_, endpoint):
        with pytest.raises(FeedLost, match="UNAVAILABLE: the server is shutting down"):
            await drain(GrpcFeed("a", requester="b", silence=2.0), endpoint)


async def test_nobody_listening_is_lost() -> None:
    async with origin(lambda _, __: _never()) as (_, endpoint):
        pass  # the port is closed again
    with pytest.raises(FeedLost, match="UNAVAILABLE"):
        await drain(GrpcFeed("a", requester="b", silence=2.0), endpoint)


async def test_closing_the_feed_ends_the_call_at_once() -> None:
    async def script(_: pb.StreamRequest, __: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamResponse]:
        while True:
            yield heartbeat(1)
            await asyncio.sleep(0.05)

    async with origin(script) as (servicer, endpoint):
        feed = GrpcFeed("a", requester="b", silence=2.0)
        async with contextlib.aclosing(feed.follow(endpoint, 0, 0)) as messages:
            async for _ in messages:
                break  # what the loop does when a message tells it to reconnect
        async with asyncio.timeout(2):
            await servicer.ended.wait()


async def _never() -> AsyncIterator[pb.StreamResponse]:
    await asyncio.sleep(30)
    yield heartbeat(0)


def test_only_the_transport_imports_grpc() -> None:
    # The feed's and checkpoint's protobuf messages are data; gRPC stubs and the admin API's
    # messages are not the domain's business.
    package = Path(discovery.replication.__file__).parent
    for module in package.glob("*.py"):
        if module.name == "transport.py":
            continue
        imported: set[str] = set()
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        offending = {name for name in imported if name.split(".")[0] == "grpc" or name.endswith("_grpc")}
        offending |= {name for name in imported if name.startswith("discovery.api") or "admin_pb2" in name}
        assert not offending, f"{module.name} imports {sorted(offending)}"
