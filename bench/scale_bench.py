"""Scale: Register and heartbeat cost, memory per instance, cold start, a recovery storm (issue 13).

One run starts its own etcd (in a temporary directory) and discovery servers, each in a process
of its own (``_servers.py discovery``, plaintext ``insecure``: every caller is admin, so no
policy, ownership or audit cost is in these figures; bench/security_bench.py measures that share).
Every server has a key prefix of its own, so one section's records are not in another's view.
Sections, in order (``--sections`` picks a subset):

* ``memory``:    a server over an empty prefix; N instances written straight into etcd (on
                 session leases, with their session records, under the server's key schema) until
                 each ``--memory-sizes`` step; the server's RSS growth / instances ("grown", through
                 its watch). At each step a fresh server is started over the same keys: the time
                 from process start until it answers Resolve completely ("cold start"), and its RSS
                 then ("cold"). etcd's db size (/metrics) before and after, per 100k instances.
* ``register``:  ``--concurrency`` calls in flight against each target in turn, the order rotated
                 every repeat: ``register`` (static records, a pool of ids re-registered),
                 ``register_session`` (the same on one session), ``register_2servers`` (the same
                 as ``register``, alternating over two server processes on this machine) and
                 ``etcd_put`` (the same records put straight into etcd from this process: the
                 baseline). Then ``batch`` (RegisterBatch of ``--batch`` instances on a session)
                 against ``etcd_txn`` (the same puts as etcd transactions of 100 on a lease).
* ``heartbeat``: N instances in S sessions at TTL T through RegisterBatch (the sessions stay alive
                 until the storm, one Heartbeat stream per session, a beat every T/3), then windows,
                 rotated per repeat: ``sessions`` (only those beats), ``leases`` (plus M instances
                 each on a lease of its own through a second server, ``--leases-per-stream`` leases
                 per Heartbeat stream) and ``etcd`` (plus M leases kept alive straight from this
                 process over one LeaseKeepAlive stream, as etcd's own client does). Server CPU per
                 heartbeat (/proc/<pid>/stat) and in cores, projected to the full population. Then
                 closed-loop throughput: ``heartbeat`` (Heartbeat streams, --concurrency beats in
                 flight) against ``keepalive`` (direct etcd keep-alives, same concurrency).
* ``storm``:     the server of the sessions and etcd are frozen (SIGSTOP) for TTL + ``--freeze-extra``
                 seconds, then resumed: every session is lost; each client (one per session, in
                 this process) opens a new session and re-registers its instances with RegisterBatch
                 (chunks of ``--batch``), backing off with jitter on errors (retry-after-ms when
                 given). Time from SIGCONT until every instance is back in the server's view, the
                 fewest seen meanwhile, and every error the clients saw, by code. One region only:
                 replication to other regions is bench/replication_bench.py's.
* ``profile``:   py-spy (``--profile``, pip install py-spy) samples the server for ``--profile-seconds``
                 under Register load and under Heartbeat load (unmeasured extra phases, so the
                 sampling does not bend the figures); the top frames by own time and by total time.

Prints one JSON object on stdout (progress on stderr); every process it started is stopped, also
on Ctrl-C, SIGTERM or error. This machine is shared: compare figures within one run.

Examples:
    python bench/scale_bench.py                          # quick: 10k instances in 100 sessions, ~2.5 min
    python bench/scale_bench.py --full                   # 100k in 1,000 sessions, memory/cold start at 100k, ~10 min
    python bench/scale_bench.py --sections register --repeats 3 --duration 8
    python bench/scale_bench.py --sections heartbeat,storm --instances 20000 --sessions 200
    python bench/scale_bench.py --profile --output /tmp/scale.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
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
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from etcd3aio._protobuf import (
    KVStub,
    LeaseGrantRequest,
    LeaseKeepAliveRequest,
    LeaseRevokeRequest,
    LeaseStub,
    PutRequest,
    RequestOp,
    TxnRequest,
)
from etcd3aio.kv import KVService

from discovery.devtools.benchmain import print_figures
from discovery.devtools.etcd import EtcdProcess
from discovery.devtools.process import ServerProcess, free_port
from discovery.keys import KeySchema
from discovery_client.errors import is_lost_status
from discovery_pb.v1 import admin_pb2, admin_pb2_grpc, lookup_pb2, lookup_pb2_grpc, registry_pb2, registry_pb2_grpc
from discovery_pb.v1.types_pb2 import Instance, Session, Status

RUNNER = Path(__file__).with_name("_servers.py")
SECTIONS = ("memory", "register", "heartbeat", "storm")
# etcd_put: raw generated stubs (the fastest a Python process can put); etcd3aio_put: the asyncio
# client the server itself uses, the baseline the issue measured 3,400/s against.
REGISTER_TARGETS = ("register", "register_session", "register_2servers", "etcd_put", "etcd3aio_put")
BATCH_TARGETS = ("batch", "etcd_txn")
HB_WINDOWS = ("sessions", "leases", "etcd")
HB_TARGETS = ("heartbeat", "keepalive")
TARGET_REGISTER_RATIO = 0.3
TARGET_HB_CORES_100K = 0.25
TXN_OPS = 100  # puts per etcd transaction: under etcd's default --max-txn-ops of 128
CALL_TIMEOUT = 10.0
REGION = "bench"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# Frames every sample runs under (event loop, threads, the runner): left out of "total".
_PLUMBING = re.compile(
    r"\((asyncio/|threading\.py|selectors\.py|bench/_servers\.py|<string>)|^(_?start_thread|clone|<module>)"
)
_LOCAL = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own per channel
_PROBE = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20)]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all threads), from /proc (10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_busy() -> tuple[float, float]:
    """Seconds of busy CPU (all cores) and stolen time so far."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4] - ticks[7]) / _CLK_TCK, ticks[7] / _CLK_TCK


class CpuMeter:
    """CPU of named processes over a window: cores used, and the rest of the machine ("others")."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def sample(self) -> dict[str, float]:
        ours = {"client": time.process_time()} | {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        busy, steal = machine_busy()
        return ours | {"others": busy - sum(ours.values()), "steal": steal, "t": time.perf_counter()}

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        seconds = after["t"] - before["t"]
        return {k: round((after[k] - before[k]) / seconds, 3) for k in before if k != "t"}


class Lab:
    """etcd and the servers of one run; everything is stopped when the ExitStack closes."""

    def __init__(self, stack: contextlib.ExitStack, tmp: Path, event_loop: str = "auto") -> None:
        self.stack = stack
        self.tmp = tmp
        self.event_loop = event_loop
        self.etcd = EtcdProcess(tmp / "etcd")
        stack.callback(self.etcd.stop)
        self.etcd.start()
        self._count = 0

    def server(self, name: str, prefix: str, launch_only: bool = False) -> ServerProcess:
        self._count += 1
        address = f"127.0.0.1:{free_port()}"
        command = [sys.executable, str(RUNNER), "discovery", "--listen", address, "--etcd", self.etcd.endpoint]
        command += ["--region", REGION, "--prefix", prefix, "--settings", json.dumps({"event_loop": self.event_loop})]
        child = ServerProcess(command, address, self.tmp / f"{name}-{self._count}.log", name=f"{name} server")
        self.stack.callback(child.stop, 10.0)
        if launch_only:
            child.launch()
            return child
        return child.start(180)


def stop(child: ServerProcess) -> None:
    child.stop(10.0)


@contextlib.contextmanager
def frozen(pids: Sequence[int]) -> Iterator[None]:
    """SIGSTOP the processes; SIGCONT them on the way out, whatever happens."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# --- records and etcd ------------------------------------------------------------------------


@dataclass(frozen=True)
class Population:
    """``count`` instances, ``per_service`` to a service; record i is on session i // per_session."""

    count: int
    per_service: int = 20
    tag: str = "p"

    def record(self, i: int, ttl: int = 0) -> Instance:
        """Like the issue says: IPv4 address, zone, two tags, two metadata entries."""
        return Instance(
            service=f"svc-{self.tag}-{i // self.per_service:05d}",
            instance_id=f"i-{i:06d}",
            region=REGION,
            zone=f"{REGION}-{'abc'[i % 3]}",
            address=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:8080",
            tags=["http", f"shard-{i % 8}"],
            metadata={"team": f"team-{i % 50}", "build": f"b{i % 97}"},
            status=Status.SERVING,
            ttl_seconds=ttl,
        )

    def service_of(self, i: int) -> str:
        return f"svc-{self.tag}-{i // self.per_service:05d}"


def etcd_metrics(endpoint: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5).read().decode()
    out = {}
    for name in (
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "etcd_debugging_mvcc_keys_total",
        "etcd_mvcc_put_total",  # revisions written: what the history (until compaction) is made of
        "etcd_mvcc_delete_total",
    ):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


async def load_direct(
    channel: grpc.aio.Channel, keys: KeySchema, pop: Population, *, start: int, end: int, per_session: int
) -> None:
    """Records start..end straight into etcd, each session's on a lease of its own (TTL 3600 s,
    never kept alive: long enough for a run) with its Session record, as RegisterBatch would."""
    kv, lease_stub = KVStub(channel), LeaseStub(channel)
    gate = asyncio.Semaphore(32)

    async def one_session(first: int, last: int) -> None:
        async with gate:
            lease = (await lease_stub.LeaseGrant(LeaseGrantRequest(TTL=3600), timeout=30)).ID
            session = Session(session_id=lease, region=REGION, owner="", name="bench", ttl_seconds=3600)
            ops = [
                RequestOp(
                    request_put=PutRequest(
                        key=keys.session(REGION, lease), value=session.SerializeToString(), lease=lease
                    )
                )
            ]
            for i in range(first, last):
                r = pop.record(i)
                r.session_id, r.ttl_seconds = lease, 3600
                ops.append(
                    RequestOp(
                        request_put=PutRequest(
                            key=keys.instance(REGION, r.service, r.instance_id),
                            value=r.SerializeToString(),
                            lease=lease,
                        )
                    )
                )
            for c in range(0, len(ops), TXN_OPS):
                await kv.Txn(TxnRequest(success=ops[c : c + TXN_OPS]), timeout=30)

    bounds = range(start, end, per_session)
    await asyncio.gather(*(one_session(b, min(end, b + per_session)) for b in bounds))


async def status(channel: grpc.aio.Channel) -> admin_pb2.StatusResponse:
    resp: admin_pb2.StatusResponse = await admin_pb2_grpc.AdminStub(channel).Status(
        admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT
    )
    return resp


async def wait_count(channel: grpc.aio.Channel, count: int, timeout: float) -> float:
    t0 = time.perf_counter()
    while (await status(channel)).instance_count != count:
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"server view never reached {count} instances")
        await asyncio.sleep(0.05)
    return time.perf_counter() - t0


# --- memory and cold start --------------------------------------------------------------------


async def cold_start(lab: Lab, prefix: str, pop: Population, size: int) -> dict[str, Any]:
    """From process start until a Resolve of the last service is complete and Status counts all."""
    last = size - 1
    expected = sum(1 for i in range(size) if pop.service_of(i) == pop.service_of(last))
    t0 = time.perf_counter()
    child = lab.server("cold", prefix, launch_only=True)
    first_answer = None
    try:
        async with grpc.aio.insecure_channel(child.address, options=_PROBE) as channel:
            stub = lookup_pb2_grpc.LookupStub(channel)
            while True:
                if child.returncode is not None:
                    raise RuntimeError(f"cold-start server exited; see {child.log_path}")
                try:
                    resp = await stub.Resolve(lookup_pb2.ResolveRequest(service=pop.service_of(last)), timeout=1)
                    first_answer = first_answer or time.perf_counter() - t0
                    if len(resp.endpoints) == expected and (await status(channel)).instance_count == size:
                        break
                except grpc.aio.AioRpcError:
                    pass
                if time.perf_counter() - t0 > 180:
                    raise RuntimeError("cold start: no complete answer in 180 s")
                await asyncio.sleep(0.02)
            seconds = time.perf_counter() - t0
            await asyncio.sleep(1.0)
            rss = rss_bytes(child.pid)
    finally:
        stop(child)
    return {"seconds": round(seconds, 2), "first_answer_seconds": round(first_answer or seconds, 2), "rss_bytes": rss}


async def memory_section(lab: Lab, args: argparse.Namespace) -> dict[str, Any]:
    prefix, keys = "/bench-memory/v1/", KeySchema("/bench-memory/v1/")
    pop = Population(max(args.memory_sizes), tag="m")
    server = lab.server("memory", prefix)
    out: dict[str, Any] = {
        "server": "insecure",
        "record": "IPv4 address, zone, 2 tags, 2 metadata entries, on a session",
    }
    try:
        async with (
            grpc.aio.insecure_channel(server.address) as sch,
            grpc.aio.insecure_channel(lab.etcd.endpoint) as ech,
        ):
            await asyncio.sleep(2.0)
            rss0, db0 = rss_bytes(server.pid), etcd_metrics(lab.etcd.endpoint)
            out |= {"rss_empty_bytes": rss0, "etcd_db_empty": db0, "steps": []}
            loaded = 0
            for size in sorted(args.memory_sizes):
                t0 = time.perf_counter()
                await load_direct(ech, keys, pop, start=loaded, end=size, per_session=args.per_session)
                load_s = time.perf_counter() - t0
                await wait_count(sch, size, 300)
                loaded = size
                await asyncio.sleep(2.0)
                rss, db = rss_bytes(server.pid), etcd_metrics(lab.etcd.endpoint)
                log(f"memory {size}: RSS {rss / 1e6:.1f} MB ({(rss - rss0) / size:.0f} B/instance grown); db {db}")
                colds = []
                for _ in range(args.cold_repeats):
                    colds.append(await cold_start(lab, prefix, pop, size))
                    log(f"cold start over {size}: {colds[-1]}")
                cold_rss = min(c["rss_bytes"] for c in colds)
                db_used = db["etcd_mvcc_db_total_size_in_use_in_bytes"] - db0["etcd_mvcc_db_total_size_in_use_in_bytes"]
                out["steps"].append(
                    {
                        "instances": size,
                        "load_seconds": round(load_s, 2),
                        "rss_bytes_grown": rss,
                        "bytes_per_instance_grown": round((rss - rss0) / size),
                        "rss_bytes_cold": cold_rss,
                        "bytes_per_instance_cold": round((cold_rss - rss0) / size),
                        "cold_start": colds,
                        "cold_start_seconds_median": sorted(c["seconds"] for c in colds)[len(colds) // 2],
                        "etcd": db,
                        "etcd_db_in_use_bytes_per_100k": round(db_used / size * 100_000),
                        "etcd_db_total_bytes_per_100k": round(
                            (db["etcd_mvcc_db_total_size_in_bytes"] - db0["etcd_mvcc_db_total_size_in_bytes"])
                            / size
                            * 100_000
                        ),
                    }
                )
    finally:
        stop(server)
    return out


# --- closed-loop phases ------------------------------------------------------------------------


@dataclass
class Phase:
    target: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    units: int = 0  # instances or heartbeats done (a batch counts its instances)
    errors: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds else 0.0

    def cpu_us_per_unit(self, who: str) -> float:
        return self.cpu.get(who, 0.0) / self.rate * 1e6 if self.rate else float("nan")


async def closed_loop(
    target: str,
    call: Callable[[int, random.Random], Awaitable[int]],
    meter: CpuMeter,
    args: argparse.Namespace,
    concurrency: int,
) -> Phase:
    """``concurrency`` workers call in a loop; only calls completing in the window count.
    ``call`` returns how many units it did."""
    phase = Phase(target)
    measuring = stopping = False

    async def worker(n: int) -> None:
        rng = random.Random(args.seed * 7919 + n)
        while not stopping:
            t0 = time.perf_counter()
            try:
                units = await call(n, rng)
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                if measuring:
                    phase.errors[exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "timeout"] += 1
                await asyncio.sleep(0.05)
            else:
                if measuring:
                    phase.latencies.append(time.perf_counter() - t0)
                    phase.units += units

    workers = [asyncio.create_task(worker(n)) for n in range(concurrency)]
    try:
        await asyncio.sleep(args.warmup)
        before = meter.sample()
        measuring = True
        await asyncio.sleep(args.duration)
        measuring = False
        after = meter.sample()
    finally:
        stopping = True
        await asyncio.gather(*workers, return_exceptions=True)
    phase.seconds = after["t"] - before["t"]
    phase.cpu = CpuMeter.cores(before, after)
    return phase


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarize(phases: list[Phase], serving: str) -> dict[str, Any]:
    lat = [x for p in phases for x in p.latencies]
    errors: Counter[str] = Counter()
    for p in phases:
        errors.update(p.errors)
    return {
        "rate": round(median([p.rate for p in phases]), 1),
        "rates": [round(p.rate, 1) for p in phases],
        "p50_ms": round(percentile(lat, 0.5) * 1000, 2),
        "p99_ms": round(percentile(lat, 0.99) * 1000, 2),
        "errors": dict(errors),
        "serving_process": serving,
        "serving_cpu_us_per_unit": round(median([p.cpu_us_per_unit(serving) for p in phases]), 1),
        "client_cpu_us_per_unit": round(median([p.cpu_us_per_unit("client") for p in phases]), 1),
        "etcd_cpu_us_per_unit": round(median([p.cpu_us_per_unit("etcd") for p in phases]), 1),
        "cpu_cores_used": {k: round(median([p.cpu[k] for p in phases]), 2) for k in phases[0].cpu},
        "others_cores_per_repeat": [p.cpu["others"] for p in phases],
    }


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def rotated(targets: Sequence[str], repeat: int) -> list[str]:
    k = repeat % len(targets)
    return [*targets[k:], *targets[:k]]


async def run_rotation(
    targets: Sequence[str],
    calls: Mapping[str, Callable[[int, random.Random], Awaitable[int]]],
    meter: CpuMeter,
    args: argparse.Namespace,
    concurrency: dict[str, int],
) -> dict[str, list[Phase]]:
    phases: dict[str, list[Phase]] = {t: [] for t in targets}
    for repeat in range(args.repeats):
        for target in rotated(targets, repeat):
            phase = await closed_loop(target, calls[target], meter, args, concurrency[target])
            phases[target].append(phase)
            log(f"repeat {repeat + 1}/{args.repeats} {target:18s} {phase.rate:9.0f}/s  errors {dict(phase.errors)}")
    return phases


# --- register ------------------------------------------------------------------------------------


async def open_session(stub: registry_pb2_grpc.RegistryStub, ttl: int, name: str) -> int:
    resp = await stub.OpenSession(registry_pb2.OpenSessionRequest(ttl_seconds=ttl, name=name), timeout=CALL_TIMEOUT)
    return int(resp.session_id)


async def register_section(lab: Lab, args: argparse.Namespace) -> dict[str, Any]:  # noqa: PLR0915
    prefix = "/bench-register/v1/"
    keys = KeySchema("/bench-direct/v1/")  # the baselines' keys: under a prefix no server watches
    one, two = lab.server("register", prefix), lab.server("register-2", prefix)
    pop = Population(args.pool, tag="r")
    records = [pop.record(i) for i in range(args.pool)]
    # As the server stores it: region and (empty: insecure) owner filled in, weight defaulted.
    stored = []
    for r in records:
        s = Instance()
        s.CopyFrom(r)
        s.weight = 100
        stored.append((keys.instance(REGION, s.service, s.instance_id), s.SerializeToString()))
    try:
        ch1 = grpc.aio.insecure_channel(one.address)
        ch2 = grpc.aio.insecure_channel(two.address)
        ech = grpc.aio.insecure_channel(lab.etcd.endpoint)
        reg1, reg2 = registry_pb2_grpc.RegistryStub(ch1), registry_pb2_grpc.RegistryStub(ch2)
        kv, lease_stub = KVStub(ech), LeaseStub(ech)
        session = await open_session(reg1, 3600, "bench register")
        batch_session = await open_session(reg1, 3600, "bench batch")
        batch_lease = (await lease_stub.LeaseGrant(LeaseGrantRequest(TTL=3600), timeout=10)).ID
        requests = [registry_pb2.RegisterRequest(instance=r) for r in records]
        session_requests = [registry_pb2.RegisterRequest(instance=r, session_id=session) for r in records]
        puts = [PutRequest(key=k, value=v) for k, v in stored]
        bpop = Population(args.pool, tag="b")

        async def register(n: int, rng: random.Random) -> int:
            await reg1.Register(requests[rng.randrange(args.pool)], timeout=CALL_TIMEOUT)
            return 1

        async def register_session(n: int, rng: random.Random) -> int:
            await reg1.Register(session_requests[rng.randrange(args.pool)], timeout=CALL_TIMEOUT)
            return 1

        async def register_2servers(n: int, rng: random.Random) -> int:
            await (reg1 if n % 2 else reg2).Register(requests[rng.randrange(args.pool)], timeout=CALL_TIMEOUT)
            return 1

        async def etcd_put(n: int, rng: random.Random) -> int:
            await kv.Put(puts[rng.randrange(args.pool)], timeout=CALL_TIMEOUT)
            return 1

        client_kv = KVService(ech)

        async def etcd3aio_put(n: int, rng: random.Random) -> int:
            key, value = stored[rng.randrange(args.pool)]
            await client_kv.put(key, value, timeout=CALL_TIMEOUT)
            return 1

        def batch_slice(rng: random.Random) -> list[int]:
            first = rng.randrange(0, args.pool - args.batch + 1)
            return list(range(first, first + args.batch))

        async def batch(n: int, rng: random.Random) -> int:
            items = [bpop.record(i) for i in batch_slice(rng)]
            await reg1.RegisterBatch(
                registry_pb2.RegisterBatchRequest(instances=items, session_id=batch_session), timeout=30
            )
            return len(items)

        async def etcd_txn(n: int, rng: random.Random) -> int:
            ids = batch_slice(rng)
            for c in range(0, len(ids), TXN_OPS):
                ops = []
                for i in ids[c : c + TXN_OPS]:
                    r = bpop.record(i)
                    r.session_id, r.ttl_seconds, r.weight = batch_lease, 3600, 100
                    ops.append(
                        RequestOp(
                            request_put=PutRequest(
                                key=keys.instance(REGION, r.service, r.instance_id),
                                value=r.SerializeToString(),
                                lease=batch_lease,
                            )
                        )
                    )
                await kv.Txn(TxnRequest(success=ops), timeout=30)
            return len(ids)

        calls = {
            "register": register,
            "register_session": register_session,
            "register_2servers": register_2servers,
            "etcd_put": etcd_put,
            "etcd3aio_put": etcd3aio_put,
            "batch": batch,
            "etcd_txn": etcd_txn,
        }
        meter = CpuMeter({"server": one.pid, "server2": two.pid, "etcd": lab.etcd.pid})
        conc = dict.fromkeys(REGISTER_TARGETS, args.concurrency) | dict.fromkeys(BATCH_TARGETS, args.batch_concurrency)
        phases = await run_rotation(REGISTER_TARGETS, calls, meter, args, conc)
        phases |= await run_rotation(BATCH_TARGETS, calls, meter, args, conc)
        profile = None
        if args.profile:
            log(f"profiling the server under Register load for {args.profile_seconds} s")
            profile = await profiled(
                one.pid,
                profile_path(lab, args, "register.txt"),
                args,
                lambda: closed_loop("register", register, meter, args, args.concurrency),
            )
        out: dict[str, Any] = {"server": "insecure (plaintext, no policy: every caller is admin)"}
        serving = {
            "register": "server",
            "register_session": "server",
            "batch": "server",
            "etcd_put": "etcd",
            "etcd3aio_put": "etcd",
            "etcd_txn": "etcd",
        }
        for target, ps in phases.items():
            out[target] = summarize(ps, serving.get(target, "server"))
        two_server_cpu = [
            (p.cpu["server"] + p.cpu["server2"]) / p.rate * 1e6 if p.rate else float("nan")
            for p in phases["register_2servers"]
        ]
        out["register_2servers"]["servers_cpu_us_per_unit"] = round(median(two_server_cpu), 1)
        out["ratio_register_to_etcd_put"] = ratio(out["register"]["rate"], out["etcd_put"]["rate"])
        out["ratio_register_to_etcd_put_per_repeat"] = [
            ratio(a.rate, b.rate) for a, b in zip(phases["register"], phases["etcd_put"], strict=True)
        ]
        out["ratio_register_to_etcd3aio_put"] = ratio(out["register"]["rate"], out["etcd3aio_put"]["rate"])
        out["ratio_register_session_to_etcd_put"] = ratio(out["register_session"]["rate"], out["etcd_put"]["rate"])
        out["ratio_2servers_to_1"] = ratio(out["register_2servers"]["rate"], out["register"]["rate"])
        out["ratio_batch_to_etcd_txn"] = ratio(out["batch"]["rate"], out["etcd_txn"]["rate"])
        out["ratio_target"] = TARGET_REGISTER_RATIO
        out["meets_ratio_target"] = (out["ratio_register_to_etcd_put"] or 0) >= TARGET_REGISTER_RATIO
        out["profile"] = profile
        for ch in (ch1, ch2, ech):
            await ch.close()
    finally:
        stop(two)
        stop(one)
    return out


# --- profiling ---------------------------------------------------------------------------------------


def py_spy(pid: int, output: Path, seconds: float, native: bool = False) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of ``pid`` for ``seconds`` into ``output`` (raw collapsed stacks), or None."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return None
    command = [exe, "record", "--pid", str(pid), "--output", str(output), "--format", "raw"]
    command += ["--rate", "100", "--duration", str(max(1, int(seconds)))]
    # --native (C frames too: grpc's Cython core, protobuf's upb) needs the process paused per sample.
    command.append("--native" if native else "--nonblocking")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def profile_path(lab: Lab, args: argparse.Namespace, name: str) -> Path:
    if not args.profile_dir:
        return lab.tmp / name
    folder = Path(args.profile_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


async def profiled(
    pid: int, output: Path, args: argparse.Namespace, load: Callable[[], Awaitable[Phase]]
) -> dict[str, Any]:
    """Run ``load`` (a closed-loop phase of ``--profile-seconds``) under py-spy; its top frames."""
    proc = py_spy(pid, output, args.profile_seconds, args.profile_native)
    if proc is None:
        return {"error": "py-spy not found: pip install py-spy"}
    saved = args.duration
    args.duration = args.profile_seconds
    try:
        await load()
        await asyncio.to_thread(proc.wait, 30)
    finally:
        args.duration = saved
        if proc.poll() is None:  # interrupted, or py-spy hung: it goes too
            proc.kill()
            proc.wait(5)
    return top_frames(output, args.profile_top)


def top_frames(path: Path, top: int) -> dict[str, Any]:
    """From py-spy's raw (collapsed) stacks: the frames where the samples were (own time) and the
    frames on the stack (total time), as shares of the non-idle samples."""
    if not path.exists():
        return {"error": f"no profile written at {path}"}
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";") if f.strip()]
        frames = [f.replace(str(Path(__file__).resolve().parents[1]) + "/", "") for f in frames]
        frames = [re.sub(r"/[^ ]*/site-packages/", "", f) for f in frames]
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            if not _PLUMBING.search(f):
                total[f] += n
    return {
        "file": str(path),
        "samples": samples,
        "own": [[f, round(100 * n / samples, 1)] for f, n in own.most_common(top)] if samples else [],
        "total": [[f, round(100 * n / samples, 1)] for f, n in total.most_common(top)] if samples else [],
    }


# --- heartbeats ------------------------------------------------------------------------------------


@dataclass
class Tally:
    beats: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)  # the first error message of each kind


def retry_after(exc: grpc.aio.AioRpcError) -> float:
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms":
            return int(value) / 1000
    return 0.0


class SessionClient:
    """One client process's view of the world: a session, its instances, one Heartbeat stream.
    On a lost session: a new one, and its instances again in batches; errors back off with
    jitter (retry-after-ms when the server gives one)."""

    def __init__(
        self, stub: registry_pb2_grpc.RegistryStub, records: list[Instance], ttl: int, batch: int, tally: Tally
    ) -> None:
        self.stub, self.records, self.ttl, self.batch, self.tally = stub, records, ttl, batch, tally
        self.session = 0
        self.epoch = 0  # sessions established
        self.back_at = 0.0  # when the last establishment finished

    async def establish(self) -> None:
        while True:
            try:
                self.session = await open_session(self.stub, self.ttl, "bench")
                for c in range(0, len(self.records), self.batch):
                    await self.stub.RegisterBatch(
                        registry_pb2.RegisterBatchRequest(
                            instances=self.records[c : c + self.batch], session_id=self.session
                        ),
                        timeout=30,
                    )
                self.epoch += 1
                self.back_at = time.perf_counter()
                return
            except grpc.aio.AioRpcError as exc:
                await self._backoff("establish", exc)

    async def _backoff(self, what: str, exc: grpc.aio.AioRpcError) -> None:
        key = f"{what}:{exc.code().name}"
        self.tally.errors[key] += 1
        self.tally.samples.setdefault(key, (exc.details() or "")[:200])
        await asyncio.sleep(max(retry_after(exc), 0.1) * (1 + random.random()))

    async def run(self) -> None:
        """Heartbeats every ttl/3 until cancelled."""
        period = self.ttl / 3
        await asyncio.sleep(random.uniform(0, period))
        while True:
            call = self.stub.Heartbeat()
            try:
                while True:
                    t0 = time.perf_counter()
                    await call.write(registry_pb2.HeartbeatRequest(lease_id=self.session))
                    async with asyncio.timeout(period):  # not wait_for: in 3.11 it can swallow a cancel
                        resp = await call.read()
                    if resp is grpc.aio.EOF:
                        raise RuntimeError("heartbeat stream ended")
                    self.tally.beats += 1
                    await asyncio.sleep(max(0.0, period - (time.perf_counter() - t0)))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    self.tally.errors["heartbeat:NOT_FOUND (session lost)"] += 1
                    await self.establish()
                elif is_lost_status(exc):
                    # As the client library does: the status was lost in grpc.aio, not sent by
                    # the server; a new stream hears it at once.
                    self.tally.errors["heartbeat:INTERNAL (status lost by grpc.aio, stream reopened)"] += 1
                else:
                    await self._backoff("heartbeat", exc)
            except (TimeoutError, RuntimeError):
                self.tally.errors["heartbeat:timeout"] += 1
            finally:
                call.cancel()


class KeepAliveMux:
    """Direct etcd keep-alives over one LeaseKeepAlive stream, many leases (clientv3's way)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = LeaseStub(channel).LeaseKeepAlive()
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.waiters: dict[int, list[asyncio.Future[int]]] = {}
        self.tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    async def _write(self) -> None:
        while True:
            await self.call.write(LeaseKeepAliveRequest(ID=await self.queue.get()))

    async def _read(self) -> None:
        while (resp := await self.call.read()) is not grpc.aio.EOF:
            for fut in self.waiters.pop(resp.ID, []):
                if not fut.done():
                    fut.set_result(resp.TTL)

    async def refresh(self, lease: int) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(lease, []).append(fut)
        self.queue.put_nowait(lease)
        async with asyncio.timeout(CALL_TIMEOUT):
            return await fut

    async def close(self) -> None:
        self.call.cancel()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def lease_streams(stub: registry_pb2_grpc.RegistryStub, leases: list[int], period: float, tally: Tally) -> None:
    """One Heartbeat stream beating ``leases`` one after another, every ``period``."""
    await asyncio.sleep(random.uniform(0, period))
    call = stub.Heartbeat()
    try:
        while True:
            t0 = time.perf_counter()
            for lease in leases:
                try:
                    await call.write(registry_pb2.HeartbeatRequest(lease_id=lease))
                    async with asyncio.timeout(period):
                        await call.read()
                    tally.beats += 1
                except (grpc.aio.AioRpcError, TimeoutError) as exc:
                    tally.errors[exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "timeout"] += 1
                    call.cancel()
                    call = stub.Heartbeat()
            await asyncio.sleep(max(0.0, period - (time.perf_counter() - t0)))
    finally:
        call.cancel()


async def direct_keepalives(mux: KeepAliveMux, leases: list[int], period: float, tally: Tally) -> None:
    await asyncio.sleep(random.uniform(0, period))
    while True:
        t0 = time.perf_counter()
        for lease in leases:
            try:
                await mux.refresh(lease)
                tally.beats += 1
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                tally.errors[type(exc).__name__] += 1
        await asyncio.sleep(max(0.0, period - (time.perf_counter() - t0)))


async def gather_limited(calls: Sequence[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """At most ``limit`` at once: each call starts only when its turn comes (a grpc.aio call
    starts the moment it is made, so the calls are passed unmade)."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


async def stop_tasks(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel until done: a cancel that lands as a call completes can be lost."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    await asyncio.gather(*tasks, return_exceptions=True)


class HeartbeatLab:
    """The sessions' server and population (alive until the storm), and the per-instance one."""

    def __init__(self, lab: Lab, args: argparse.Namespace) -> None:
        self.lab, self.args = lab, args
        self.sessions_server = lab.server("sessions", "/bench-sessions/v1/")
        self.leases_server = lab.server("leases", "/bench-leases/v1/")
        self.channels = [
            grpc.aio.insecure_channel(self.sessions_server.address, options=_LOCAL)
            for _ in range(max(1, args.sessions // 100))
        ]
        self.lchannels = [grpc.aio.insecure_channel(self.leases_server.address, options=_LOCAL) for _ in range(4)]
        self.etcd_channel = grpc.aio.insecure_channel(lab.etcd.endpoint)
        self.tally = Tally()
        self.clients: list[SessionClient] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.meter = CpuMeter(
            {"sessions_server": self.sessions_server.pid, "leases_server": self.leases_server.pid, "etcd": lab.etcd.pid}
        )

    async def start_sessions(self) -> dict[str, Any]:
        args = self.args
        pop = Population(args.instances, tag="s")
        per = -(-args.instances // args.sessions)
        for s in range(args.sessions):
            stub = registry_pb2_grpc.RegistryStub(self.channels[s % len(self.channels)])
            recs = [pop.record(i) for i in range(s * per, min(args.instances, (s + 1) * per))]
            self.clients.append(SessionClient(stub, recs, args.ttl, args.batch, self.tally))
        t0 = time.perf_counter()
        gate = asyncio.Semaphore(args.batch_concurrency)

        async def client(c: SessionClient) -> None:
            async with gate:
                await c.establish()
            await c.run()  # beating from the moment its session exists

        self.tasks = [asyncio.create_task(client(c)) for c in self.clients]
        while any(c.epoch == 0 for c in self.clients):
            if failed := [t for t in self.tasks if t.done()]:
                failed[0].result()
            await asyncio.sleep(0.02)
        seconds = time.perf_counter() - t0
        async with grpc.aio.insecure_channel(self.sessions_server.address) as ch:
            await wait_count(ch, args.instances, 60)
        log(f"{args.instances} instances in {args.sessions} sessions registered in {seconds:.1f} s")
        return {
            "seconds": round(seconds, 2),
            "instances_per_second": round(args.instances / seconds),
            "rss_bytes": rss_bytes(self.sessions_server.pid),
        }

    async def window(self, kind: str) -> dict[str, Any]:
        """One measured window: the sessions' beats, plus per-instance leases or direct keep-alives."""
        args = self.args
        period = args.ttl / 3
        extra = Tally()
        tasks: list[asyncio.Task[None]] = []
        leases: list[int] = []
        mux = None
        lease_stub = LeaseStub(self.etcd_channel)
        if kind == "leases":
            pop = Population(args.leases, tag="l")
            stubs = [registry_pb2_grpc.RegistryStub(c) for c in self.lchannels]
            resps = await gather_limited(
                [
                    functools.partial(
                        stubs[i % 4].Register,
                        registry_pb2.RegisterRequest(instance=pop.record(i, args.ttl)),
                        timeout=30,
                    )
                    for i in range(args.leases)
                ],
                args.concurrency,
            )
            leases = [r.lease_id for r in resps]
            log(f"{len(leases)} leased instances registered")
            k = args.leases_per_stream
            tasks = [
                asyncio.create_task(lease_streams(stubs[j % 4], leases[j * k : (j + 1) * k], period, extra))
                for j in range(-(-len(leases) // k))
            ]
        elif kind == "etcd":
            grants = await gather_limited(
                [
                    functools.partial(lease_stub.LeaseGrant, LeaseGrantRequest(TTL=args.ttl), timeout=30)
                    for _ in range(args.leases)
                ],
                args.concurrency,
            )
            leases = [g.ID for g in grants]
            mux = KeepAliveMux(self.etcd_channel)
            k = args.leases_per_stream
            tasks = [
                asyncio.create_task(direct_keepalives(mux, leases[j * k : (j + 1) * k], period, extra))
                for j in range(-(-len(leases) // k))
            ]
        try:
            await asyncio.sleep(period)  # every stream has started and beaten once
            b0, e0, before = self.tally.beats, extra.beats, self.meter.sample()
            await asyncio.sleep(args.hb_window)
            b1, e1, after = self.tally.beats, extra.beats, self.meter.sample()
        finally:
            await stop_tasks(tasks)
            if mux is not None:
                await mux.close()
        log(f"window {kind} measured; revoking {len(leases)} leases")
        # Let the per-instance leases go now, not at their TTL in the next window.
        await gather_limited(
            [functools.partial(lease_stub.LeaseRevoke, LeaseRevokeRequest(ID=lease), timeout=30) for lease in leases],
            64,
        )
        await asyncio.sleep(1.0)
        seconds = after["t"] - before["t"]
        cores = CpuMeter.cores(before, after)
        out = {
            "window": kind,
            "seconds": round(seconds, 1),
            "session_beats_per_s": round((b1 - b0) / seconds, 1),
            "extra_beats_per_s": round((e1 - e0) / seconds, 1),
            "extra_errors": dict(extra.errors),
            "cpu_cores_used": cores,
        }
        log(f"heartbeat window {kind}: {out}")
        return out

    async def close(self) -> None:
        await stop_tasks(self.tasks)
        for ch in [*self.channels, *self.lchannels, self.etcd_channel]:
            await ch.close()


def heartbeat_report(windows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    by = {k: [w for w in windows if w["window"] == k] for k in HB_WINDOWS}
    out: dict[str, Any] = {}
    sess = by["sessions"]
    s_us = median(
        [
            w["cpu_cores_used"]["sessions_server"] / w["session_beats_per_s"] * 1e6
            for w in sess
            if w["session_beats_per_s"]
        ]
    )
    client_base = median([w["cpu_cores_used"]["client"] for w in sess])
    etcd_base = median([w["cpu_cores_used"]["etcd"] for w in sess])
    full_rate = args.sessions * 3 / args.ttl
    # The leases' server does nothing in the other windows: its cores then are a server's idle work
    # (etcd health probe, watch progress), taken off the sessions' server for a net figure.
    idle = median([w["cpu_cores_used"]["leases_server"] for w in windows if w["window"] != "leases"])
    s_net = median(
        [
            (w["cpu_cores_used"]["sessions_server"] - idle) / w["session_beats_per_s"] * 1e6
            for w in sess
            if w["session_beats_per_s"]
        ]
    )
    out["idle_server_cores"] = idle
    out["sessions"] = {
        "instances": args.instances,
        "sessions": args.sessions,
        "ttl_seconds": args.ttl,
        "beats_per_s": median([w["session_beats_per_s"] for w in sess]),
        "server_cores": median([w["cpu_cores_used"]["sessions_server"] for w in sess]),
        "server_cpu_us_per_heartbeat": round(s_us, 1),
        "server_cpu_us_per_heartbeat_net_of_idle": round(s_net, 1),
        "etcd_cores": etcd_base,
        "projected_server_cores_100k_in_1000_sessions_ttl10": round(idle + s_net * 300 / 1e6, 3),
        "target_cores_100k": TARGET_HB_CORES_100K,
        "note": "server_cpu_us_per_heartbeat divides all the server's CPU by the beats; net_of_idle first takes off "
        "idle_server_cores; the projection is idle + 300 beats/s x net",
    }
    if by["leases"]:
        ls = by["leases"]
        l_us = median(
            [
                (w["cpu_cores_used"]["leases_server"] - idle) / w["extra_beats_per_s"] * 1e6
                for w in ls
                if w["extra_beats_per_s"]
            ]
        )
        out["per_instance_leases"] = {
            "instances": args.leases,
            "ttl_seconds": args.ttl,
            "leases_per_stream": args.leases_per_stream,
            "beats_per_s": median([w["extra_beats_per_s"] for w in ls]),
            "server_cores": median([w["cpu_cores_used"]["leases_server"] for w in ls]),
            "server_cpu_us_per_heartbeat_net_of_idle": round(l_us, 1),
            "etcd_cpu_us_per_keepalive": round(
                median(
                    [
                        (w["cpu_cores_used"]["etcd"] - etcd_base) / w["extra_beats_per_s"] * 1e6
                        for w in ls
                        if w["extra_beats_per_s"]
                    ]
                ),
                1,
            ),
            "errors": [w["extra_errors"] for w in ls],
            "projected_server_cores_100k_leases_ttl10": round(l_us * 100_000 * 3 / 10 / 1e6, 2),
        }
    if by["etcd"]:
        es = by["etcd"]
        out["direct_etcd_keepalives"] = {
            "leases": args.leases,
            "ttl_seconds": args.ttl,
            "streams": 1,
            "beats_per_s": median([w["extra_beats_per_s"] for w in es]),
            "client_cpu_us_per_keepalive": round(
                median(
                    [
                        (w["cpu_cores_used"]["client"] - client_base) / w["extra_beats_per_s"] * 1e6
                        for w in es
                        if w["extra_beats_per_s"]
                    ]
                ),
                1,
            ),
            "etcd_cpu_us_per_keepalive": round(
                median(
                    [
                        (w["cpu_cores_used"]["etcd"] - etcd_base) / w["extra_beats_per_s"] * 1e6
                        for w in es
                        if w["extra_beats_per_s"]
                    ]
                ),
                1,
            ),
            "errors": [w["extra_errors"] for w in es],
            "how": "client and etcd CPU above the sessions-only windows' (same session beats in both)",
        }
    out["full_rate_note"] = f"the sessions beat {full_rate:.0f}/s here; 100k in 1,000 sessions at TTL 10 s beat 300/s"
    out["windows"] = windows
    return out


async def heartbeat_section(lab: Lab, args: argparse.Namespace, hb: HeartbeatLab) -> dict[str, Any]:
    out: dict[str, Any] = {"server": "insecure", "setup_register_batch": await hb.start_sessions()}
    windows = []
    for repeat in range(args.hb_repeats):
        for kind in rotated(HB_WINDOWS, repeat):
            windows.append(await hb.window(kind))
    out |= heartbeat_report(windows, args)
    # Closed loop: beats as fast as they are answered, vs direct keep-alives of the same leases.
    sessions = [c.session for c in hb.clients]
    stubs = [registry_pb2_grpc.RegistryStub(c) for c in hb.channels]
    calls_state: dict[int, Any] = {}
    mux = KeepAliveMux(hb.etcd_channel)

    async def heartbeat(n: int, rng: random.Random) -> int:
        call = calls_state.get(n)
        if call is None or call.done():
            call = calls_state[n] = stubs[n % len(stubs)].Heartbeat()
        await call.write(registry_pb2.HeartbeatRequest(lease_id=sessions[n % len(sessions)]))
        resp = await call.read()
        if resp is grpc.aio.EOF:
            calls_state.pop(n, None)
            return 0
        return 1

    async def keepalive(n: int, rng: random.Random) -> int:
        await mux.refresh(sessions[n % len(sessions)])
        return 1

    conc = dict.fromkeys(HB_TARGETS, args.concurrency)
    try:
        phases = await run_rotation(HB_TARGETS, {"heartbeat": heartbeat, "keepalive": keepalive}, hb.meter, args, conc)
        out["throughput"] = {
            t: summarize(ps, "sessions_server" if t == "heartbeat" else "etcd") for t, ps in phases.items()
        }
        out["throughput"]["ratio_heartbeat_to_keepalive"] = ratio(
            out["throughput"]["heartbeat"]["rate"], out["throughput"]["keepalive"]["rate"]
        )
        if args.profile:
            log(f"profiling the server under Heartbeat load for {args.profile_seconds} s")
            out["profile"] = await profiled(
                hb.sessions_server.pid,
                profile_path(lab, args, "heartbeat.txt"),
                args,
                lambda: closed_loop("heartbeat", heartbeat, hb.meter, args, args.concurrency),
            )
    finally:
        for call in calls_state.values():
            call.cancel()
        await mux.close()
    out["session_errors_so_far"] = dict(hb.tally.errors)
    return out


# --- storm --------------------------------------------------------------------------------------------


async def storm_section(lab: Lab, args: argparse.Namespace, hb: HeartbeatLab) -> dict[str, Any]:
    """Freeze etcd and the sessions' server past the TTL; every session is lost; time until all is back."""
    stop(hb.leases_server)  # not part of the region under test
    hb.tally.errors.clear()
    hb.tally.samples.clear()
    epochs = [c.epoch for c in hb.clients]
    freeze = args.ttl + args.freeze_extra
    log(f"storm: freezing etcd and the sessions' server for {freeze:.0f} s")
    with frozen([lab.etcd.pid, hb.sessions_server.pid]):
        await asyncio.sleep(freeze)
    t0 = time.perf_counter()
    fewest = args.instances
    all_acked = None
    async with grpc.aio.insecure_channel(hb.sessions_server.address) as ch:
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                count = (await status(ch)).instance_count
                fewest = min(fewest, count)
                if all(c.epoch > e for c, e in zip(hb.clients, epochs, strict=True)):
                    all_acked = all_acked or max(c.back_at for c in hb.clients) - t0
                    if count == args.instances:
                        break
            if time.perf_counter() - t0 > args.storm_timeout:
                break
            await asyncio.sleep(0.05)
    back = time.perf_counter() - t0
    complete = all_acked is not None and fewest >= 0 and back < args.storm_timeout
    out = {
        "server": "insecure",
        "how": "etcd and the sessions' server SIGSTOPped past the TTL, then SIGCONT; the clients (this process, one "
        "per session) see NOT_FOUND, open a new session and RegisterBatch their instances; until the view counts "
        "them all",
        "instances": args.instances,
        "sessions": args.sessions,
        "ttl_seconds": args.ttl,
        "frozen_seconds": freeze,
        "all_back_seconds": round(back, 2) if complete else None,
        "last_batch_acked_seconds": round(all_acked, 2) if all_acked is not None else None,
        "fewest_in_view": fewest,
        "sessions_reestablished": sum(1 for c, e in zip(hb.clients, epochs, strict=True) if c.epoch > e),
        "client_errors": dict(hb.tally.errors),
        "client_errors_total": sum(v for k, v in hb.tally.errors.items() if "NOT_FOUND" not in k),
        "client_error_samples": dict(hb.tally.samples),
        "instances_per_second": round(args.instances / back, 1) if complete else None,
    }
    log(f"storm: {out}")
    return out


# --- main ---------------------------------------------------------------------------------------------


def code_version() -> dict[str, Any]:
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
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown"}
    return {"commit": commit, "discovery_uncommitted": sorted(line[3:] for line in dirty.splitlines() if line.strip())}


async def run_async(lab: Lab, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "memory" in args.sections:
        out["memory"] = await memory_section(lab, args)
    if "register" in args.sections:
        out["register"] = await register_section(lab, args)
    if "heartbeat" in args.sections or "storm" in args.sections:
        hb = HeartbeatLab(lab, args)
        try:
            if "heartbeat" in args.sections:
                out["heartbeat"] = await heartbeat_section(lab, args, hb)
            else:
                out["heartbeat"] = {"setup_register_batch": await hb.start_sessions()}
            if "storm" in args.sections:
                out["storm"] = await storm_section(lab, args, hb)
        finally:
            await hb.close()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    wall = time.perf_counter()
    out: dict[str, Any] = {"benchmark": "scale"}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-bench-")))
        lab = Lab(stack, tmp, args.event_loop)
        log(f"etcd {lab.etcd.endpoint} (pid {lab.etcd.pid}); sections {','.join(args.sections)}")
        out |= asyncio.run(run_async(lab, args))
        out["etcd_at_end"] = etcd_metrics(lab.etcd.endpoint)
    out["machine"] = {
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    out["parameters"] = {k: v for k, v in vars(args).items() if k not in ("output",)}
    out["code"] = code_version()
    out["wall_seconds"] = round(time.perf_counter() - wall, 1)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scale_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the issue's sizes: 100k instances in 1,000 sessions, memory and cold start at 10k and 100k, "
        "longer phases",
    )
    p.add_argument(
        "--sections",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    p.add_argument(
        "--instances", type=int, help="instances on sessions for heartbeat and storm (quick 10000, full 100000)"
    )
    p.add_argument("--sessions", type=int, help="sessions they are in (quick 100, full 1000)")
    p.add_argument("--ttl", type=int, default=10, help="session and lease TTL, seconds (default 10); beats every TTL/3")
    p.add_argument(
        "--leases", type=int, default=2000, help="per-instance leases (and direct etcd leases) compared (default 2000)"
    )
    p.add_argument(
        "--leases-per-stream",
        type=int,
        default=10,
        help="per-instance leases beaten over one Heartbeat stream (default 10)",
    )
    p.add_argument(
        "--memory-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        help="instance counts for memory and cold start (quick 10000, full 10000,100000)",
    )
    p.add_argument(
        "--per-session", type=int, default=100, help="instances per session lease in the memory section (default 100)"
    )
    p.add_argument("--cold-repeats", type=int, default=2, help="cold starts per memory size (default 2)")
    p.add_argument("--pool", type=int, default=10_000, help="instance ids Register re-registers (default 10000)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=128,
        help="calls in flight for Register, Heartbeat and their baselines (default 128)",
    )
    p.add_argument("--batch", type=int, default=1000, help="instances per RegisterBatch (default 1000, the maximum)")
    p.add_argument("--batch-concurrency", type=int, default=4, help="RegisterBatch calls in flight (default 4)")
    p.add_argument("--duration", type=float, help="measured seconds per closed-loop phase (quick 4, full 8)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each phase (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over each rotation of targets (default 2)")
    p.add_argument("--hb-window", type=float, help="measured seconds per heartbeat window (quick 10, full 20)")
    p.add_argument("--hb-repeats", type=int, help="rounds over the heartbeat windows (quick 1, full 2)")
    p.add_argument("--freeze-extra", type=float, default=3.0, help="storm: seconds frozen past the TTL (default 3)")
    p.add_argument(
        "--storm-timeout", type=float, default=300.0, help="storm: give up after this many seconds (default 300)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the server under Register and Heartbeat load (extra, unmeasured phases)",
    )
    p.add_argument("--profile-native", action="store_true", help="py-spy --native: C frames (gRPC core, upb) too")
    p.add_argument("--profile-seconds", type=float, default=8.0, help="seconds per profile (default 8)")
    p.add_argument("--profile-top", type=int, default=12, help="frames listed per profile (default 12)")
    p.add_argument(
        "--profile-dir", metavar="DIR", help="keep py-spy's raw stacks here (default: a temporary folder, removed)"
    )
    p.add_argument(
        "--event-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="the servers' event loop (default auto: uvloop where installed, as `discovery serve`)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", metavar="FILE", help="also write the JSON here")
    args = p.parse_args(argv)
    full = args.full
    defaults = {
        "instances": 100_000 if full else 10_000,
        "sessions": 1000 if full else 100,
        "memory_sizes": [10_000, 100_000] if full else [10_000],
        "duration": 8.0 if full else 4.0,
        "hb_window": 20.0 if full else 10.0,
        "hb_repeats": 2 if full else 1,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if set(args.sections) - set(SECTIONS) or not args.sections:
        p.error(f"--sections: choose from {','.join(SECTIONS)}")
    if args.batch > 1000 or args.batch < 1 or args.pool < args.batch:
        p.error("--batch: 1..1000 and at most --pool")
    if args.ttl < 2:
        p.error("--ttl: etcd's minimum is about 2 s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return print_figures(lambda: run(args), args.output)


if __name__ == "__main__":
    sys.exit(main())
