"""The standard services every server carries: gRPC health (SERVING once up, NOT_SERVING as
soon as shutdown begins) and reflection."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.helpers import CALL_TIMEOUT, register

SERVICES = ("discovery.v1.Registry", "discovery.v1.Lookup", "discovery.v1.Admin")


async def test_health_serving_then_not_serving_during_shutdown(etcd, servers, connect) -> None:
    server = await servers.start(etcd, grace_seconds=1.0)
    stubs = connect(server)
    health = health_pb2_grpc.HealthStub(stubs.channel)
    for name in ("", *SERVICES):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=CALL_TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name

    # A balancer watching health must see NOT_SERVING when shutdown begins, while an
    # in-flight Watch keeps the server in its grace period.
    updates = health.Watch(health_pb2.HealthCheckRequest(service="discovery.v1.Lookup"), timeout=30)
    assert (await asyncio.wait_for(updates.read(), CALL_TIMEOUT)).status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(servers.stop(server))
    try:
        status = await asyncio.wait_for(updates.read(), CALL_TIMEOUT)
        assert status is not grpc.aio.EOF
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    except grpc.aio.AioRpcError as exc:  # or the stream was ended first, which also stops traffic
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    await asyncio.wait_for(stopping, 10)


async def test_reflection_lists_the_services(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    await register(stubs)
    call = reflection_pb2_grpc.ServerReflectionStub(stubs.channel).ServerReflectionInfo(timeout=CALL_TIMEOUT)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    resp = await call.read()
    await call.done_writing()
    names = {s.name for s in resp.list_services_response.service}
    assert set(SERVICES) <= names and "grpc.health.v1.Health" in names
    # And a client can fetch the schema it needs to call us without our .proto files.
    call = reflection_pb2_grpc.ServerReflectionStub(stubs.channel).ServerReflectionInfo(timeout=CALL_TIMEOUT)
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="discovery.v1.Lookup"))
    resp = await call.read()
    await call.done_writing()
    assert resp.file_descriptor_response.file_descriptor_proto
