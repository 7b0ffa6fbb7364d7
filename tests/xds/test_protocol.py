"""The server's side of the protocol with real clients: NACKs, CSDS, a restart, many streams."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc.aio
import pytest
from envoy.admin.v3.config_dump_shared_pb2 import ClientResourceStatus
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.service.status.v3.csds_pb2 import ClientStatusRequest, ConfigStatus
from envoy.service.status.v3.csds_pb2_grpc import ClientStatusDiscoveryServiceStub
from google.protobuf.message import Message

from discovery.devtools.process import free_port
from discovery.xds import ENDPOINTS, Builder
from tests.support.helpers import CALL_TIMEOUT, eventually, register
from tests.xds.ads_client import AdsClient


class GappedBuilder(Builder):
    """Fault injection: while ``broken``, assignments skip priority 0, which gRPC rejects."""

    broken = False

    def load_assignment(self, name: str, perspective: str) -> Message:
        cla = super().load_assignment(name, perspective)
        if self.broken:
            assert isinstance(cla, ClusterLoadAssignment)
            for locality in cla.endpoints:
                locality.priority += 1
        return cla


async def csds(channel: grpc.aio.Channel, node_id: str) -> list:
    response = await ClientStatusDiscoveryServiceStub(channel).FetchClientStatus(
        ClientStatusRequest(), timeout=CALL_TIMEOUT
    )
    return [c for c in response.config if c.node.id == node_id]


async def test_nacked_update_is_logged_and_the_client_keeps_its_last_good_config(
    server, connect, backends, stock_clients, caplog
) -> None:
    stubs = connect(server)
    faulty = GappedBuilder(server.view, server.states)
    server.xds.builder = faulty
    g1, g2, g3 = await backends.start("g1", "g2", "g3")
    await register(stubs, "gap", g1.address, instance_id="g1")
    client = await stock_clients.start(server.address, "gap", node_id="nack-client")
    await client.until(lambda c: c.answers()[-5:] == ["g1"] * 5, timeout=15)

    faulty.broken = True
    caplog.set_level(logging.WARNING, logger="discovery.xds")
    await register(stubs, "gap", g2.address, instance_id="g2")

    def nacked(records: list) -> bool:
        return any("NACKed EDS" in r.getMessage() and "nack-client" in r.getMessage() for r in records)

    await client.until(lambda c: nacked(caplog.records), timeout=5.0)
    mark = client.mark()
    await client.until(lambda c: len(c.answers(mark)) >= 30, timeout=5.0)
    assert set(client.answers(mark)) == {"g1"} and not client.errors(mark)

    (config,) = await csds(stubs.channel, "nack-client")
    eds = next(x for x in config.generic_xds_configs if x.type_url == ENDPOINTS)
    assert eds.client_status == ClientResourceStatus.NACKED and eds.config_status == ConfigStatus.ERROR
    assert "priority" in eds.error_state.details
    good, bad = ClusterLoadAssignment(), ClusterLoadAssignment()
    eds.xds_config.Unpack(good)  # what the client still uses
    eds.error_state.failed_configuration.Unpack(bad)
    assert len(good.endpoints[0].lb_endpoints) == 1 and len(bad.endpoints[0].lb_endpoints) == 2

    # The next good update is accepted.
    faulty.broken = False
    await register(stubs, "gap", g3.address, instance_id="g3")
    mark = client.mark()
    await client.until(lambda c: set(c.answers(mark)[-30:]) == {"g1", "g2", "g3"}, timeout=2.0)
    (config,) = await csds(stubs.channel, "nack-client")
    statuses = {x.type_url.rsplit(".", 1)[1]: (x.client_status, x.config_status) for x in config.generic_xds_configs}
    synced = (ClientResourceStatus.ACKED, ConfigStatus.SYNCED)
    assert statuses == {"Listener": synced, "Cluster": synced, "ClusterLoadAssignment": synced}


async def test_clients_keep_serving_while_the_server_restarts_and_reconnect(
    etcd, servers, connect, backends, stock_clients
) -> None:
    port = free_port()
    server = await servers.start(etcd, listen=f"127.0.0.1:{port}")
    other = await servers.start(etcd)  # same region: writes go on while the first is down
    r1, r2 = await backends.start("r1", "r2")
    await register(connect(other), "rs", r1.address, instance_id="r1")
    client = await stock_clients.start(server.address, "rs")
    await client.until(lambda c: c.answers()[-5:] == ["r1"] * 5, timeout=15)

    await servers.stop(server)
    mark = client.mark()
    await client.until(lambda c: len(c.answers(mark)) >= 50, timeout=5.0)
    assert not client.errors(mark)

    await register(connect(other), "rs", r2.address, instance_id="r2")
    await servers.start(etcd, listen=f"127.0.0.1:{port}")
    mark = client.mark()
    # gRPC retries its ADS stream with backoff (about 1 s at first).
    await client.until(lambda c: "r2" in c.answers(mark), timeout=10.0)
    assert not client.errors(mark)


async def test_a_hundred_streams_each_get_every_change(etcd, servers, connect, backends) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    channels = [grpc.aio.insecure_channel(server.address) for _ in range(10)]
    clients = [AdsClient(channels[i % 10], node_id=f"many-{i}") for i in range(100)]
    try:
        await register(stubs, "fan", "127.0.0.1:20000", instance_id="f0")
        for c in clients:
            c.subscribe_service("fan")
        await asyncio.gather(*(c.until(lambda c: len(c.endpoints("fan")) == 1, timeout=10) for c in clients))
        assert all(not c.error for c in clients)
        for step in range(1, 6):
            started = time.monotonic()
            await register(stubs, "fan", f"127.0.0.1:{20000 + step}", instance_id=f"f{step}")
            await asyncio.gather(
                *(c.until(lambda c, n=step + 1: len(c.endpoints("fan")) == n, timeout=5) for c in clients)
            )
            assert time.monotonic() - started < 2.0
        # Every change reached every stream as its own assignment (one per step, plus the first).
        sizes = [[len(r.resources) for r in c.responses if r.type_url == ENDPOINTS] for c in clients]
        assert all(s == [1] * 6 for s in sizes), sizes[:3]
    finally:
        for c in clients:
            await c.close()
        for channel in channels:
            await channel.close()


async def test_a_stream_that_sends_garbage_leaves_no_trace_in_the_hub(server, connect) -> None:
    # A malformed request ends the stream with an error; the stream's state must still leave
    # the hub (it used to stay forever, marked dirty on every change, listed by CSDS).
    channel = connect(server).channel
    call = channel.stream_stream(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )(timeout=CALL_TIMEOUT)
    from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

    await call.write(DiscoveryRequest(type_url=ENDPOINTS, resource_names=["junk"]).SerializeToString())
    await call.write(b"\xff\xff\xff\xff")
    # The decode error ends the call as bad input, also while a response to the first request
    # is being written (an abort from the reading task used to meet that write: no status).
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(CALL_TIMEOUT):
            while await call.read() is not grpc.aio.EOF:
                pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def cleaned_up() -> bool:  # the handler's cleanup runs as it ends, after the status
        return not server.xds.streams and not server.xds._watchers

    await eventually(cleaned_up, timeout=CALL_TIMEOUT)
