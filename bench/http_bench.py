"""What the HTTP door costs: Resolve over HTTP vs gRPC on the same server; Resolve with 100 SSE
streams open vs none; Register and Resolve with the Prometheus reader on vs off. Same run.

One run starts its own etcd (in a temporary directory) and two discovery servers over it, each
in a process of its own (``_servers.py discovery``) and under a key prefix of its own:

* ``http``:  ``http_listen`` set: the HTTP door, and the server's instruments bound to a meter
             provider with the OpenTelemetry Prometheus reader (what ``/metrics`` reads);
* ``plain``: no HTTP: the instruments bind to OpenTelemetry's no-op provider, as before.

Both hold ``--instances`` instances of the resolved service. Then, from this process, keeps
``--concurrency`` calls in flight in phases of ``--duration`` seconds (after ``--warmup``), the
order rotated every repeat so drift on a shared machine hits every phase alike:

* ``grpc_resolve@http``      Lookup/Resolve over gRPC on the HTTP server (Prometheus reader on);
* ``http_resolve@http``      GET /v1/services/NAME on the same server (aiohttp client, keep-alive);
* ``grpc_resolve_sse_idle@http``  as the first, with ``--streams`` (100) /v1/events streams open
                             on it, idle (a keep-alive event every 2 s each);
* ``grpc_resolve_sse@http``  the same streams, each receiving a change per ``--sse-change-interval``
                             seconds (0.1: 1,000 events/s written in all);
* ``grpc_resolve@plain``     Resolve on the server without the reader;
* ``register@http`` / ``register@plain``  Registry/Register re-registering a pool of ids.

Prints one JSON object: per phase calls/s (median of repeats), p50/p99 ms, server CPU per call;
what one Resolve's instruments cost with the reader and without (a loop in this process);
and the ratios http/grpc Resolve, Resolve with streams / without (target >= 0.9), and Register
and Resolve with the reader / without. Progress goes to stderr. Every process started is
stopped, also on Ctrl-C or error.

Examples:
    python bench/http_bench.py                               # 3 repeats x 3 s x 7 phases, ~2 min
    python bench/http_bench.py --repeats 1 --duration 2      # quick look
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio

from discovery.devtools.etcd import EtcdProcess
from discovery.devtools.process import ServerProcess, free_port
from discovery_pb.v1 import lookup_pb2, lookup_pb2_grpc, registry_pb2, registry_pb2_grpc, types_pb2

RUNNER = Path(__file__).with_name("_servers.py")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVICE = "bench-web"
Call = Callable[[int], Awaitable[object]]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_sample: str = ""
    seconds: float = 0.0
    server_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


@dataclass
class Servers:
    grpc: dict[str, grpc.aio.Channel]
    pids: dict[str, int]
    http_base: str


def start_server(
    stack: contextlib.ExitStack, etcd: str, name: str, log_dir: Path, settings: dict[str, Any]
) -> ServerProcess:
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, str(RUNNER), "discovery", "--listen", address, "--etcd", etcd, "--region", "bench"]
    command += ["--prefix", f"/bench-{name}/v1/", "--settings", json.dumps(settings)]
    child = ServerProcess(command, address, log_dir / f"{name}.log", name=f"{name} server")
    stack.callback(child.stop, 10.0)
    return child.start(90)


async def run_phase(name: str, server: str, call: Call, args: argparse.Namespace, pids: dict[str, int]) -> Phase:
    phase = Phase(name)
    measuring = stopping = False

    async def worker(n: int) -> None:
        i = n
        while not stopping:
            i += args.concurrency
            t0 = time.perf_counter()
            try:
                await call(i)
            except (grpc.aio.AioRpcError, aiohttp.ClientError, AssertionError) as exc:
                if measuring:
                    phase.errors += 1
                    phase.error_sample = phase.error_sample or repr(exc)[:200]
            else:
                if measuring:
                    phase.latencies.append(time.perf_counter() - t0)

    workers = [asyncio.create_task(worker(n)) for n in range(args.concurrency)]
    try:
        await asyncio.sleep(args.warmup)
        cpu0, t0 = cpu_seconds(pids[server]), time.perf_counter()
        measuring = True
        await asyncio.sleep(args.duration)
        measuring = False
        phase.seconds = time.perf_counter() - t0
        phase.server_cpu = cpu_seconds(pids[server]) - cpu0
    finally:
        stopping = True
        await asyncio.gather(*workers, return_exceptions=True)
    return phase


class Streams:
    """``count`` open /v1/events streams, read by a child process (so reading them costs the
    load generator nothing), which prints ``open`` once every stream is established and its
    event count when stopped."""

    def __init__(self, base: str, count: int) -> None:
        self._url = f"{base}/v1/events?service={SERVICE}-watched"
        self._count = count
        self._proc: asyncio.subprocess.Process | None = None
        self.events = 0

    async def __aenter__(self) -> Streams:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--read-streams", self._url, "--streams", str(self._count),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self._proc.stdout is not None
        async with asyncio.timeout(60):
            line = await self._proc.stdout.readline()
        assert line.strip() == b"open", line
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        self._proc.terminate()
        out = await self._proc.stdout.read()
        await self._proc.wait()
        with contextlib.suppress(ValueError):
            self.events = int(out.strip() or 0)


async def read_streams(url: str, count: int) -> None:
    """The child: open ``count`` streams, say ``open``, count events until SIGTERM."""
    import signal

    events = 0
    opened = 0
    all_open = asyncio.Event()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal events, opened
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=None)) as response:
            assert response.status == 200, response.status
            opened += 1
            if opened == count:
                all_open.set()
            async for line in response.content:
                if line.startswith(b"event:"):
                    events += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=count + 1)) as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(count)]
        async with asyncio.timeout(30):
            await all_open.wait()
        print("open", flush=True)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(events, flush=True)


async def trickle(stubs: registry_pb2_grpc.RegistryStub, interval: float, stop: asyncio.Event) -> int:
    n = 0
    while not stop.is_set():
        instance = types_pb2.Instance(service=f"{SERVICE}-watched", instance_id="w1", address=f"10.9.0.{n % 250}:80")
        await stubs.Register(registry_pb2.RegisterRequest(instance=instance), timeout=5)
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    return n


async def prepare(channels: dict[str, grpc.aio.Channel], instances: int) -> None:
    for channel in channels.values():
        registry = registry_pb2_grpc.RegistryStub(channel)
        revision = 0
        for i in range(instances):
            instance = types_pb2.Instance(
                service=SERVICE,
                instance_id=f"i{i}",
                address=f"10.0.{i // 250}.{i % 250}:8080",
                zone="z1",
                tags=["a", "b"],
                metadata={"version": "1.2.3"},
            )
            revision = (await registry.Register(registry_pb2.RegisterRequest(instance=instance), timeout=10)).revision
        lookup = lookup_pb2_grpc.LookupStub(channel)
        await lookup.Resolve(lookup_pb2.ResolveRequest(service=SERVICE, min_revision=revision), timeout=10)


async def measure(servers: Servers, args: argparse.Namespace) -> list[Phase]:
    lookups = {name: lookup_pb2_grpc.LookupStub(ch) for name, ch in servers.grpc.items()}
    registries = {name: registry_pb2_grpc.RegistryStub(ch) for name, ch in servers.grpc.items()}
    request = lookup_pb2.ResolveRequest(service=SERVICE)
    connector = aiohttp.TCPConnector(limit=args.concurrency + args.streams + 8)
    phases: list[Phase] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"{servers.http_base}/v1/services/{SERVICE}"

        def resolve(server: str) -> Call:
            async def call(_: int) -> object:
                return await lookups[server].Resolve(request, timeout=5)

            return call

        def register(server: str) -> Call:
            async def call(i: int) -> object:
                instance = types_pb2.Instance(
                    service=f"{SERVICE}-writes", instance_id=f"p{i % args.pool}", address="10.1.0.1:80"
                )
                return await registries[server].Register(registry_pb2.RegisterRequest(instance=instance), timeout=5)

            return call

        async def http_resolve(_: int) -> object:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                body = await response.read()
                assert response.status == 200, response.status
                return body

        async def with_streams(name: str, changing: bool) -> Phase:
            stop = asyncio.Event()
            if not changing:
                stop.set()
            async with Streams(servers.http_base, args.streams) as streams:
                writer = asyncio.create_task(trickle(registries["http"], args.sse_change_interval, stop))
                try:
                    phase = await run_phase(name, "http", resolve("http"), args, servers.pids)
                finally:
                    stop.set()
                    await writer
            print(f"  ({streams.events} events received by {args.streams} streams)", file=sys.stderr)
            return phase

        plan: list[tuple[str, Callable[[], Awaitable[Phase]]]] = [
            ("grpc_resolve@http", lambda: run_phase("grpc_resolve@http", "http", resolve("http"), args, servers.pids)),
            ("http_resolve@http", lambda: run_phase("http_resolve@http", "http", http_resolve, args, servers.pids)),
            ("grpc_resolve_sse_idle@http", lambda: with_streams("grpc_resolve_sse_idle@http", changing=False)),
            ("grpc_resolve_sse@http", lambda: with_streams("grpc_resolve_sse@http", changing=True)),
            (
                "grpc_resolve@plain",
                lambda: run_phase("grpc_resolve@plain", "plain", resolve("plain"), args, servers.pids),
            ),
            ("register@http", lambda: run_phase("register@http", "http", register("http"), args, servers.pids)),
            ("register@plain", lambda: run_phase("register@plain", "plain", register("plain"), args, servers.pids)),
        ]
        for repeat in range(args.repeats):
            order = plan[repeat % len(plan) :] + plan[: repeat % len(plan)]
            for name, run in order:
                phase = await run()
                phases.append(phase)
                print(
                    f"repeat {repeat + 1}/{args.repeats} {name}: {phase.rate:,.0f}/s, {phase.errors} errors",
                    file=sys.stderr,
                )
    return phases


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(phases: list[Phase]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in dict.fromkeys(p.name for p in phases):
        mine = [p for p in phases if p.name == name]
        latencies = sorted(x for p in mine for x in p.latencies)
        calls = sum(len(p.latencies) for p in mine)
        out[name] = {
            "calls_per_second": round(statistics.median(p.rate for p in mine)),
            "p50_ms": round(percentile(latencies, 0.5) * 1000, 3),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
            "server_cpu_us_per_call": round(sum(p.server_cpu for p in mine) / calls * 1e6, 1) if calls else None,
            "errors": sum(p.errors for p in mine),
            "error_sample": next((p.error_sample for p in mine if p.error_sample), ""),
        }
    return out


def ratio(summary: dict[str, Any], a: str, b: str, key: str = "calls_per_second") -> float | None:
    if a not in summary or b not in summary or not summary[b][key]:
        return None
    return round(summary[a][key] / summary[b][key], 3)


def instrument_cost(calls: int = 50_000) -> dict[str, float]:
    """One Resolve's instruments (a counter and a histogram, ``Instruments.timed``) in this
    process, microseconds per call: on OpenTelemetry's no-op meter and on a meter with the
    Prometheus reader. A figure the machine's load barely moves, unlike the phases' rates."""
    from discovery import telemetry
    from discovery.http.metrics import PrometheusExport

    def per_call(instruments: telemetry.Instruments) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            with instruments.timed(instruments.lookups, instruments.resolve_duration):
                pass
        return (time.perf_counter() - start) / calls * 1e6

    export = PrometheusExport("bench")
    try:
        off, on = telemetry.Instruments(), telemetry.Instruments(export.meter)
        return {
            "reader_off_us": round(min(per_call(off) for _ in range(3)), 2),
            "reader_on_us": round(min(per_call(on) for _ in range(3)), 2),
        }
    finally:
        export.shutdown()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="http-bench-") as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        etcd = EtcdProcess(directory / "etcd").start()
        stack.callback(etcd.stop)
        http_port = free_port()
        http = start_server(
            stack, etcd.endpoint, "http", directory, {"insecure": True, "http_listen": f"127.0.0.1:{http_port}"}
        )
        plain = start_server(stack, etcd.endpoint, "plain", directory, {"insecure": True})
        channels = {
            "http": grpc.aio.insecure_channel(http.address),
            "plain": grpc.aio.insecure_channel(plain.address),
        }
        try:
            print(f"registering {args.instances} instances on each server", file=sys.stderr)
            await prepare(channels, args.instances)
            servers = Servers(channels, {"http": http.pid, "plain": plain.pid}, f"http://127.0.0.1:{http_port}")
            phases = await measure(servers, args)
        finally:
            for channel in channels.values():
                await channel.close()
    summary = summarize(phases)
    return {
        "instruments_per_resolve": instrument_cost(),
        "benchmark": "http_bench",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "phases": summary,
        "ratios": {
            "http_over_grpc_resolve": ratio(summary, "http_resolve@http", "grpc_resolve@http"),
            "resolve_with_idle_streams_over_without": ratio(summary, "grpc_resolve_sse_idle@http", "grpc_resolve@http"),
            "resolve_p99_with_idle_streams_over_without": ratio(
                summary, "grpc_resolve_sse_idle@http", "grpc_resolve@http", "p99_ms"
            ),
            "resolve_with_streams_over_without": ratio(summary, "grpc_resolve_sse@http", "grpc_resolve@http"),
            "resolve_p99_with_streams_over_without": ratio(
                summary, "grpc_resolve_sse@http", "grpc_resolve@http", "p99_ms"
            ),
            "resolve_reader_on_over_off": ratio(summary, "grpc_resolve@http", "grpc_resolve@plain"),
            "register_reader_on_over_off": ratio(summary, "register@http", "register@plain"),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=10, help="instances of the resolved service (default 10)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight (default 32)")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per phase (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each phase")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every phase (default 3)")
    parser.add_argument("--streams", type=int, default=100, help="open /v1/events streams (default 100)")
    parser.add_argument("--sse-change-interval", type=float, default=0.1, help="seconds between changes they see")
    parser.add_argument("--pool", type=int, default=200, help="instance ids Register cycles through")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument("--read-streams", metavar="URL", help=argparse.SUPPRESS)  # the stream reader child
    args = parser.parse_args()
    if args.read_streams:
        asyncio.run(read_streams(args.read_streams, args.streams))
        return 0
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
