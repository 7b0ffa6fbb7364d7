"""DNS from a `discovery dev` cluster (DevCluster with ``dns``): every region its own etcd
and server processes, so a region can be frozen (SIGSTOP) the way a hung data centre is."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import dns.exception
import grpc.aio
import pytest

from discovery.devtools.cluster import DevCluster
from discovery_pb.v1 import registry_pb2
from tests.support import dnsq
from tests.support.helpers import CALL_TIMEOUT, eventually, instance
from tests.support.servers import Stubs

pytestmark = pytest.mark.slow


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[DevCluster]:
    dev = DevCluster(
        regions=("a", "b", "c"), state_dir=tmp_path / "dev", dns=True, server_args=("--stale-after", "1.5")
    )
    await asyncio.to_thread(dev.start, lambda line: None)
    try:
        yield dev
    finally:
        await asyncio.to_thread(dev.stop)


def dns_port(cluster: DevCluster, region: str) -> int:
    described = json.loads(cluster.state_file.read_text())
    return int(described["regions"][region]["servers"][0]["dns"].rpartition(":")[2])


async def test_a_frozen_region_is_still_answered_from_the_others_with_stale_replicas(cluster: DevCluster) -> None:
    channel = grpc.aio.insecure_channel(cluster.region("c").addresses[0])
    stubs = Stubs(channel)
    # Static records (no lease), so the freeze cannot expire them: this test is about serving.
    for i in (1, 2):
        request = registry_pb2.RegisterRequest(instance=instance("web", f"10.0.3.{i}:80", instance_id=f"c{i}"))
        await stubs.registry.Register(request, timeout=CALL_TIMEOUT)
    await channel.close()
    expected = {"10.0.3.1", "10.0.3.2"}

    async def answered(region: str, name: str) -> bool:
        return dnsq.addresses(await dnsq.udp(dns_port(cluster, region), name)) == expected

    for region in ("a", "b"):
        await eventually(lambda r=region: answered(r, "web.service.discovery."), timeout=15)  # type: ignore[misc]

    await asyncio.to_thread(cluster.pause_region, "c")
    try:
        frozen_at = time.monotonic()
        # Past stale-after, a and b still answer from c's replicas, at once, both names.
        while time.monotonic() - frozen_at < 3.0:
            await asyncio.sleep(0.5)
            for region in ("a", "b"):
                started = time.monotonic()
                assert await answered(region, "web.service.discovery.")
                assert await answered(region, "web.service.c.discovery.")
                assert time.monotonic() - started < 1.0  # no waiting on the frozen region
        srv = dnsq.srv(await dnsq.udp(dns_port(cluster, "a"), "web.service.discovery.", "SRV"))
        assert [s[0] for s in srv] == [2, 2]  # c is a's second peer
        text = await dnsq.dig(dns_port(cluster, "b"), "+short", "web.service.discovery.")
        assert set(text.split()) == expected
        with pytest.raises(dns.exception.Timeout):
            await dnsq.udp(dns_port(cluster, "c"), "web.service.discovery.")  # c itself is frozen
    finally:
        await asyncio.to_thread(cluster.resume_region, "c")
    await eventually(lambda: answered("c", "web.service.discovery."), timeout=15)
