"""DNS queries per second and p99 on one server (UDP, many in flight) against Resolve over
gRPC on the same server, in the same run (docs/dns.md, "Performance").

One run starts its own etcd (in a temporary directory) and one discovery server in a
process of its own (``discovery serve --dns``, rate limit off: one source sends everything),
registers ``--services`` services of ``--endpoints`` instances each, then from this process
keeps ``--concurrency`` requests in flight against each target in turn, rotating the order
every repeat so drift on a shared machine hits both alike:

* ``dns``:  an A query for a random service over UDP (prebuilt packets; a query unanswered
            within 1 s counts as lost and is replaced);
* ``grpc``: Lookup/Resolve of a random service, scope FAILOVER (what the DNS name means).

Prints one JSON object; every process started is stopped, also on Ctrl-C or error.

Examples:
    python bench/dns_bench.py                          # 3 repeats x 5 s per target
    python bench/dns_bench.py --repeats 1 --duration 2 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import grpc.aio

from discovery.devtools.etcd import EtcdProcess
from discovery.devtools.process import ServerProcess, free_ports
from discovery_pb.v1 import lookup_pb2, lookup_pb2_grpc, registry_pb2, registry_pb2_grpc
from discovery_pb.v1.types_pb2 import Instance

TARGETS = ("dns", "grpc")
LOST_AFTER = 1.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    lost: int = 0
    errors: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0  # CPU seconds the server process used


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class _DnsLoad(asyncio.DatagramProtocol):
    """Keeps ``concurrency`` queries in flight over one UDP socket until ``deadline``."""

    def __init__(self, packets: list[bytes], concurrency: int, deadline: float, phase: Phase) -> None:
        self.packets, self.concurrency, self.deadline, self.phase = packets, concurrency, deadline, phase
        self.pending: dict[int, float] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.done = asyncio.get_running_loop().create_future()
        self._ids = iter(range(1, 1 << 62))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        for _ in range(self.concurrency):
            self.send()

    def send(self) -> None:
        if time.monotonic() >= self.deadline:
            if not self.pending and not self.done.done():
                self.done.set_result(None)
            return
        qid = next(self._ids) & 0xFFFF
        while qid in self.pending:
            qid = next(self._ids) & 0xFFFF
        packet = random.choice(self.packets)
        self.pending[qid] = time.monotonic()
        assert self.transport is not None
        self.transport.sendto(qid.to_bytes(2, "big") + packet[2:])

    def datagram_received(self, data: bytes, addr: Any) -> None:
        sent = self.pending.pop(int.from_bytes(data[:2], "big"), None)
        if sent is None:
            return  # answered after it was counted lost
        if data[3] & 0x0F:  # rcode
            self.phase.errors += 1
        else:
            self.phase.latencies.append(time.monotonic() - sent)
        self.send()

    def sweep(self) -> None:
        now = time.monotonic()
        for qid, sent in list(self.pending.items()):
            if now - sent > LOST_AFTER:
                del self.pending[qid]
                self.phase.lost += 1
                self.send()
        if time.monotonic() >= self.deadline and not self.pending and not self.done.done():
            self.done.set_result(None)


async def dns_phase(port: int, packets: list[bytes], concurrency: int, duration: float) -> Phase:
    phase = Phase()
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    transport, load = await loop.create_datagram_endpoint(
        lambda: _DnsLoad(packets, concurrency, start + duration, phase), remote_addr=("127.0.0.1", port)
    )
    try:
        while not load.done.done():
            await asyncio.sleep(0.1)
            load.sweep()
            if time.monotonic() > start + duration + 2 * LOST_AFTER:
                phase.lost += len(load.pending)
                break
    finally:
        transport.close()
    phase.seconds = time.monotonic() - start
    return phase


async def grpc_phase(stub: Any, services: list[str], concurrency: int, duration: float) -> Phase:
    phase = Phase()
    start = time.monotonic()
    deadline = start + duration

    async def worker() -> None:
        while time.monotonic() < deadline:
            request = lookup_pb2.ResolveRequest(service=random.choice(services), scope=lookup_pb2.FAILOVER)
            sent = time.monotonic()
            try:
                await stub.Resolve(request, timeout=10)
            except grpc.aio.AioRpcError:
                phase.errors += 1
                continue
            phase.latencies.append(time.monotonic() - sent)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    phase.seconds = time.monotonic() - start
    return phase


def summary(phases: list[Phase]) -> dict[str, Any]:
    latencies = [x for p in phases for x in p.latencies]
    seconds = sum(p.seconds for p in phases)
    rates = [len(p.latencies) / p.seconds for p in phases if p.seconds]
    return {
        "per_second": round(len(latencies) / seconds, 1) if seconds else 0.0,
        "per_second_by_repeat": [round(r, 1) for r in rates],
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "answered": len(latencies),
        "lost": sum(p.lost for p in phases),
        "errors": sum(p.errors for p in phases),
        "server_cpu_seconds_per_1000": round(1000 * sum(p.server_cpu for p in phases) / max(1, len(latencies)), 4),
    }


async def run(args: argparse.Namespace, server: ServerProcess, dns_port: int) -> dict[str, Any]:
    services = [f"svc-{i}.bench" for i in range(args.services)]
    async with grpc.aio.insecure_channel(server.address) as channel:
        registry = registry_pb2_grpc.RegistryStub(channel)
        for service in services:
            instances = [
                Instance(
                    service=service, address=f"10.{i // 250}.{i % 250}.{hash(service) % 250}:80", instance_id=f"i{i}"
                )
                for i in range(args.endpoints)
            ]
            await registry.RegisterBatch(registry_pb2.RegisterBatchRequest(instances=instances), timeout=10)
        lookup = lookup_pb2_grpc.LookupStub(channel)
        packets = [
            dns.message.make_query(f"{s}.service.discovery.", "A", use_edns=0, payload=1232).to_wire() for s in services
        ]
        # Warm-up: both paths once, untimed.
        await dns_phase(dns_port, packets, args.concurrency, 0.5)
        await grpc_phase(lookup, services, args.concurrency, 0.5)
        phases: dict[str, list[Phase]] = {t: [] for t in TARGETS}
        for repeat in range(args.repeats):
            order = TARGETS if repeat % 2 == 0 else TARGETS[::-1]
            for target in order:
                before = cpu_seconds(server.pid)
                if target == "dns":
                    phase = await dns_phase(dns_port, packets, args.concurrency, args.duration)
                else:
                    phase = await grpc_phase(lookup, services, args.concurrency, args.duration)
                phase.server_cpu = cpu_seconds(server.pid) - before
                phases[target].append(phase)
    results = {t: summary(p) for t, p in phases.items()}
    return {
        "benchmark": "dns_bench",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "parameters": {
            "services": args.services,
            "endpoints_per_service": args.endpoints,
            "concurrency": args.concurrency,
            "duration_seconds": args.duration,
            "repeats": args.repeats,
            "dns_rate_limit": "off",
        },
        "results": results,
        "dns_vs_grpc_throughput": round(results["dns"]["per_second"] / max(1e-9, results["grpc"]["per_second"]), 3),
        "note": "one client process and the server share this machine; compare figures within this run only",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--endpoints", type=int, default=5, help="instances per service (A records per answer)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per target per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dns-bench-") as tmp, contextlib.ExitStack() as stack:
        etcd = EtcdProcess(Path(tmp) / "etcd").start()
        stack.callback(etcd.stop)
        grpc_port, dns_port = free_ports(2)
        address = f"127.0.0.1:{grpc_port}"
        command = [
            sys.executable, "-m", "discovery", "serve", "--region", "us-east", "--insecure",
            "--listen", address, "--etcd", etcd.endpoint,
            "--dns", f"127.0.0.1:{dns_port}", "--dns-rate-limit", "0",
        ]  # fmt: skip
        server = ServerProcess(command, address, Path(tmp) / "server.log", name="discovery server")
        server.start(timeout=30)
        stack.callback(server.stop)
        report = asyncio.run(run(args, server, dns_port))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
