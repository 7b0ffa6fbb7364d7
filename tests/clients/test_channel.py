"""grpc_channel(): a round-robin channel to a service's endpoints that follows them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from discovery_client import NoEndpoints, SyncDiscoveryClient
from discovery_pb.v1 import registry_pb2
from tests.support.clients import config
from tests.support.helpers import CALL_TIMEOUT, eventually, register

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

Backend = Callable[[int], Awaitable[str]]


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    """Starts gRPC servers on 127.0.0.1 whose health answer (SERVING or NOT_SERVING) tells
    which one served a call; returns each one's address."""
    started: list[grpc.aio.Server] = []

    async def start(status: int) -> str:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("", status)
        started.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in started:
        await server.stop(0)


async def answers(stub, calls: int = 10) -> set[int]:
    out = set()
    for _ in range(calls):
        out.add((await stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)).status)
    return out


async def test_channel_follows_endpoint_changes(etcd, servers, connect, make_client, backend) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    first, second = await backend(SERVING), await backend(NOT_SERVING)
    first_id = (await register(stubs, "hc", first)).instance_id
    client = make_client(config([server]))

    channel = await client.grpc_channel("hc")
    stub = health_pb2_grpc.HealthStub(channel)  # built once: it must keep working across swaps
    assert await answers(stub) == {SERVING}

    await register(stubs, "hc", second)

    async def both() -> bool:
        return await answers(stub) == {SERVING, NOT_SERVING}  # round robin over both

    await eventually(both)

    await stubs.registry.Deregister(
        registry_pb2.DeregisterRequest(service="hc", instance_id=first_id), timeout=CALL_TIMEOUT
    )

    async def moved() -> bool:
        return await answers(stub) == {NOT_SERVING}

    await eventually(moved)
    assert channel.target == f"ipv4:{second}"
    await channel.close()

    with pytest.raises(NoEndpoints):
        await client.grpc_channel("nothing-here")


async def test_sync_channel_follows_endpoint_changes(etcd, servers, connect, backend) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    first, second = await backend(SERVING), await backend(NOT_SERVING)
    first_id = (await register(stubs, "hc", first)).instance_id

    def use(client: SyncDiscoveryClient) -> grpc.Channel:
        channel = client.grpc_channel("hc")
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status == SERVING
        return channel

    def calls_reach(channel: grpc.Channel, status: int) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 5
        while {stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status for _ in range(6)} != {status}:
            assert time.monotonic() < deadline, "the sync channel did not follow"
            time.sleep(0.02)

    client = await asyncio.to_thread(SyncDiscoveryClient, config([server]))
    try:
        channel = await asyncio.to_thread(use, client)
        await register(stubs, "hc", second)
        await stubs.registry.Deregister(
            registry_pb2.DeregisterRequest(service="hc", instance_id=first_id), timeout=CALL_TIMEOUT
        )
        await asyncio.to_thread(calls_reach, channel, NOT_SERVING)
    finally:
        await asyncio.to_thread(client.close)
