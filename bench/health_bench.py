"""Active health checks at scale (docs/health-checks.md): ``--checks`` TCP checks at a
``--interval`` spread over ``--servers`` servers of one region.

One run starts an etcd per region (``a``, the checked region, and ``b``, a peer), the servers
of each in processes of their own (bench/_servers.py), and a backend process of its own that
accepts and closes TCP connections on ``--ports`` ports (the checks' targets share them) and
on one port per backend that will die. Then, from this process:

* ``cpu_baseline``: each server's CPU share over ``--window`` seconds with the instances
  registered but no checks (what the same servers cost without checks, same run);
* ``cpu_checking``: the same window once every instance has a check and has been decided
  (passing): each server's CPU share, and the increase over its baseline;
* ``jitter``: how late each probe started against its fixed-rate schedule, as each server
  reports it (Admin Status: the last 10,000 probes), and the probes run in the window;
* ``death_to_not_serving``: ``--deaths`` backends killed at random moments over one interval
  (their listener closed: connections refused), each timed from its death to the moment a
  Watch on region b's server shows its instance NOT_SERVING (p50/p99/max). The floor is
  (failures - 1) x interval: the first failed probe comes within one interval, and the check
  needs ``failures`` of them.

Prints one JSON object. Examples:
    python bench/health_bench.py                         # 10,000 checks at 10 s, 3 servers, ~3 minutes
    python bench/health_bench.py --checks 2000 --interval 2 --window 10 --deaths 10   # quick
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc.aio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "clients" / "python"))

from discovery.devtools.etcd import EtcdProcess  # noqa: E402
from discovery.devtools.process import ServerProcess, free_port  # noqa: E402
from discovery_pb.v1 import (  # noqa: E402  # noqa: E402
    admin_pb2,
    admin_pb2_grpc,
    lookup_pb2,
    lookup_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    types_pb2,
)

RUNNER = Path(__file__).with_name("_servers.py")
PREFIX = "/discovery/v1/"
CALL_TIMEOUT = 30.0
TICKS = os.sysconf("SC_CLK_TCK")
SERVICES = 100


# --- the backend process ---------------------------------------------------------------


async def _backends(ports: int, doomed: int) -> None:
    """Accept and close on ``ports`` shared ports and ``doomed`` ports of their own; print the
    ports as one JSON line; then on stdin ``kill N`` closes doomed port N and prints its time."""

    async def serve(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    servers: dict[int, asyncio.Server] = {}
    for _ in range(ports + doomed):
        server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)
        servers[server.sockets[0].getsockname()[1]] = server
    all_ports = list(servers)
    print(json.dumps({"shared": all_ports[:ports], "doomed": all_ports[ports:], "pid": os.getpid()}), flush=True)
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        port = int(line.split()[1])
        servers[port].close()
        print(json.dumps({"killed": port, "at": time.time()}), flush=True)


@contextlib.contextmanager
def backend_process(ports: int, doomed: int) -> Iterator[tuple[Any, dict[str, Any]]]:
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, __file__, "--backend-process", str(ports), str(doomed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc, json.loads(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)


# --- measuring ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def cpu_shares(pids: list[int], window: float) -> list[float]:
    before = [cpu_seconds(p) for p in pids]
    t0 = time.monotonic()
    await asyncio.sleep(window)
    elapsed = time.monotonic() - t0
    return [round((cpu_seconds(p) - b) / elapsed, 4) for p, b in zip(pids, before, strict=True)]


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def q(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 3)

    return {"p50": q(0.5), "p99": q(0.99), "max": round(ordered[-1], 3), "count": len(ordered)}


def instances(addresses: list[str], spec: types_pb2.HealthCheck | None, prefix: str) -> list[types_pb2.Instance]:
    out = []
    for i, address in enumerate(addresses):
        inst = types_pb2.Instance(service=f"svc-{i % SERVICES}", instance_id=f"{prefix}{i}", address=address)
        if spec is not None:
            inst.check.CopyFrom(spec)
        out.append(inst)
    return out


async def register(channel: grpc.aio.Channel, records: list[types_pb2.Instance]) -> None:
    stub = registry_pb2_grpc.RegistryStub(channel)
    for start in range(0, len(records), 1000):
        await stub.RegisterBatch(
            registry_pb2.RegisterBatchRequest(instances=records[start : start + 1000]), timeout=CALL_TIMEOUT
        )


async def statuses(channels: list[grpc.aio.Channel]) -> list[admin_pb2.HealthCheckerStatus]:
    out = []
    for channel in channels:
        resp = await admin_pb2_grpc.AdminStub(channel).Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)
        out.append(resp.health_checks)
    return out


async def until_decided(channels: list[grpc.aio.Channel], checks: int, deadline: float) -> float:
    """Seconds until every check has had at least one probe on some server (all passing)."""
    t0 = time.monotonic()
    lookup = lookup_pb2_grpc.LookupStub(channels[0])
    while time.monotonic() - t0 < deadline:
        decided = 0
        for s in range(SERVICES):
            resp = await lookup.Resolve(lookup_pb2.ResolveRequest(service=f"svc-{s}"), timeout=CALL_TIMEOUT)
            decided += sum(e.instance.check_result.state == types_pb2.CheckResult.PASSING for e in resp.endpoints)
        if decided >= checks:
            return time.monotonic() - t0
        await asyncio.sleep(1.0)
    raise TimeoutError(f"only {decided} of {checks} checks passing after {deadline}s")


async def deaths(
    proc: Any, doomed: list[int], b_channel: grpc.aio.Channel, interval: float, spec: types_pb2.HealthCheck
) -> list[float]:
    """Kill each doomed backend at a random moment within one interval; time to NOT_SERVING in b."""
    stub = lookup_pb2_grpc.LookupStub(b_channel)
    seen: dict[str, float] = {}
    ready = asyncio.Event()

    async def follow() -> None:
        call = stub.Watch(lookup_pb2.WatchRequest(service="doomed"), timeout=600)
        async for message in call:
            ready.set()
            for change in message.changes:
                if change.instance.status == types_pb2.NOT_SERVING and change.instance_id not in seen:
                    seen[change.instance_id] = time.time()

    watcher = asyncio.create_task(follow())
    await asyncio.wait_for(ready.wait(), CALL_TIMEOUT)
    killed: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    schedule = sorted((random.uniform(0, interval), i, port) for i, port in enumerate(doomed))
    t0 = time.monotonic()
    for offset, i, port in schedule:
        await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
        proc.stdin.write(f"kill {port}\n")
        proc.stdin.flush()
        answer = json.loads(await loop.run_in_executor(None, proc.stdout.readline))
        killed[f"d{i}"] = answer["at"]
    limit = time.monotonic() + interval * (spec.failures_before_critical or 3) + interval * 3 + 30
    while len(seen) < len(killed) and time.monotonic() < limit:  # noqa: ASYNC110  # a poll with a deadline
        await asyncio.sleep(0.2)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await watcher
    return [seen[k] - killed[k] for k in killed if k in seen]


async def measure(args: argparse.Namespace, etcd_a: str, etcd_b: str, tmp: Path) -> dict[str, Any]:
    ports_a = [free_port() for _ in range(args.servers)]
    port_b = free_port()
    peer_a = "a=" + ",".join(f"127.0.0.1:{p}" for p in ports_a)
    settings = {"health_min_interval_seconds": 0.1, "stale_after_seconds": 3.0}
    procs: list[ServerProcess] = []
    try:
        for i, port in enumerate(ports_a):
            command = [
                sys.executable, str(RUNNER), "discovery", "--listen", f"127.0.0.1:{port}", "--etcd", etcd_a,
                "--region", "a", "--settings", json.dumps({**settings, "peers": [f"b=127.0.0.1:{port_b}"]}),
            ]  # fmt: skip
            procs.append(ServerProcess(command, f"127.0.0.1:{port}", tmp / f"a{i}.log", name=f"a{i}").start(60))
        command = [
            sys.executable, str(RUNNER), "discovery", "--listen", f"127.0.0.1:{port_b}", "--etcd", etcd_b,
            "--region", "b", "--settings", json.dumps({**settings, "peers": [peer_a]}),
        ]  # fmt: skip
        procs.append(ServerProcess(command, f"127.0.0.1:{port_b}", tmp / "b.log", name="b").start(60))
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in ports_a]
        b_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port_b}")
        pids = [p.pid for p in procs[: args.servers]]
        spec = types_pb2.HealthCheck(
            kind=types_pb2.HealthCheck.TCP, interval_ms=round(args.interval * 1000), timeout_ms=args.timeout_ms
        )
        with backend_process(args.ports, args.deaths) as (backend, ports):
            shared = [f"127.0.0.1:{ports['shared'][i % args.ports]}" for i in range(args.checks)]
            await register(channels[0], instances(shared, None, "i"))
            await asyncio.sleep(2.0)
            baseline = await cpu_shares(pids, args.window)
            backend_before = cpu_seconds(ports["pid"])
            t0 = time.monotonic()
            await register(channels[0], instances(shared, spec, "i"))
            decided = await until_decided(channels, args.checks, args.interval * 3 + 120)
            # One full interval more: every check on its steady fixed-rate schedule.
            await asyncio.sleep(args.interval)
            before = await statuses(channels)
            t1 = time.monotonic()
            checking = await cpu_shares(pids, args.window)
            after = await statuses(channels)
            window = time.monotonic() - t1
            backend_share = (cpu_seconds(ports["pid"]) - backend_before) / (time.monotonic() - t0)
            doomed = instances([f"127.0.0.1:{p}" for p in ports["doomed"]], spec, "d")
            for inst in doomed:
                inst.service = "doomed"
            await register(channels[0], doomed)
            await asyncio.sleep(args.interval * 2)  # decided (passing) before they die
            latencies = await deaths(backend, ports["doomed"], b_channel, args.interval, spec)
        probes = [a.probes - b.probes for a, b in zip(after, before, strict=True)]
        for channel in [*channels, b_channel]:
            await channel.close()
        return {
            "cpu_baseline": baseline,
            "cpu_checking": checking,
            "cpu_increase": [round(c - b, 4) for c, b in zip(checking, baseline, strict=True)],
            "backend_process_cpu_share": round(backend_share, 4),
            "checks_per_server": [s.checks_here for s in after],
            "all_decided_seconds": round(decided, 1),
            "probes_per_second_per_server": [round(p / window, 1) for p in probes],
            "expected_probes_per_second": round(args.checks / args.interval, 1),
            "jitter_ms_p50_per_server": [round(s.lateness_p50_ms, 2) for s in after],
            "jitter_ms_p99_per_server": [round(s.lateness_p99_ms, 2) for s in after],
            "failed_probes": sum(s.failures for s in after),
            "held": sum(s.held for s in after),
            "death_to_not_serving_in_other_region_seconds": quantiles(latencies),
            "deaths_seen": f"{len(latencies)} of {args.deaths}",
            "floor_seconds": round((spec.failures_before_critical or 3) - 1, 1) * args.interval,
        }
    finally:
        for proc in procs:
            proc.stop(15)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--backend-process":
        asyncio.run(_backends(int(sys.argv[2]), int(sys.argv[3])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds")
    parser.add_argument("--timeout-ms", type=int, default=2000)
    parser.add_argument("--servers", type=int, default=3, help="servers of the checked region")
    parser.add_argument("--ports", type=int, default=50, help="backend ports the checks share")
    parser.add_argument("--window", type=float, default=30.0, help="seconds each CPU measurement lasts")
    parser.add_argument("--deaths", type=int, default=20)
    args = parser.parse_args()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="health-bench-") as name:
        tmp = Path(name)
        etcds = [EtcdProcess(tmp / "etcd-a", name="etcd-a"), EtcdProcess(tmp / "etcd-b", name="etcd-b")]
        try:
            for member in etcds:
                member.start()
            figures = asyncio.run(measure(args, etcds[0].endpoint, etcds[1].endpoint, tmp))
        finally:
            for member in etcds:
                member.stop()
    out = {
        "benchmark": "health",
        "checks": args.checks,
        "interval_seconds": args.interval,
        "servers": args.servers,
        **figures,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "wall_seconds": round(time.perf_counter() - wall, 1),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
