"""What mTLS and authorization cost: Resolve and Register against a secure server and a plaintext one, same run.

One run starts its own etcd (in a temporary directory), a CA with a server and a client
certificate, and two discovery servers over that etcd, each in a process of its own and under a
key prefix of its own (so neither sees the other's records):

* ``insecure``: ``--insecure``, plaintext, no policy: the baseline;
* ``secure``:   mTLS (server certificate with IP SAN 127.0.0.1 and DNS localhost, client
                certificates required), a policy, and an audit log file, as in production. The
                bench identity's grant has every limit at 0 (no limit), so nothing is throttled:
                what is measured is the handshake-free per-call cost of TLS, identity extraction,
                authorization, ownership checks and the audit line.

Then, from this process, keeps ``--concurrency`` calls in flight in phases of ``--duration``
seconds (after ``--warmup``), one operation against one server per phase, the order rotated
every repeat so slow drift on a shared machine hits both servers alike:

* ``resolve``:  Lookup/Resolve of a service with ``--instances`` instances (registered first);
* ``register``: Registry/Register re-registering a fixed pool of ``--pool`` instance ids in
                another service, so the instance count stays flat.

Optionally (``--handshakes N``, default 50) the cost of a new connection: a new channel and its
first Resolve, N times one after another, against each server; the secure median minus the
plaintext median is the TLS handshake (with client certificate) and authorization of a new peer.

Prints one JSON object: per server and operation calls/s (median of repeats), p50/p99 ms, the
serving process's CPU per call, and the ratios secure/insecure (target: >= 0.8). Progress goes to
stderr. Every process started is stopped, also on Ctrl-C, SIGTERM or error.

Examples:
    python bench/security_bench.py                                  # 3 repeats x 5 s x 4 phases, ~1.5 min
    python bench/security_bench.py --repeats 1 --duration 2         # quick look
    python bench/security_bench.py --identity admin --concurrency 32 --output /tmp/security.json
    python bench/security_bench.py --ops resolve --handshakes 0     # Resolve only, no handshake figure
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from discovery.devtools.benchmain import print_figures
from discovery.devtools.etcd import EtcdProcess
from discovery.devtools.process import ServerProcess, free_port
from discovery.security.certs import CertificateAuthority, server_id
from discovery_pb.v1 import lookup_pb2, lookup_pb2_grpc, registry_pb2, registry_pb2_grpc, types_pb2

RUNNER = Path(__file__).with_name("_servers.py")
SERVERS = ("insecure", "secure")
OPS = ("resolve", "register")
RESOLVED_SERVICE = "bench"
REGISTER_SERVICE = "bench.reg"
TARGET_RATIO = 0.8
CALL_TIMEOUT = 10.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- certificates and policy ----------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: bytes
    client_key: bytes
    identity: str


def make_pki(directory: Path, trust_domain: str, region: str, who: str) -> Pki:
    ca = CertificateAuthority.create(directory / "ca")
    server = ca.issue(
        spiffe_id=server_id(trust_domain, region), dns=("localhost",), ips=("127.0.0.1",), out=directory / "server"
    )
    identity = f"spiffe://{trust_domain}/admin" if who == "admin" else f"spiffe://{trust_domain}/svc/bench"
    client = ca.issue(spiffe_id=identity, out=directory / "client")
    assert server.cert_path and server.key_path
    return Pki(directory / "ca" / "ca.pem", server.cert_path, server.key_path, client.cert, client.key, identity)


def write_policy(path: Path, pki: Pki, trust_domain: str) -> Path:
    """A grant for the bench identity with every limit off (0), and the usual server grant."""
    admin = "admin = true\n" if pki.identity.endswith("/admin") else ""
    path.write_text(
        textwrap.dedent(f"""\
            [region]
            max_instances = 0

            [[grant]]
            identity = "{pki.identity}"
            {admin}register = ["{RESOLVED_SERVICE}", "{RESOLVED_SERVICE}.*"]
            read = ["*"]
            [grant.limits]
            writes_per_second = 0.0
            write_burst = 0
            streams = 0
            instances_per_service = 0
            instances = 0

            [[grant]]
            identity = "spiffe://{trust_domain}/discovery/server/*"
            replicate = true
            read = ["*"]
            """)
    )
    return path


def secure_credentials(pki: Pki) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(), private_key=pki.client_key, certificate_chain=pki.client_cert
    )


# --- processes ----------------------------------------------------------------------------


def start_server(
    name: str, settings: dict[str, Any], *, etcd: str, region: str, log_dir: Path, stack: contextlib.ExitStack
) -> ServerProcess:
    """A discovery server (``_servers.py discovery``) on a free port; stopped when ``stack`` closes."""
    address = f"127.0.0.1:{free_port()}"
    health = None
    if not settings.get("insecure", True):
        health = f"127.0.0.1:{free_port()}"  # the TLS port refuses a probe without a certificate
        settings = settings | {"health_listen": health}
    command = [sys.executable, str(RUNNER), "discovery", "--listen", address, "--etcd", etcd, "--region", region]
    command += ["--prefix", f"/bench-{name}/v1/", "--settings", json.dumps(settings)]
    child = ServerProcess(command, address, log_dir / f"{name}.log", name=f"{name} server", health_address=health)
    stack.callback(child.stop, 10.0)
    return child.start(90)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc (10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (not idle, iowait or steal)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4] - ticks[7]) / _CLK_TCK


# --- load ---------------------------------------------------------------------------------


@dataclass
class Phase:
    server: str
    op: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_sample: str = ""
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def server_us_per_call(self) -> float:
        return self.cpu["server"] / self.rate * 1e6 if self.rate else float("nan")


Call = Callable[[int], Awaitable[object]]


def make_calls(channel: grpc.aio.Channel, args: argparse.Namespace) -> dict[str, Call]:
    resolve = lookup_pb2_grpc.LookupStub(channel).Resolve
    register = registry_pb2_grpc.RegistryStub(channel).Register
    resolve_request = lookup_pb2.ResolveRequest(service=RESOLVED_SERVICE)
    register_requests = [
        registry_pb2.RegisterRequest(instance=bench_instance(REGISTER_SERVICE, f"r-{i:04d}", i, args.region))
        for i in range(args.pool)
    ]

    async def call_resolve(i: int) -> object:
        return await resolve(resolve_request, timeout=CALL_TIMEOUT)

    async def call_register(i: int) -> object:
        return await register(register_requests[i % len(register_requests)], timeout=CALL_TIMEOUT)

    return {"resolve": call_resolve, "register": call_register}


def bench_instance(service: str, instance_id: str, i: int, region: str) -> types_pb2.Instance:
    """A static record with a few tags and metadata entries, like a real registration."""
    return types_pb2.Instance(
        service=service,
        instance_id=instance_id,
        region=region,
        zone=f"{region}-{'abc'[i % 3]}",
        address=f"10.1.{(i >> 8) & 255}.{i & 255}:8080",
        metadata={"team": "bench", "build": f"b{i % 97}"},
        tags=["http", "v2"],
        weight=100,
        status=types_pb2.Status.SERVING,
        version="2.4.1",
    )


async def run_phase(server: str, op: str, call: Call, args: argparse.Namespace, pids: dict[str, int]) -> Phase:
    """``concurrency`` workers call in a loop; only calls completing in the window count."""
    phase = Phase(server, op)
    measuring = stopping = False

    def cpu() -> dict[str, float]:
        return {
            "client": time.process_time(),
            "server": cpu_seconds(pids[server]),
            "idle_server": cpu_seconds(pids["secure" if server == "insecure" else "insecure"]),
            "etcd": cpu_seconds(pids["etcd"]),
            "machine": machine_busy(),
        }

    async def worker(n: int) -> None:
        i = n
        while not stopping:
            i += args.concurrency  # spreads the workers over the register pool
            t0 = time.perf_counter()
            try:
                await call(i)
            except grpc.aio.AioRpcError as exc:
                if measuring:
                    phase.errors += 1
                    phase.error_sample = phase.error_sample or f"{exc.code().name}: {exc.details()}"
            else:
                if measuring:
                    phase.latencies.append(time.perf_counter() - t0)

    workers = [asyncio.create_task(worker(n)) for n in range(args.concurrency)]
    try:
        await asyncio.sleep(args.warmup)
        cpu0, t0 = cpu(), time.perf_counter()
        measuring = True
        await asyncio.sleep(args.duration)
        measuring = False
        cpu1, phase.seconds = cpu(), time.perf_counter() - t0
    finally:
        stopping = True
        await asyncio.gather(*workers, return_exceptions=True)
    used = {k: (cpu1[k] - cpu0[k]) / phase.seconds for k in cpu0}
    others = used.pop("machine") - sum(used.values())
    phase.cpu = {k: round(v, 3) for k, v in used.items()} | {"others": round(others, 3)}
    return phase


async def prepare(channels: dict[str, grpc.aio.Channel], args: argparse.Namespace) -> None:
    """Register the resolved service's instances on each server and wait until Resolve sees them."""
    for name, channel in channels.items():
        register = registry_pb2_grpc.RegistryStub(channel).Register
        for i in range(args.instances):
            instance = bench_instance(RESOLVED_SERVICE, f"i-{i:03d}", i, args.region)
            await register(registry_pb2.RegisterRequest(instance=instance), timeout=CALL_TIMEOUT)
        resolve = lookup_pb2_grpc.LookupStub(channel).Resolve
        deadline = time.monotonic() + 10
        while True:
            answer = await resolve(lookup_pb2.ResolveRequest(service=RESOLVED_SERVICE), timeout=CALL_TIMEOUT)
            if len(answer.endpoints) == args.instances:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} server resolves {len(answer.endpoints)} of {args.instances} instances")
            await asyncio.sleep(0.05)


async def handshakes(address: str, credentials: grpc.ChannelCredentials | None, count: int) -> list[float]:
    """Seconds from a new channel to the answer of its first Resolve, ``count`` times in a row.
    A local subchannel pool, so no connection is shared with another channel to the same server."""
    request = lookup_pb2.ResolveRequest(service=RESOLVED_SERVICE)
    options = [("grpc.use_local_subchannel_pool", 1)]
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        if credentials is None:
            channel = grpc.aio.insecure_channel(address, options=options)
        else:
            channel = grpc.aio.secure_channel(address, credentials, options=options)
        async with channel:
            await lookup_pb2_grpc.LookupStub(channel).Resolve(request, timeout=CALL_TIMEOUT)
            samples.append(time.perf_counter() - t0)
    return samples


async def measure(
    addresses: dict[str, str], credentials: grpc.ChannelCredentials, args: argparse.Namespace, pids: dict[str, int]
) -> tuple[list[Phase], dict[str, list[float]]]:
    channels = {
        "insecure": grpc.aio.insecure_channel(addresses["insecure"]),
        "secure": grpc.aio.secure_channel(addresses["secure"], credentials),
    }
    try:
        await prepare(channels, args)
        calls = {name: make_calls(channel, args) for name, channel in channels.items()}
        targets = [(op, server) for op in args.ops for server in SERVERS]
        phases: list[Phase] = []
        for repeat in range(args.repeats):
            shift = repeat % len(targets)
            for op, server in targets[shift:] + targets[:shift]:
                phase = await run_phase(server, op, calls[server][op], args, pids)
                phases.append(phase)
                log(
                    f"repeat {repeat + 1}/{args.repeats} {op:8s} {server:8s} {phase.rate:8.0f} calls/s"
                    f"  errors {phase.errors}  others {phase.cpu['others']:.2f} cores"
                )
        shakes: dict[str, list[float]] = {}
        if args.handshakes:
            for server in SERVERS:
                creds = credentials if server == "secure" else None
                shakes[server] = await handshakes(addresses[server], creds, args.handshakes)
            log(
                "new channel + first Resolve, median: "
                + ", ".join(f"{s} {statistics.median(v) * 1000:.2f} ms" for s, v in shakes.items())
            )
        return phases, shakes
    finally:
        for channel in channels.values():
            await channel.close()


# --- report -------------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def summarize(phases: list[Phase]) -> dict[str, Any]:
    latencies = sorted(x for p in phases for x in p.latencies)
    return {
        "rate": round(statistics.median(p.rate for p in phases), 1),
        "rates": [round(p.rate, 1) for p in phases],
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "calls": len(latencies),
        "errors": sum(p.errors for p in phases),
        "error_sample": next((p.error_sample for p in phases if p.error_sample), None),
        "server_cpu_us_per_call": round(statistics.median(p.server_us_per_call for p in phases), 1),
        "cpu_cores_used": {k: round(statistics.median(p.cpu[k] for p in phases), 2) for k in phases[0].cpu},
        "others_cores_per_repeat": [round(p.cpu["others"], 2) for p in phases],
    }


def report(
    phases: list[Phase], shakes: dict[str, list[float]], args: argparse.Namespace, extra: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": "security"}
    for op in args.ops:
        by_server = {s: [p for p in phases if p.op == op and p.server == s] for s in SERVERS}
        entry: dict[str, Any] = {s: summarize(ps) for s, ps in by_server.items()}
        entry["ratio_secure_to_insecure"] = ratio(entry["secure"]["rate"], entry["insecure"]["rate"])
        entry["ratio_per_repeat"] = [
            ratio(s.rate, i.rate) for s, i in zip(by_server["secure"], by_server["insecure"], strict=True)
        ]
        # The ratio if the serving process's CPU were the only limit: steadier on a shared machine.
        entry["ratio_by_server_cpu_per_call"] = ratio(
            entry["insecure"]["server_cpu_us_per_call"], entry["secure"]["server_cpu_us_per_call"]
        )
        entry["meets_target"] = (entry["ratio_secure_to_insecure"] or 0) >= TARGET_RATIO
        out[op] = entry
    out["ratio_target"] = TARGET_RATIO
    if shakes:
        medians = {s: statistics.median(v) * 1000 for s, v in shakes.items()}
        out["new_connection"] = {
            f"{s}_ms": {"p50": round(medians[s], 3), "p90": round(percentile(sorted(v), 0.9) * 1000, 3)}
            for s, v in shakes.items()
        } | {
            "tls_and_authorization_ms": round(medians["secure"] - medians["insecure"], 3),
            "samples": args.handshakes,
            "how": "new channel (local subchannel pool) + its first Resolve, one after another; "
            "secure median minus insecure median",
        }
    out["parameters"] = {
        k: getattr(args, k)
        for k in (
            "concurrency",
            "duration",
            "warmup",
            "repeats",
            "ops",
            "instances",
            "pool",
            "identity",
            "trust_domain",
            "region",
        )
    }
    out.update(extra)
    return out


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    wall = time.perf_counter()
    machine = machine_info()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="security-bench-")))
        etcd = EtcdProcess(tmp / "etcd")
        stack.callback(etcd.stop)
        etcd.start()
        pki = make_pki(tmp / "pki", args.trust_domain, args.region, args.identity)
        audit = tmp / "audit.jsonl"
        secure_settings = {
            "insecure": False,
            "tls_cert": str(pki.server_cert),
            "tls_key": str(pki.server_key),
            "tls_client_ca": str(pki.ca),
            "trust_domain": args.trust_domain,
            "policy_file": str(write_policy(tmp / "policy.toml", pki, args.trust_domain)),
            "audit_log": str(audit),
        }
        t0 = time.perf_counter()
        insecure = start_server(
            "insecure", {"insecure": True}, etcd=etcd.endpoint, region=args.region, log_dir=tmp, stack=stack
        )
        secure = start_server(
            "secure", secure_settings, etcd=etcd.endpoint, region=args.region, log_dir=tmp, stack=stack
        )
        log(
            f"etcd {etcd.endpoint}; insecure server :{insecure.port} (pid {insecure.pid}), "
            f"secure server :{secure.port} (pid {secure.pid}) as {pki.identity}"
        )
        setup = {"servers_start_seconds": round(time.perf_counter() - t0, 2)}
        addresses = {"insecure": f"127.0.0.1:{insecure.port}", "secure": f"127.0.0.1:{secure.port}"}
        pids = {"insecure": insecure.pid, "secure": secure.pid, "etcd": etcd.pid}
        phases, shakes = asyncio.run(measure(addresses, secure_credentials(pki), args, pids))
        audit_lines = sum(1 for _ in audit.open()) if audit.exists() else 0
        setup["audit_log_lines"] = audit_lines
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = report(phases, shakes, args, {"machine": machine, "setup": setup, "code": code_version()})
    out["wall_seconds"] = round(time.perf_counter() - wall, 1)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="security_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (default 64)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per phase (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each phase (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the phases (default 3)")
    parser.add_argument(
        "--ops",
        type=lambda s: [t for t in s.split(",") if t],
        default=list(OPS),
        help="comma-separated subset of resolve,register (default both)",
    )
    parser.add_argument("--instances", type=int, default=5, help="instances of the resolved service (default 5)")
    parser.add_argument("--pool", type=int, default=256, help="instance ids Register cycles through (default 256)")
    parser.add_argument(
        "--identity",
        choices=("svc", "admin"),
        default="svc",
        help="client certificate: spiffe://TD/svc/bench (default) or spiffe://TD/admin (admin grant)",
    )
    parser.add_argument("--trust-domain", default="bench.local", help="SPIFFE trust domain (default bench.local)")
    parser.add_argument("--region", default="bench", help="the servers' region (default bench)")
    parser.add_argument(
        "--handshakes", type=int, default=50, help="new channel + first Resolve samples per server (0: skip)"
    )
    parser.add_argument("--output", metavar="FILE", help="also write the JSON here")
    args = parser.parse_args(argv)
    if set(args.ops) - set(OPS) or not args.ops:
        parser.error(f"--ops: choose from {','.join(OPS)}")
    if args.concurrency < 1 or args.repeats < 1 or args.duration <= 0 or args.pool < 1 or args.instances < 1:
        parser.error("--concurrency, --repeats, --pool, --instances and --duration must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return print_figures(lambda: run(args), args.output)


if __name__ == "__main__":
    sys.exit(main())
