"""Bytes that are not the method's protobuf message: INVALID_ARGUMENT naming the method, on
every service of the port, and the server stays healthy."""

from __future__ import annotations

import random

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2

from discovery_pb.v1 import admin_pb2, lookup_pb2, registry_pb2, replication_pb2
from tests.support.helpers import CALL_TIMEOUT, instance, register

_GARBAGE = b"\xff\xff\xff\xff"  # field 0 / wire type 7: never valid protobuf

UNARY = {
    "/discovery.v1.Registry/Register": registry_pb2.RegisterRequest(instance=instance()),
    "/discovery.v1.Registry/Deregister": registry_pb2.DeregisterRequest(service="web", instance_id="x"),
    "/discovery.v1.Lookup/Resolve": lookup_pb2.ResolveRequest(service="web"),
    "/discovery.v1.Admin/Status": admin_pb2.StatusRequest(),
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest(),
}
SERVER_STREAMING = {
    "/discovery.v1.Lookup/Watch": lookup_pb2.WatchRequest(service="web"),
    "/discovery.v1.Replication/Stream": replication_pb2.StreamRequest(origin="us-east"),
    "/grpc.health.v1.Health/Watch": health_pb2.HealthCheckRequest(),
}
BIDI = [
    "/discovery.v1.Registry/Heartbeat",
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    "/envoy.service.status.v3.ClientStatusDiscoveryService/StreamClientStatus",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
]


async def _unary(channel: grpc.aio.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    try:
        await channel.unary_unary(method)(payload, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def channel(etcd, servers):
    server = await servers.start(etcd)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.mark.parametrize("method", [*UNARY, *SERVER_STREAMING])
async def test_a_request_that_is_not_protobuf_is_invalid_argument(channel, method) -> None:
    if method in UNARY:
        call = channel.unary_unary(method)(_GARBAGE, timeout=CALL_TIMEOUT)
    else:
        call = channel.unary_stream(method)(_GARBAGE, timeout=CALL_TIMEOUT).read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"{method}: the request is not a valid protobuf message of the method's type"


@pytest.mark.parametrize("method", BIDI)
async def test_a_streamed_request_that_is_not_protobuf_is_invalid_argument(channel, method) -> None:
    call = channel.stream_stream(method)(timeout=CALL_TIMEOUT)
    await call.write(_GARBAGE)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert method in (err.value.details() or "")


@pytest.mark.slow
async def test_random_and_mutated_payloads_leave_the_server_healthy(channel, connect, servers) -> None:
    rng = random.Random(18)
    valid = [(m, r.SerializeToString()) for m, r in UNARY.items()]
    codes: dict[grpc.StatusCode, int] = {}
    for i in range(1000):
        method, good = valid[i % len(valid)]
        if i % 2:
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        else:  # a valid message with bytes flipped, cut or appended
            data = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                if data and rng.random() < 0.6:
                    data[rng.randrange(len(data))] = rng.randrange(256)
                else:
                    data += bytes([rng.randrange(256)])
            payload = bytes(data[: rng.randrange(len(data) + 1)] if rng.random() < 0.3 else data)
        code = await _unary(channel, method, payload)
        codes[code] = codes.get(code, 0) + 1
    # Bad input is the caller's fault; nothing reads as the server's.
    assert not {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL} & set(codes), codes
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 300, codes
    assert (await _unary(channel, "/discovery.v1.Admin/Status", b"")) == grpc.StatusCode.OK
    await register(connect(servers.running[0]))  # and it still writes
