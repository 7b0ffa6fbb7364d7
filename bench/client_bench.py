"""Client library costs: a cached resolve and a pick per call, against the same lookup read
directly from etcd in the same run; and how long a change takes to reach the client's cache.

One run starts its own etcd (in a temporary directory) and a discovery server in a process of
its own (bench/_servers.py), registers ``--services`` x ``--instances`` instances, and then,
from this process:

* ``resolve``:  ``await client.resolve(service)`` answered from the cache (µs per call);
* ``resolve_sync``: the same through ``SyncDiscoveryClient`` (read from the calling thread);
* ``pick``:     ``await client.pick(service)``, round robin and weighted;
* ``etcd``:     the same lookup read directly from etcd, one call at a time: a get-prefix of
                the service's keys, values decoded into Instance messages;
* ``change``:   ``--changes`` re-registrations of one instance with new metadata, each timed
                from the Register call (and from its acknowledgement) to the moment the
                client's cache holds it (p50/p99).

Prints one JSON object. Examples:
    python bench/client_bench.py
    python bench/client_bench.py --calls 50000 --changes 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from etcd3aio._protobuf import KVStub, RangeRequest
from etcd3aio.kv import prefix_range_end

from discovery.devtools.etcd import EtcdProcess
from discovery.devtools.process import ServerProcess, free_port
from discovery.keys import DEFAULT_PREFIX, KeySchema
from discovery_pb.v1 import registry_pb2, registry_pb2_grpc
from discovery_pb.v1.types_pb2 import Instance

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "clients"))  # the client package lives apart from the server's
from discovery_client import ClientConfig, DiscoveryClient, SyncDiscoveryClient, TlsConfig  # noqa: E402

RUNNER = Path(__file__).with_name("_servers.py")
REGION = "us-east"
TARGET_US = 20.0
TARGET_RATIO = 50.0
CALL_TIMEOUT = 10.0


@contextlib.contextmanager
def discovery_server(etcd: str, log_dir: Path) -> Iterator[int]:
    """A discovery server in its own process (its own GIL); yields its port."""
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, str(RUNNER), "discovery", "--listen", address, "--etcd", etcd, "--region", REGION]
    server = ServerProcess(command, address, log_dir / "server.log", name="the discovery server")
    server.start(60)
    try:
        yield server.port
    finally:
        server.stop(10.0)


async def per_call_us(call: Callable[[], Awaitable[object]], calls: int, repeats: int) -> dict[str, Any]:
    """Median over ``repeats`` of the mean cost of ``calls`` sequential calls (µs)."""
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            await call()
        means.append((time.perf_counter() - t0) / calls * 1e6)
    return {"us_per_call": round(statistics.median(means), 3), "repeats_us": [round(m, 3) for m in means]}


def per_call_us_sync(call: Callable[[], object], calls: int, repeats: int) -> dict[str, Any]:
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        means.append((time.perf_counter() - t0) / calls * 1e6)
    return {"us_per_call": round(statistics.median(means), 3), "repeats_us": [round(m, 3) for m in means]}


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def register_all(registry: Any, services: list[str], per_service: int) -> None:
    for s in services:
        for i in range(per_service):
            address = f"10.{i // 250}.{i % 250}.1:80"
            inst = Instance(service=s, instance_id=f"{s}-{i}", address=address, zone=f"z{i % 3}")
            await registry.Register(registry_pb2.RegisterRequest(instance=inst), timeout=CALL_TIMEOUT)


async def change_latency(client: DiscoveryClient, registry: Any, changes: int) -> dict[str, Any]:
    """Re-register one instance with new metadata; time until the client's cache has it."""
    service, key = "bench-changes", (REGION, "bench-changes-0")
    inst = Instance(service=service, instance_id=key[1], address="10.9.9.9:80", metadata={"seq": "0"})
    await registry.Register(registry_pb2.RegisterRequest(instance=inst), timeout=CALL_TIMEOUT)
    await client.resolve(service)
    watch = client.watch_of(service)
    assert watch is not None
    arrived = asyncio.Event()
    expect = {"seq": ""}

    def listener() -> None:
        current = watch.cache.instances.get(key)
        if current is not None and current.metadata.get("seq") == expect["seq"]:
            arrived.set()

    watch.cache.listeners.append(listener)
    from_call, from_ack = [], []
    for i in range(1, changes + 1):
        arrived.clear()
        expect["seq"] = str(i)
        inst.metadata["seq"] = str(i)
        t0 = time.perf_counter()
        await registry.Register(registry_pb2.RegisterRequest(instance=inst), timeout=CALL_TIMEOUT)
        t1 = time.perf_counter()
        async with asyncio.timeout(CALL_TIMEOUT):
            await arrived.wait()
        t2 = time.perf_counter()
        from_call.append((t2 - t0) * 1000)
        from_ack.append(max(0.0, t2 - t1) * 1000)
    from_call.sort()
    from_ack.sort()
    return {
        "changes": changes,
        "from_register_call_ms": {
            "p50": round(percentile(from_call, 0.5), 3),
            "p99": round(percentile(from_call, 0.99), 3),
            "max": round(from_call[-1], 3),
        },
        "from_register_ack_ms": {
            "p50": round(percentile(from_ack, 0.5), 3),
            "p99": round(percentile(from_ack, 0.99), 3),
            "max": round(from_ack[-1], 3),
        },
    }


async def measure(etcd: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    services = [f"svc-{i:03d}" for i in range(args.services)]
    # The bench's server is --insecure: the client says so explicitly, as clients must.
    insecure = TlsConfig(insecure=True)
    config = ClientConfig(region=REGION, servers=(f"127.0.0.1:{port}",), zone="z1", tls=insecure).validate()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    etcd_channel = grpc.aio.insecure_channel(etcd)
    try:
        registry = registry_pb2_grpc.RegistryStub(channel)
        await register_all(registry, services, args.instances)
        async with DiscoveryClient(config) as client:
            for s in services:
                assert len(await client.resolve(s)) == args.instances
            it = iter(range(1 << 62))

            async def resolve() -> object:
                return await client.resolve(services[next(it) % len(services)])

            async def pick_rr() -> object:
                return await client.pick(services[next(it) % len(services)])

            async def pick_weighted() -> object:
                return await client.pick(services[next(it) % len(services)], strategy="weighted")

            keys = KeySchema(DEFAULT_PREFIX)
            ranges = []
            for s in services:
                prefix = keys.instance(REGION, s, "")
                ranges.append(RangeRequest(key=prefix, range_end=prefix_range_end(prefix)))
            kv = KVStub(etcd_channel)

            async def etcd_read() -> object:
                resp = await kv.Range(ranges[next(it) % len(ranges)], timeout=CALL_TIMEOUT)
                instances = [Instance.FromString(x.value) for x in resp.kvs]
                assert len(instances) == args.instances
                return instances

            out: dict[str, Any] = {}
            out["resolve"] = await per_call_us(resolve, args.calls, args.repeats)
            out["pick_round_robin"] = await per_call_us(pick_rr, args.calls, args.repeats)
            out["pick_weighted"] = await per_call_us(pick_weighted, args.calls, args.repeats)
            out["etcd_direct_read"] = await per_call_us(etcd_read, args.etcd_calls, args.repeats)
            out["change_to_cache"] = await change_latency(client, registry, args.changes)
    finally:
        await channel.close()
        await etcd_channel.close()
    out["resolve_sync"] = await asyncio.to_thread(sync_resolve_cost, config, services, args)
    return out


def sync_resolve_cost(config: ClientConfig, services: list[str], args: argparse.Namespace) -> dict[str, Any]:
    with SyncDiscoveryClient(config) as client:
        for s in services:
            client.resolve(s)
        it = iter(range(1 << 62))
        resolve = per_call_us_sync(lambda: client.resolve(services[next(it) % len(services)]), args.calls, args.repeats)
        pick = per_call_us_sync(lambda: client.pick(services[next(it) % len(services)]), args.calls, args.repeats)
    return {"resolve": resolve, "pick_round_robin": pick}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--instances", type=int, default=20, help="per service")
    parser.add_argument("--calls", type=int, default=20000, help="calls per repeat (resolve, pick)")
    parser.add_argument("--etcd-calls", type=int, default=1000, help="calls per repeat (direct etcd read)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--changes", type=int, default=300)
    args = parser.parse_args()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="client-bench-") as tmp:
        member = EtcdProcess(Path(tmp) / "etcd")
        try:
            member.start()
            with discovery_server(member.endpoint, Path(tmp)) as port:
                figures = asyncio.run(measure(member.endpoint, port, args))
        finally:
            member.stop()
    resolve_us = figures["resolve"]["us_per_call"]
    pick_us = figures["pick_round_robin"]["us_per_call"]
    etcd_us = figures["etcd_direct_read"]["us_per_call"]
    out = {
        "benchmark": "client",
        **figures,
        "ratio_etcd_to_resolve": round(etcd_us / resolve_us, 1),
        "ratio_etcd_to_pick": round(etcd_us / pick_us, 1),
        "target_us": TARGET_US,
        "target_ratio": TARGET_RATIO,
        "meets_targets": resolve_us < TARGET_US
        and pick_us < TARGET_US
        and etcd_us / max(resolve_us, pick_us) >= TARGET_RATIO,
        "parameters": vars(args),
        "machine": {
            "cpus_usable": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
        "wall_seconds": round(time.perf_counter() - wall, 1),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
