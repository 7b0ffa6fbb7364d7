"""Replication between regions of a local `discovery dev` cluster (processes, own etcd each).

Three measurements, printed as one JSON object:

freshness
        How fresh healthy peers look: every server's Status sampled every 0.2 s for ``--idle``
        seconds with no load, then throughout the lag run. Worst and p99 last-contact age per
        phase, and how many samples showed a peer disconnected (must be 0). Its yardstick is
        the origin's heartbeat period (``heartbeat_s``) and a third of stale-after.

lag     Registrations at ``--rate``/s for ``--seconds``, spread over every region. For each,
        the time from the Register acknowledgement (the commit in its origin) to the record
        appearing in every other region's view (a Watch on that region's server: the view
        Resolve answers from). Baseline in the same run: the same measurement in the origin's
        own view (commit -> local watch), which every local read pays too.
outage  One region frozen (SIGSTOP of its servers and etcd) for ``--outage`` seconds while
        another registers ``--changes`` new instances; then SIGCONT and the time until the
        returning region's view holds every one of them.

    .venv/bin/python bench/replication_bench.py                      # 200/s x 30 s; 60 s outage, 10,000 changes
    .venv/bin/python bench/replication_bench.py --seconds 5 --outage 10 --changes 1000   # quick
    .venv/bin/python bench/replication_bench.py --idle 60 --seconds 60 --outage 0 --servers-per-region 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from discovery.devtools.cluster import DevCluster
from discovery_pb.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    lookup_pb2,
    lookup_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    types_pb2,
)

REGIONS = ("us-east", "eu-west", "ap-south")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2) if ordered else float("nan")


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": _pct(values, 0.50),
        "p99_ms": _pct(values, 0.99),
        "max_ms": round(max(values) * 1000, 2) if values else None,
    }


class Seen:
    """Follows one region's view (Watch on every service) and records when each address
    first appears in it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.at: dict[str, float] = {}
        self.count = 0
        self.ready = asyncio.Event()
        self.changed = asyncio.Event()
        self._call = lookup_pb2_grpc.LookupStub(channel).Watch(lookup_pb2.WatchRequest())
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._call:
            now = time.perf_counter()
            if msg.kind == lookup_pb2.WatchResponse.SNAPSHOT:
                for inst in msg.instances:
                    self.at.setdefault(inst.address, now)
                if not msg.more:
                    self.ready.set()
            for change in msg.changes:
                if change.kind == types_pb2.Change.PUT:
                    self.at.setdefault(change.instance.address, now)
            self.changed.set()

    async def until(self, addresses: set[str], timeout: float) -> float:
        started = time.perf_counter()
        async with asyncio.timeout(timeout):
            while not addresses.issubset(self.at):
                self.changed.clear()
                await self.changed.wait()
        return time.perf_counter() - started

    async def close(self) -> None:
        self._call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._task


def _register(address: str) -> registry_pb2.RegisterRequest:
    return registry_pb2.RegisterRequest(instance=types_pb2.Instance(service="bench", address=address))


async def wait_connected(cluster: DevCluster, timeout: float = 30.0) -> float:
    """Until every region's Status says every origin is connected (the replicators have
    won their elections and reached their peers): warm-up, not part of any figure."""
    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        for r in REGIONS:
            async with grpc.aio.insecure_channel(cluster.region(r).addresses[0]) as ch:
                stub = admin_pb2_grpc.AdminStub(ch)
                while True:
                    status = await stub.Status(admin_pb2.StatusRequest(), timeout=5)
                    if len(status.origins) == len(REGIONS) - 1 and all(o.connected for o in status.origins):
                        break
                    await asyncio.sleep(0.1)
    return time.perf_counter() - started


async def measure_lag(cluster: DevCluster, rate: float, seconds: float) -> dict[str, Any]:
    channels = {r: grpc.aio.insecure_channel(cluster.region(r).addresses[0]) for r in REGIONS}
    seen = {r: Seen(ch) for r, ch in channels.items()}
    for s in seen.values():
        await s.ready.wait()
    registries = {r: registry_pb2_grpc.RegistryStub(ch) for r, ch in channels.items()}
    acked: dict[str, tuple[str, float]] = {}  # address -> (origin, ack time)
    errors = 0
    interval = 1.0 / rate
    total = int(rate * seconds)
    started = time.perf_counter()
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        nonlocal errors
        origin = REGIONS[i % len(REGIONS)]
        address = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:{1000 + REGIONS.index(origin)}"
        try:
            await registries[origin].Register(_register(address), timeout=5)
            acked[address] = (origin, time.perf_counter())
        except grpc.aio.AioRpcError:
            errors += 1

    for i in range(total):  # open loop: a slow call does not slow the offered rate
        await asyncio.sleep(max(0.0, started + i * interval - time.perf_counter()))
        task = asyncio.create_task(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending)
    achieved = total / (time.perf_counter() - started)
    for r in REGIONS:
        await seen[r].until(set(acked), timeout=30)
    remote: list[float] = []
    local: list[float] = []
    slow: list[float] = []  # seconds into the run of each registration seen >100 ms late somewhere
    for address, (origin, ack) in acked.items():
        for r in REGIONS:
            lag = max(0.0, seen[r].at[address] - ack)
            (local if r == origin else remote).append(lag)
            if lag > 0.1:
                slow.append(ack - started)
    for s in seen.values():
        await s.close()
    for ch in channels.values():
        await ch.close()
    return {
        "offered_per_s": rate,
        "achieved_per_s": round(achieved, 1),
        "registrations": len(acked),
        "errors": errors,
        "remote_visible": _summary(remote),
        "baseline_local_visible": _summary(local),
        "remote_over_100ms": len(slow),
        "remote_over_100ms_at_s": sorted({round(t) for t in slow}),  # clustered: a stall, not a trend
    }


class Freshness:
    """Status samples of every server of every region, per phase."""

    def __init__(self, cluster: DevCluster) -> None:
        self._addresses = [a for r in REGIONS for a in cluster.region(r).addresses]
        self.ages: dict[str, list[float]] = {}
        self.disconnected: dict[str, int] = {}
        self.heartbeat = 0.0

    async def sample(self, phase: str, seconds: float) -> None:
        ages = self.ages.setdefault(phase, [])
        self.disconnected.setdefault(phase, 0)
        channels = [grpc.aio.insecure_channel(a) for a in self._addresses]
        stubs = [admin_pb2_grpc.AdminStub(ch) for ch in channels]
        until = time.perf_counter() + seconds
        try:
            while time.perf_counter() < until:
                for stub in stubs:
                    status = await stub.Status(admin_pb2.StatusRequest(), timeout=5)
                    for o in status.origins:
                        ages.append(o.last_contact_seconds)
                        self.disconnected[phase] += not o.connected
                        self.heartbeat = getattr(o, "heartbeat_seconds", 0.0) or self.heartbeat
                await asyncio.sleep(0.2)
        finally:
            for ch in channels:
                await ch.close()

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"servers": len(self._addresses), "heartbeat_s": self.heartbeat}
        for phase, ages in self.ages.items():
            ordered = sorted(ages)
            out[phase] = {
                "samples": len(ordered),
                "p99_age_s": round(ordered[int(0.99 * (len(ordered) - 1))], 3) if ordered else None,
                "worst_age_s": round(ordered[-1], 3) if ordered else None,
                "disconnected_samples": self.disconnected[phase],
            }
        return out


async def measure_outage(cluster: DevCluster, outage: float, changes: int) -> dict[str, Any]:
    origin, frozen = REGIONS[0], REGIONS[2]
    async with (
        grpc.aio.insecure_channel(cluster.region(origin).addresses[0]) as a,
        grpc.aio.insecure_channel(cluster.region(frozen).addresses[0]) as c,
    ):
        registry = registry_pb2_grpc.RegistryStub(a)
        await asyncio.to_thread(cluster.pause_region, frozen)
        paused = time.perf_counter()
        written: set[str] = set()
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            address = f"10.200.{i // 256}.{i % 256}:80"
            async with sem:
                await registry.Register(_register(address), timeout=10)
            written.add(address)

        await asyncio.gather(*(one(i) for i in range(changes)))
        write_seconds = time.perf_counter() - paused
        await asyncio.sleep(max(0.0, outage - (time.perf_counter() - paused)))
        await asyncio.to_thread(cluster.resume_region, frozen)
        resumed = time.perf_counter()
        seen = Seen(c)
        await seen.until(written, timeout=120)
        converge = time.perf_counter() - resumed
        await seen.close()
    return {
        "outage_s": round(time.perf_counter() - paused - converge, 1),
        "changes": changes,
        "write_s": round(write_seconds, 2),
        "converge_after_resume_s": round(converge, 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="registrations per second, all regions (200)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the lag run (30)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle freshness samples first (10)")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the region is frozen (60; 0: skip)")
    parser.add_argument("--servers-per-region", type=int, default=1, help="servers in each region (1)")
    parser.add_argument("--changes", type=int, default=10_000, help="instances registered during the outage")
    parser.add_argument("--state-dir", help="keep the cluster's logs here (default: a temp dir, removed)")
    parser.add_argument(
        "--fault-proxy", action="store_true", help="regions talk through the drills' fault proxy, as in `discovery dev`"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="repl-bench-") as tmp:
        cluster = DevCluster(
            regions=REGIONS,
            state_dir=Path(args.state_dir or tmp) / "dev",
            keep=bool(args.state_dir),
            fault_proxy=args.fault_proxy,
            servers_per_region=args.servers_per_region,
        )
        await asyncio.to_thread(cluster.start, lambda line: print(line, file=sys.stderr))
        try:
            result: dict[str, Any] = {"regions": list(REGIONS)}
            result["warmup_s"] = round(await wait_connected(cluster), 2)
            freshness = Freshness(cluster)
            await freshness.sample("idle", args.idle)
            result["lag"], _ = await asyncio.gather(
                measure_lag(cluster, args.rate, args.seconds), freshness.sample("loaded", args.seconds)
            )
            result["freshness"] = freshness.report()
            if args.outage > 0:
                result["outage"] = await measure_outage(cluster, args.outage, args.changes)
        finally:
            await asyncio.to_thread(cluster.stop)
    print(json.dumps(result, indent=2))
    lag = result["lag"]["remote_visible"]
    print(f"remote visibility p50 {lag['p50_ms']} ms, p99 {lag['p99_ms']} ms", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
