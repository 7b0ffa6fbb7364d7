"""Resolve throughput and latency, side by side with the gRPC ceiling and etcd itself.

One run starts its own etcd (in a temporary directory), loads N instances in M services
straight into etcd under the server's key schema, starts the discovery server and an
empty grpc.aio server in processes of their own, and then, from this process, keeps
``--concurrency`` calls in flight against each of three targets in turn (rotated every
repeat, so slow drift on a shared machine hits all of them alike):

* ``resolve``: Lookup/Resolve of a random service on the discovery server;
* ``empty``:   the same method on a server whose handler returns an empty response
               (the ceiling for grpc.aio on this machine);
* ``etcd``:    the same lookup done directly against etcd: a get-prefix of the service's
               keys, values decoded into Instance messages.

etcd's Range calls are counted from its /metrics around every phase: the ones during the
Resolve phases, less the ones during the equally long empty-handler phases (the server's
own health probe, which runs whatever the load), are the reads caused by Resolve (target:
zero). Prints one JSON object; every process started is stopped, also on Ctrl-C or error.

Examples:
    python bench/resolve_bench.py                        # 3 repeats x 8 s per target
    python bench/resolve_bench.py --repeats 1 --duration 3 --instances 2000 --services 200
    python bench/resolve_bench.py --profile /tmp/resolve.txt   # py-spy the server (raw stacks)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from etcd3aio._protobuf import KVStub, PutRequest, RangeRequest, RequestOp, TxnRequest
from etcd3aio.kv import prefix_range_end
from google.protobuf.internal import api_implementation

from discovery.devtools.benchmain import print_figures
from discovery.devtools.etcd import EtcdProcess
from discovery.devtools.process import ServerProcess, free_port
from discovery.keys import DEFAULT_PREFIX, KeySchema
from discovery_pb.v1 import admin_pb2, admin_pb2_grpc, lookup_pb2, lookup_pb2_grpc
from discovery_pb.v1.types_pb2 import Instance, Status

RUNNER = Path(__file__).with_name("_servers.py")
TARGETS = ("resolve", "empty", "etcd")
SERVING_PROCESS = {"resolve": "server", "empty": "empty_server", "etcd": "etcd"}
TARGET_RATIO = 0.70
CALL_TIMEOUT = 10.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_RANGE_STARTED = re.compile(r'^grpc_server_started_total\{[^}]*grpc_method="Range"[^}]*\} (\S+)$', re.M)
_MVCC_RANGE = re.compile(r"^etcd_mvcc_range_total (\S+)$", re.M)


# --- processes ----------------------------------------------------------------------------


def start_child(
    name: str, args: Sequence[str], log_dir: Path, stack: contextlib.ExitStack, timeout: float
) -> ServerProcess:
    """A server process from ``_servers.py`` on a free port, serving; stopped when ``stack`` closes."""
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, str(RUNNER), args[0], "--listen", address, *args[1:]]
    child = ServerProcess(command, address, log_dir / f"{name}.log", name=f"{name} server")
    stack.callback(child.stop, 10.0)
    return child.start(timeout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc (10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Pids:
    server: int
    empty: int
    etcd: int

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: ours by process, and the machine's busy and stolen time."""
        ours = {
            "client": time.process_time(),
            "server": cpu_seconds(self.server),
            "empty_server": cpu_seconds(self.empty),
            "etcd": cpu_seconds(self.etcd),
        }
        # /proc/stat "cpu": user nice system idle iowait irq softirq steal ...
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4] - ticks[7]) / _CLK_TCK
        return ours | {"others": busy - sum(ours.values()), "steal": ticks[7] / _CLK_TCK}


# --- etcd ---------------------------------------------------------------------------------


def etcd_counters(endpoint: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5).read().decode()
    mvcc = _MVCC_RANGE.search(text)
    return {
        "range_calls": sum(float(v) for v in _RANGE_STARTED.findall(text)),
        "mvcc_ranges": float(mvcc.group(1)) if mvcc else float("nan"),
    }


def service_names(count: int) -> list[str]:
    return [f"svc-{i:04d}.bench" for i in range(count)]


def make_instance(i: int, service: str, region: str, now_ms: int) -> Instance:
    """A realistic record: a few tags and metadata entries, like a real registration."""
    return Instance(
        service=service,
        instance_id=f"i-{i:05d}",
        region=region,
        zone=f"{region}-{'abc'[i % 3]}",
        address=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:8080",
        metadata={"team": "bench", "build": f"b{i % 97}", "owner": "resolve-bench"},
        tags=["http", "v2", f"shard-{i % 8}"],
        weight=100,
        status=Status.SERVING,
        version="2.4.1",
        registered_at_ms=now_ms,
    )


async def load_instances(endpoint: str, keys: KeySchema, region: str, services: list[str], instances: int) -> float:
    """Put the records straight into etcd, one transaction per service; returns seconds."""
    start = time.perf_counter()
    now_ms = int(time.time() * 1000)
    per_service: dict[str, list[Instance]] = {s: [] for s in services}
    for i in range(instances):
        service = services[i % len(services)]
        per_service[service].append(make_instance(i, service, region, now_ms))
    gate = asyncio.Semaphore(64)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = KVStub(channel)

        async def put_service(records: list[Instance]) -> None:
            for chunk in range(0, len(records), 100):  # etcd allows 128 operations per txn
                ops = [
                    RequestOp(
                        request_put=PutRequest(
                            key=keys.instance(r.region, r.service, r.instance_id), value=r.SerializeToString()
                        )
                    )
                    for r in records[chunk : chunk + 100]
                ]
                async with gate:
                    await stub.Txn(TxnRequest(success=ops), timeout=30)

        await asyncio.gather(*(put_service(r) for r in per_service.values()))
    return time.perf_counter() - start


# --- load ---------------------------------------------------------------------------------


@dataclass
class Phase:
    target: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_sample: str = ""
    cpu: dict[str, float] = field(default_factory=dict)
    range_calls: float = 0.0
    mvcc_ranges: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def server_us_per_call(self) -> float:
        """CPU the serving process spent per call: steadier than the rate on a shared machine."""
        cores = self.cpu.get(SERVING_PROCESS[self.target], 0.0)
        return cores / self.rate * 1e6 if self.rate else float("nan")


@dataclass(frozen=True)
class Setting:
    """What every phase needs: the parameters, who to watch, how many keys to pick from."""

    args: argparse.Namespace
    pids: Pids
    etcd: str
    keys: int


async def run_phase(target: str, call: Callable[[int], Awaitable[object]], setting: Setting) -> Phase:
    """``concurrency`` workers call in a loop; only calls completing in the window count."""
    args, pids, etcd = setting.args, setting.pids, setting.etcd
    phase = Phase(target)
    before = await asyncio.to_thread(etcd_counters, etcd)
    measuring = stopping = False

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while not stopping:
            t0 = time.perf_counter()
            try:
                await call(rng.randrange(setting.keys))
            except grpc.aio.AioRpcError as exc:
                if measuring:
                    phase.errors += 1
                    phase.error_sample = phase.error_sample or f"{exc.code().name}: {exc.details()}"
            else:
                if measuring:
                    phase.latencies.append(time.perf_counter() - t0)

    base = args.seed * 1_000_003 + TARGETS.index(target) * 1000
    workers = [asyncio.create_task(worker(base + i)) for i in range(args.concurrency)]
    try:
        await asyncio.sleep(args.warmup)
        cpu0, t0 = pids.cpu(), time.perf_counter()
        measuring = True
        await asyncio.sleep(args.duration)
        measuring = False
        cpu1, phase.seconds = pids.cpu(), time.perf_counter() - t0
    finally:
        stopping = True
        await asyncio.gather(*workers, return_exceptions=True)
    after = await asyncio.to_thread(etcd_counters, etcd)
    phase.cpu = {k: round((cpu1[k] - cpu0[k]) / phase.seconds, 3) for k in cpu0}
    phase.range_calls = after["range_calls"] - before["range_calls"]
    phase.mvcc_ranges = after["mvcc_ranges"] - before["mvcc_ranges"]
    return phase


def callers(
    channels: dict[str, grpc.aio.Channel], keys: KeySchema, region: str, services: list[str], serializable: bool
) -> dict[str, Callable[[int], Awaitable[object]]]:
    """One ``call(i)`` per target, each looking up services[i]; requests are built up front."""
    resolve_requests = [lookup_pb2.ResolveRequest(service=s) for s in services]
    range_requests = []
    for s in services:
        prefix = keys.instance(region, s, "")
        range_requests.append(RangeRequest(key=prefix, range_end=prefix_range_end(prefix), serializable=serializable))
    resolve = lookup_pb2_grpc.LookupStub(channels["resolve"]).Resolve
    empty = lookup_pb2_grpc.LookupStub(channels["empty"]).Resolve
    etcd_range = KVStub(channels["etcd"]).Range

    async def call_resolve(i: int) -> object:
        return await resolve(resolve_requests[i], timeout=CALL_TIMEOUT)

    async def call_empty(i: int) -> object:
        return await empty(resolve_requests[i], timeout=CALL_TIMEOUT)

    async def call_etcd(i: int) -> object:
        resp = await etcd_range(range_requests[i], timeout=CALL_TIMEOUT)
        return [Instance.FromString(kv.value) for kv in resp.kvs]

    return {"resolve": call_resolve, "empty": call_empty, "etcd": call_etcd}


async def check_server(channel: grpc.aio.Channel, services: list[str], instances: int) -> None:
    """Fail early when the server does not hold what was loaded."""
    status = await admin_pb2_grpc.AdminStub(channel).Status(admin_pb2.StatusRequest(), timeout=10)
    if status.instance_count != instances:
        raise RuntimeError(f"server holds {status.instance_count} instances, loaded {instances}")
    resp = await lookup_pb2_grpc.LookupStub(channel).Resolve(lookup_pb2.ResolveRequest(service=services[0]), timeout=10)
    expected = len(range(0, instances, len(services)))
    if len(resp.endpoints) != expected:
        raise RuntimeError(f"Resolve({services[0]}) gave {len(resp.endpoints)} endpoints, expected {expected}")


async def measure(
    endpoints: dict[str, str], keys: KeySchema, services: list[str], args: argparse.Namespace, pids: Pids
) -> list[Phase]:
    channels = {name: grpc.aio.insecure_channel(address) for name, address in endpoints.items()}
    try:
        await check_server(channels["resolve"], services, args.instances)
        calls = callers(channels, keys, args.region, services, args.etcd_serializable)
        setting = Setting(args, pids, endpoints["etcd"], len(services))
        phases: list[Phase] = []
        for repeat in range(args.repeats):
            order = args.targets[repeat % len(args.targets) :] + args.targets[: repeat % len(args.targets)]
            for target in order:
                phase = await run_phase(target, calls[target], setting)
                phases.append(phase)
                log(f"repeat {repeat + 1}/{args.repeats} {target:8s} {phase.rate:8.0f} calls/s  errors {phase.errors}")
        return phases
    finally:
        for channel in channels.values():
            await channel.close()


# --- report -------------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarize(phases: list[Phase]) -> dict[str, Any]:
    latencies = sorted(x for p in phases for x in p.latencies)
    cpu_keys = phases[0].cpu.keys()
    return {
        "rate": round(median([p.rate for p in phases]), 1),
        "rates": [round(p.rate, 1) for p in phases],
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "calls": len(latencies),
        "errors": sum(p.errors for p in phases),
        "error_sample": next((p.error_sample for p in phases if p.error_sample), None),
        "server_cpu_us_per_call": round(median([p.server_us_per_call for p in phases]), 1),
        "cpu_cores_used": {k: round(median([p.cpu[k] for p in phases]), 2) for k in cpu_keys},
        "others_cores_per_repeat": [round(p.cpu["others"], 2) for p in phases],
    }


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def report(
    phases: list[Phase], args: argparse.Namespace, machine: dict[str, Any], setup: dict[str, Any]
) -> dict[str, Any]:
    by_target = {t: [p for p in phases if p.target == t] for t in args.targets}
    out: dict[str, Any] = {"benchmark": "resolve"}
    out.update({t: summarize(ps) for t, ps in by_target.items() if ps})
    if "resolve" in out and "empty" in out:
        out["ratio_resolve_to_empty"] = ratio(out["resolve"]["rate"], out["empty"]["rate"])
        out["ratio_resolve_to_empty_per_repeat"] = [
            ratio(r.rate, e.rate) for r, e in zip(by_target["resolve"], by_target["empty"], strict=True)
        ]
        # What the ratio would be if the serving process's CPU were the only limit: less
        # sensitive to other load on the machine than the rates themselves.
        out["ratio_by_server_cpu_per_call"] = ratio(
            out["empty"]["server_cpu_us_per_call"], out["resolve"]["server_cpu_us_per_call"]
        )
        out["ratio_target"] = TARGET_RATIO
        out["meets_ratio_target"] = (out["ratio_resolve_to_empty"] or 0) >= TARGET_RATIO
    if "resolve" in out and "etcd" in out:
        out["ratio_resolve_to_etcd"] = ratio(out["resolve"]["rate"], out["etcd"]["rate"])
    if by_target.get("resolve"):
        during = sum(p.range_calls for p in by_target["resolve"])
        background = sum(p.range_calls for p in by_target.get("empty", []))
        out["etcd_range_reads"] = {
            "during_resolve": int(during),
            "during_empty_same_length": int(background),
            "caused_by_resolve": max(0, int(during - background)),
            "resolve_calls_in_window": sum(len(p.latencies) for p in by_target["resolve"]),
            "mvcc_ranges_during_resolve": int(sum(p.mvcc_ranges for p in by_target["resolve"])),
            "target": 0,
            "how": "etcd /metrics grpc_server_started_total{grpc_method=Range} before and after each phase "
            "(warm-up included); the server's 2 s health probe also reads, hence the empty-phase baseline",
        }
    out["machine"] = machine
    out["parameters"] = {
        k: getattr(args, k)
        for k in ("instances", "services", "concurrency", "duration", "warmup", "repeats", "targets", "region", "seed")
    } | {"etcd_serializable": args.etcd_serializable, "key_prefix": DEFAULT_PREFIX}
    out["setup"] = setup
    out["code"] = code_version()
    return out


def machine_info(etcd: str) -> dict[str, Any]:
    try:
        etcd_version = json.loads(urllib.request.urlopen(f"http://{etcd}/version", timeout=5).read())["etcdserver"]
    except (OSError, ValueError, KeyError):
        etcd_version = "unknown"
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": f"{version('protobuf')} ({api_implementation.Type()})",
        "etcd": etcd_version,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def code_version() -> dict[str, Any]:
    """Which server code was measured: other people edit the tree while benchmarks run."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "discovery"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown"}
    return {"commit": commit, "discovery_uncommitted": sorted(line[3:] for line in dirty if line.strip())}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- main ---------------------------------------------------------------------------------


@contextlib.contextmanager
def py_spy(pid: int, output: str | None) -> Iterator[None]:
    """Sample ``pid`` with py-spy while the body runs (idle time is left out by py-spy)."""
    if not output:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(output).suffix, "raw")
    proc = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--output", output, "--format", fmt, "--rate", "200", "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        time.sleep(1.0)  # let it attach
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run(args: argparse.Namespace) -> dict[str, Any]:
    keys = KeySchema(DEFAULT_PREFIX)
    services = service_names(args.services)
    wall = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="resolve-bench-")))
        etcd = EtcdProcess(tmp / "etcd")
        stack.callback(etcd.stop)
        etcd.start()
        machine = machine_info(etcd.endpoint)
        log(f"etcd {etcd.endpoint}; loading {args.instances} instances in {args.services} services")
        load_seconds = asyncio.run(load_instances(etcd.endpoint, keys, args.region, services, args.instances))
        t0 = time.perf_counter()
        server = start_child(
            "discovery", ["discovery", "--etcd", etcd.endpoint, "--region", args.region], tmp, stack, 90
        )
        server_start = time.perf_counter() - t0
        empty = start_child("empty", ["empty"], tmp, stack, 30)
        log(f"discovery server :{server.port} (pid {server.pid}), empty server :{empty.port}")
        endpoints = {
            "resolve": f"127.0.0.1:{server.port}",
            "empty": f"127.0.0.1:{empty.port}",
            "etcd": etcd.endpoint,
        }
        pids = Pids(server.pid, empty.pid, etcd.pid)
        with py_spy(server.pid, args.profile):
            phases = asyncio.run(measure(endpoints, keys, services, args, pids))
        setup = {"load_seconds": round(load_seconds, 2), "server_start_seconds": round(server_start, 2)}
        out = report(phases, args, machine, setup)
    out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["wall_seconds"] = round(time.perf_counter() - wall, 1)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="resolve_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=10_000, help="instances loaded (default 10000)")
    parser.add_argument("--services", type=int, default=1_000, help="services they are spread over (default 1000)")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (default 64)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase (default 8)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each phase (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the targets (default 3)")
    parser.add_argument(
        "--targets",
        type=lambda s: [t for t in s.split(",") if t],
        default=list(TARGETS),
        help="comma-separated subset of resolve,empty,etcd (default all)",
    )
    parser.add_argument("--region", default="bench", help="the server's region, set on every instance")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random service choice")
    parser.add_argument(
        "--etcd-serializable", action="store_true", help="serializable instead of linearizable etcd reads"
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy the discovery server (pip install py-spy): .svg flamegraph, .json speedscope, else raw",
    )
    parser.add_argument("--output", metavar="FILE", help="also write the JSON here")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"--targets: choose from {','.join(TARGETS)}")
    if "resolve" not in args.targets and args.profile:
        parser.error("--profile needs the resolve target")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return print_figures(lambda: run(args), args.output)


if __name__ == "__main__":
    sys.exit(main())
