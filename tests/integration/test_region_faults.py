"""Whole-region faults against a `discovery dev` cluster: every region its own etcd and
server processes, so a region can be frozen (SIGSTOP) the way a hung data centre is."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from discovery.devtools.cluster import DevCluster
from discovery_pb.v1 import admin_pb2, lookup_pb2, registry_pb2, types_pb2
from tests.support.helpers import CALL_TIMEOUT, eventually, instance, watch
from tests.support.servers import Stubs

pytestmark = pytest.mark.slow

TTL = 2  # seconds: the outage below is longer, the trap a frozen region springs on its leases
GRACE = 5.0  # --resume-grace: a re-registration after lease loss comes well within it


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[DevCluster]:
    dev = DevCluster(
        regions=("a", "b", "c"),
        state_dir=tmp_path / "dev",
        server_args=("--stale-after", "1.5", "--resume-grace", str(GRACE)),
    )
    await asyncio.to_thread(dev.start, lambda line: None)
    try:
        yield dev
    finally:
        await asyncio.to_thread(dev.stop)


@pytest.fixture
async def stubs(cluster: DevCluster) -> AsyncIterator[dict[str, Stubs]]:
    channels = {r: grpc.aio.insecure_channel(cluster.region(r).addresses[0]) for r in ("a", "b", "c")}
    yield {r: Stubs(ch) for r, ch in channels.items()}
    for ch in channels.values():
        await ch.close()


class Keeper:
    """An instance that keeps its lease alive and registers again when it loses it, the
    way the client library's ``register`` does."""

    def __init__(self, stubs: Stubs, service: str, address: str) -> None:
        self.stubs, self.service, self.address = stubs, service, address
        self.registrations = 0
        self._task = asyncio.create_task(self._run())

    async def _register(self) -> int:
        request = registry_pb2.RegisterRequest(instance=instance(self.service, self.address, ttl_seconds=TTL))
        resp = await self.stubs.registry.Register(request, timeout=1.0)
        self.registrations += 1
        return int(resp.lease_id)

    async def _run(self) -> None:
        lease = 0
        while True:
            try:
                if not lease:
                    lease = await self._register()
                await self.stubs.registry.Heartbeat(
                    iter([registry_pb2.HeartbeatRequest(lease_id=lease)]), timeout=1.0
                ).read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    lease = 0  # the lease is gone: register again at once
                    continue
            await asyncio.sleep(TTL / 4)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Load:
    """Registrations, resolves, status calls and new watches against one region, each timed
    and checked."""

    def __init__(self, stubs: Stubs, region: str) -> None:
        self.stubs, self.region = stubs, region
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.registered: list[str] = []
        self.phase = "before"
        self.by_phase: dict[str, list[float]] = {}
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        n = 0
        while True:
            n += 1
            # Coroutines made one at a time: made up front, those left when close() cancels
            # the loop would never be awaited.
            for call in (functools.partial(self._register, n), self._resolve, self._status, self._watch):
                start = time.perf_counter()
                try:
                    await call()
                except grpc.aio.AioRpcError as exc:
                    self.errors.append(f"{self.phase}: {exc.code().name} {exc.details()}")
                self.by_phase.setdefault(self.phase, []).append(time.perf_counter() - start)
            await asyncio.sleep(0.02)

    async def _register(self, n: int) -> None:
        address = f"10.{ord(self.region[0])}.{n // 250}.{n % 250}:80"
        await self.stubs.registry.Register(
            registry_pb2.RegisterRequest(instance=instance("load", address)), timeout=CALL_TIMEOUT
        )
        self.registered.append(address)

    async def _resolve(self) -> None:
        await self.stubs.lookup.Resolve(lookup_pb2.ResolveRequest(service="load"), timeout=CALL_TIMEOUT)

    async def _status(self) -> None:
        await self.stubs.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)

    async def _watch(self) -> None:
        """Open a Watch and read its snapshot: a new watcher must not wait on anyone either."""
        call = self.stubs.lookup.Watch(lookup_pb2.WatchRequest(service="load"), timeout=CALL_TIMEOUT)
        try:
            while (await call.read()).more:
                pass
        finally:
            call.cancel()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def addresses(stubs: Stubs, service: str) -> dict[str, lookup_pb2.ResolveResponse]:
    got = await stubs.lookup.Resolve(
        lookup_pb2.ResolveRequest(service=service, scope=lookup_pb2.ALL), timeout=CALL_TIMEOUT
    )
    return {e.instance.address: e for e in got.endpoints}


async def test_a_hung_region_blocks_no_one_and_converges_without_loss_or_flap(cluster, stubs) -> None:
    a, b, c = stubs["a"], stubs["b"], stubs["c"]
    keepers = [Keeper(c, "csvc", f"10.3.0.{i}:80") for i in range(5)]
    doomed = await a.registry.Register(
        registry_pb2.RegisterRequest(instance=instance("asvc", "10.1.0.99:80")), timeout=CALL_TIMEOUT
    )
    c_addresses = {f"10.3.0.{i}:80" for i in range(5)}

    async def c_seen_in_a_and_b() -> bool:
        return all([set(await addresses(s, "csvc")) == c_addresses for s in (a, b)])

    await eventually(c_seen_in_a_and_b, timeout=5.0)
    # Every change A and B see of C's instances, from here on: a flap would show as a DELETE.
    watchers = {r: watch(stubs[r].lookup, "csvc", timeout=120) for r in ("a", "b", "c")}
    loads = [Load(a, "a"), Load(b, "b")]
    await asyncio.sleep(1.0)  # a baseline of the load; not synchronisation

    for load in loads:
        load.phase = "during"
    await asyncio.to_thread(cluster.pause_region, "c")
    paused_at = time.monotonic()
    try:
        # During: A and B go on; A -> B replication goes on; C is served stale.
        during = await a.registry.Register(
            registry_pb2.RegisterRequest(instance=instance("asvc", "10.1.0.1:80")), timeout=CALL_TIMEOUT
        )
        await a.registry.Deregister(
            registry_pb2.DeregisterRequest(service="asvc", instance_id=doomed.instance_id), timeout=CALL_TIMEOUT
        )

        async def a_to_b() -> bool:
            return set(await addresses(b, "asvc")) == {"10.1.0.1:80"}

        await eventually(a_to_b, timeout=2.0)

        async def c_stale_in_a() -> bool:
            got = await addresses(a, "csvc")
            return set(got) == c_addresses and all(e.stale and e.age_seconds > 0 for e in got.values())

        await eventually(c_stale_in_a, timeout=5.0)
        # Hold the freeze past the lease TTL (the trap), then wake the region.
        await asyncio.sleep(max(0.0, TTL + 2.0 - (time.monotonic() - paused_at)))
    finally:
        await asyncio.to_thread(cluster.resume_region, "c")
    for load in loads:
        load.phase = "after"

    async def converged() -> bool:
        in_c = await addresses(c, "asvc")
        if set(in_c) != {"10.1.0.1:80"}:  # the write reached C; the deletion too, none resurrected
            return False
        for s in (a, b):
            got = await addresses(s, "csvc")
            if set(got) != c_addresses or any(e.stale for e in got.values()):
                return False
        loaded = await addresses(c, "load")
        return all(addr in loaded for load in loads for addr in load.registered)

    await eventually(converged, timeout=GRACE + 10.0)
    assert during.revision > 0
    for load in loads:
        await load.close()
    for keeper in keepers:
        await keeper.close()

    # Nothing failed in the healthy regions, and nothing there waited on the hung one (a
    # wait would show as a call of seconds: deadlines, keep-alive timeouts).
    for load in loads:
        assert not load.errors, load.errors
        slowest = max(load.by_phase["during"])
        assert slowest < 1.0, f"region {load.region}: slowest call during the outage took {slowest:.3f}s"
        before, during_calls = load.by_phase["before"], load.by_phase["during"]
        print(
            f"region {load.region}: p50 before {statistics.median(before) * 1000:.2f} ms, "
            f"during {statistics.median(during_calls) * 1000:.2f} ms over {len(during_calls)} calls"
        )
    # C's leases expired on waking (its own view saw the deletions and re-registrations), yet
    # A and B never saw C's instances go: the held deletions were superseded.
    c_deletes = [ch for ch in watchers["c"].changes if ch.kind == types_pb2.Change.DELETE]
    assert c_deletes, "the trap did not spring: no lease of C expired, so this test proved nothing"
    for region in ("a", "b"):
        deletes = [ch for ch in watchers[region].changes if ch.kind == types_pb2.Change.DELETE]
        assert not deletes, f"{region} saw C's instances flap: {deletes}"
    for w in watchers.values():
        await w.close()
    # Time spent frozen is no failure to reach the peers: C's replicators did not resign (their
    # election lease may expire on waking, like every lease of C; they win again at once).
    log = cluster.region("c").servers[0].log_path.read_text()
    assert "no word from" not in log, log[-2000:]
    # C said it had been frozen, so A held C's deletions (C's leases did expire on waking);
    # A was never impaired, so C applied A's deletion at once.
    assert "replicator c: the origin came back" in cluster.region("a").servers[0].log_path.read_text()
    assert "replicator a: the origin came back" not in log, log[-2000:]


async def test_killing_the_replicator_leader_hands_over_without_loss_or_duplicates(tmp_path: Path) -> None:
    dev = DevCluster(
        regions=("a", "b"), servers_per_region=2, state_dir=tmp_path / "dev", server_args=("--stale-after", "1.5")
    )
    await asyncio.to_thread(dev.start, lambda line: None)
    channels: list[grpc.aio.Channel] = []
    try:
        a = Stubs(grpc.aio.insecure_channel(dev.region("a").addresses[0]))
        channels.append(a.channel)
        b_servers = dev.region("b").servers

        async def leader_of_a_in_b(asked: int = 0) -> str:
            stubs = Stubs(grpc.aio.insecure_channel(b_servers[asked].address))
            channels.append(stubs.channel)
            status = await stubs.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)
            origin = next((o for o in status.origins if o.origin == "a"), None)
            return origin.leader if origin is not None and origin.connected else ""

        leader = await eventually(leader_of_a_in_b, timeout=10.0)
        victim = next(s for s in b_servers if s.address == leader)
        survivor = next(s for s in b_servers if s is not victim)
        b = Stubs(grpc.aio.insecure_channel(survivor.address))
        channels.append(b.channel)
        watcher = watch(b.lookup, "burst", timeout=120)
        await watcher.until(lambda w: w.snapshots == 1, timeout=5)

        written: list[str] = []

        async def burst(n: int) -> None:
            for i in range(n):
                address = f"10.7.{i // 250}.{i % 250}:80"
                await a.registry.Register(
                    registry_pb2.RegisterRequest(instance=instance("burst", address)), timeout=CALL_TIMEOUT
                )
                written.append(address)
                await asyncio.sleep(0.01)

        writes = asyncio.create_task(burst(150))
        await eventually(lambda: _truthy(len(written) > 30), timeout=10.0)
        await asyncio.to_thread(dev.kill_server, "b", victim.index)  # SIGKILL: no lease revoked
        await writes

        await watcher.until(lambda w: {i.address for i in w.state.values()} == set(written), timeout=15)
        assert await leader_of_a_in_b(survivor.index) == survivor.address
        puts: dict[str, int] = {}
        for change in watcher.changes:
            if change.kind == types_pb2.Change.PUT:
                puts[change.instance.address] = puts.get(change.instance.address, 0) + 1
        twice = {address: n for address, n in puts.items() if n > 1}
        assert not twice, f"applied more than once in b: {twice}"
        await watcher.close()
    finally:
        for ch in channels:
            await ch.close()
        await asyncio.to_thread(dev.stop)


async def _truthy(value: bool) -> bool:
    return value
