"""The dev cluster's control endpoint, driven as `discovery drill` drives it: from outside,
through ControlClient, against real etcd, server and proxy processes.

One cluster start for most of it: a start costs one to three seconds. It serves mTLS, as
`discovery dev` does: clients present the admin's certificate, probes use the health ports.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery.devtools.cluster import DevCluster
from discovery.devtools.control import ControlClient, ControlError, ControlServer
from discovery_pb.v1 import lookup_pb2, lookup_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.support.helpers import CALL_TIMEOUT, instance

REGIONS = ("us-east", "eu-west")


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[DevCluster]:
    c = DevCluster(
        regions=REGIONS, state_dir=tmp_path / "state", fault_proxy=True, control=True, start_timeout=30, mtls=True
    )
    async with asyncio.timeout(60):
        await asyncio.to_thread(c.start, lambda line: None)
    yield c
    await asyncio.to_thread(c.stop)


async def call(client: ControlClient, op: str, **args: Any) -> Any:
    return await asyncio.to_thread(client.call, op, **args)


def admin_channel(cluster: DevCluster, address: str) -> grpc.aio.Channel:
    assert cluster.tls is not None
    return grpc.aio.secure_channel(address, cluster.tls.credentials())


async def register(cluster: DevCluster, address: str, instance_id: str) -> None:
    async with admin_channel(cluster, address) as channel:
        request = registry_pb2.RegisterRequest(instance=instance("web", "10.0.0.9:80", instance_id=instance_id))
        await registry_pb2_grpc.RegistryStub(channel).Register(request, timeout=CALL_TIMEOUT)


async def visible(cluster: DevCluster, address: str, instance_id: str) -> bool:
    """Whether a server lists ``instance_id`` of us-east's "web" (replicated to it)."""
    async with admin_channel(cluster, address) as channel:
        response = await lookup_pb2_grpc.LookupStub(channel).Resolve(
            lookup_pb2.ResolveRequest(service="web", scope=lookup_pb2.ALL), timeout=CALL_TIMEOUT
        )
    return ("us-east", instance_id) in [(e.instance.region, e.instance.instance_id) for e in response.endpoints]


async def visible_within(cluster: DevCluster, address: str, instance_id: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await visible(cluster, address, instance_id):
            return True
        await asyncio.sleep(0.05)  # polling a server that pushes nothing to this probe
    return False


async def test_control_describe_pause_partition_heal_restart_and_errors(cluster: DevCluster) -> None:
    described = json.loads(cluster.state_file.read_text())
    assert described["control"] == cluster.control_address and described["routes"] == {
        "us-east": {"eu-west": [described["routes"]["us-east"]["eu-west"][0]]},
        "eu-west": {"us-east": [described["routes"]["eu-west"]["us-east"][0]]},
    }
    client = ControlClient(described["control"], timeout=30)
    assert await call(client, "describe") == described

    east, west = (cluster.region(r).servers[0].address for r in REGIONS)
    west_health = cluster.region("eu-west").servers[0].health_address
    assert west_health is not None and described["regions"]["eu-west"]["servers"][0]["health"] == west_health

    # A paused region: every process stopped, the server silent; resumed, it answers again.
    pids = cluster.region("eu-west").pids()
    await call(client, "pause_region", region="eu-west")
    assert {proc_state(pid) for pid in pids} == {"T"}
    async with grpc.aio.insecure_channel(west_health) as channel:  # plaintext health: no certificate needed
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await call(client, "resume_region", region="eu-west")
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    # Replication works, then a partition stops it, then healing lets it through.
    await register(cluster, east, "before")
    assert await visible_within(cluster, west, "before", timeout=10)
    faults = await call(client, "set_link_fault", region="us-east", peer="eu-west", fault={"blackhole": True})
    assert {(f["from"], f["to"], f["blackhole"]) for f in faults} == {
        ("us-east", "eu-west", True),
        ("eu-west", "us-east", True),
    }
    await register(cluster, east, "during")
    assert not await visible_within(cluster, west, "during", timeout=1.5)
    assert await call(client, "heal_links") == []
    assert await visible_within(cluster, west, "during", timeout=10)

    # Bad requests: the message says what is wrong.
    bad_requests: list[tuple[str, dict[str, Any], str]] = [
        ("no_such_op", {}, "unknown op 'no_such_op'"),
        ("pause_region", {"region": "mars"}, "no region 'mars'"),
        ("pause_region", {}, "needs 'region'"),
        ("kill_server", {"region": "us-east", "index": 3}, "no server 3 in us-east"),
        ("set_link_fault", {"region": "us-east", "fault": {"loss": 2}}, "loss"),
        ("set_link_fault", {"region": "us-east", "peer": "us-east", "fault": None}, "the region itself"),
    ]
    for op, args, message in bad_requests:
        with pytest.raises(ControlError, match=message):
            await call(client, op, **args)

    # A killed server restarts with a new pid, which cluster.json names, and the same flags (mTLS).
    server = cluster.region("eu-west").servers[0]
    old_pid, old_argv = server.pid, cmdline(server.pid)
    await call(client, "kill_server", region="eu-west", index=0)
    result = await call(client, "restart_server", region="eu-west", index=0)
    assert result["pid"] != old_pid and cmdline(result["pid"]) == old_argv
    assert await visible_within(cluster, west, "during", timeout=10)
    assert json.loads(cluster.state_file.read_text())["regions"]["eu-west"]["servers"][0]["pid"] == result["pid"]
    assert (await call(client, "etcd_leader", region="us-east")) == {"index": 0}


async def test_control_without_proxy_refuses_link_faults_and_a_stopped_one_is_unreachable(tmp_path: Path) -> None:
    cluster = DevCluster(regions=("us-east",), state_dir=tmp_path / "state", control=True)
    async with asyncio.timeout(60):
        await asyncio.to_thread(cluster.start, lambda line: None)
    try:
        described = json.loads(cluster.state_file.read_text())
        assert "routes" not in described and cluster.proxy is None
        client = ControlClient(described["control"], timeout=10)
        with pytest.raises(ControlError, match="without the fault proxy"):
            await call(client, "set_link_fault", region="us-east", fault={"blackhole": True})
        with pytest.raises(ControlError, match="without the fault proxy"):
            await call(client, "heal_links")
    finally:
        await asyncio.to_thread(cluster.stop)
    with pytest.raises(ControlError, match="nothing listens"):
        await call(client, "describe")


def test_a_stopped_control_server_refuses_what_had_not_begun() -> None:
    """No fault may land while the cluster stops: stop() waits for the operation in progress
    and every later one is refused."""
    control = ControlServer(DevCluster(), None)
    control.stop()
    answer = control.handle(b'{"op": "pause_region", "region": "us-east"}')
    assert answer == {"ok": False, "error": "the cluster is stopping"}
