"""`discovery dev` and the DevCluster API: real etcd and server processes on 127.0.0.1.

Few cluster starts, many assertions each: a start costs one to three seconds of a 2-core machine.
Clusters serve mTLS (what `discovery dev` does by default) unless a test is about --insecure.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import ssl
import sys
import tty
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery.devtools.cluster import DevCluster
from discovery.devtools.etcd import EtcdProcess
from discovery.devtools.process import free_ports
from discovery.security.certs import server_id
from discovery.security.policy import Policy
from discovery_pb.v1 import admin_pb2, admin_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.support import dnsq
from tests.support.helpers import CALL_TIMEOUT, eventually, instance

# Whole `discovery dev` clusters of processes, about 30 s together: not in `make test-fast`.
pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "discovery"]
REGIONS = ["us-east", "eu-west", "ap-south"]
ADDRESS = re.compile(r"127\.0\.0\.1:\d+")
STARTED = re.compile(r"^started (\S+) (\S+) pid (\d+) on (\S+)$")


# --- process helpers ---------------------------------------------------------------------------


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


def state(pid: int) -> str:
    """The kernel's one-letter state (R, S, T stopped, Z zombie...), or "" once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat.rpartition(")")[2].split()[0]  # the name in parentheses may hold spaces


def alive(pid: int) -> bool:
    return state(pid) not in ("", "Z", "X")


def gone(pids: list[int]) -> bool:
    return not [pid for pid in pids if alive(pid)]


def is_etcd(pid: int, address: str) -> bool:
    argv = cmdline(pid)
    return Path(argv[0]).name == "etcd" and f"--listen-client-urls=http://{address}" in argv


def is_server(pid: int, region: str, address: str) -> bool:
    argv = cmdline(pid)
    return (
        argv[1:4] == ["-m", "discovery", "serve"]
        and _flag(argv, "--region") == region
        and (_flag(argv, "--listen") == _flag(argv, "--advertise") == address)
    )


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def peer_flags(pid: int) -> list[str]:
    return [a for a in cmdline(pid) if a.startswith("--peer")]


def expected_peers(cluster: dict[str, Any], region: str) -> list[str]:
    """Every other region, in the order of the cluster (the order of --regions), with all its
    servers: through the fault proxy's routes when the cluster has them."""
    routes = cluster.get("routes")
    return [
        f"--peer={name}={','.join(routes[region][name] if routes else (s['address'] for s in r['servers']))}"
        for name, r in cluster["regions"].items()
        if name != region
    ]


def all_pids(cluster: dict[str, Any]) -> list[int]:
    return [p["pid"] for r in cluster["regions"].values() for role in ("servers", "etcd") for p in r[role]]


def credentials(cluster: dict[str, Any], certificate: bool = True) -> grpc.ChannelCredentials | None:
    """The admin's credentials from cluster.json's ``tls`` (only trusting its CA, without
    ``certificate``); None for an --insecure cluster."""
    tls = cluster.get("tls")
    if tls is None:
        return None
    if not certificate:
        return grpc.ssl_channel_credentials(Path(tls["ca"]).read_bytes())
    return grpc.ssl_channel_credentials(*(Path(tls[key]).read_bytes() for key in ("ca", "key", "cert")))


def channel(cluster: dict[str, Any], address: str) -> grpc.aio.Channel:
    creds = credentials(cluster)
    return grpc.aio.insecure_channel(address) if creds is None else grpc.aio.secure_channel(address, creds)


async def status_region(cluster: dict[str, Any], address: str) -> str:
    """The region a server of ``cluster`` (its cluster.json) says it serves, asked as the admin."""
    async with channel(cluster, address) as ch:
        response = await admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)
        return str(response.region)


async def plaintext_health(address: str) -> int:
    """gRPC health on a server's plaintext health port: no certificate at all."""
    async with grpc.aio.insecure_channel(address) as ch:
        request = health_pb2.HealthCheckRequest()
        return int((await health_pb2_grpc.HealthStub(ch).Check(request, timeout=CALL_TIMEOUT)).status)


async def refused_without_certificate(cluster: dict[str, Any], address: str) -> None:
    """A client that trusts the CA but presents no certificate, and a plaintext client, are
    both refused in the handshake: UNAVAILABLE, as every refused handshake reaches a client."""
    without = credentials(cluster, certificate=False)
    assert without is not None
    for ch in (grpc.aio.secure_channel(address, without), grpc.aio.insecure_channel(address)):
        async with ch:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value


def clean_env() -> dict[str, str]:
    """This environment without any DISCOVERY_ setting, as a fresh shell would have it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DISCOVERY_")}


async def cli_with_env(env_file: Path, *commands: str) -> tuple[int | None, str, str]:
    """`source env_file`, then each `discovery` command in turn (stopping at a failure)."""
    python = shlex.quote(sys.executable)
    script = " && ".join([f"source {shlex.quote(str(env_file))}", *(f"{python} -m discovery {c}" for c in commands)])
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, env=clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await finish(proc)
    return proc.returncode, out, err


# --- the command ----------------------------------------------------------------------------------


async def start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def read_until(proc: asyncio.subprocess.Process, done: Callable[[str], bool], timeout: float) -> list[str]:
    """Lines of stdout up to and including the first for which ``done`` holds."""
    assert proc.stdout is not None
    return await lines_until(proc.stdout, done, timeout)


async def lines_until(reader: asyncio.StreamReader, done: Callable[[str], bool], timeout: float) -> list[str]:
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while not lines or not done(lines[-1]):
            line = await reader.readline()
            assert line, f"output ended before the expected line; so far: {lines}"
            lines.append(line.decode().rstrip("\n"))
    return lines


async def finish(proc: asyncio.subprocess.Process, timeout: float = 30.0) -> tuple[str, str]:
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    return (out or b"").decode(), (err or b"").decode()


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """`discovery dev` processes of a test, killed at teardown if the test left them running."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # SIGTERM, not SIGKILL: it must take its children along
            await finish(proc)


async def test_dev_default_regions_cluster_json_pids_peers_then_sigterm_leaves_nothing(
    tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    state_dir = tmp_path / "state"
    proc = await start("dev", "--base-port", "0", "--state-dir", str(state_dir))
    processes.append(proc)
    lines = await read_until(proc, lambda line: line == "ready", timeout=60)

    cluster = json.loads((state_dir / "cluster.json").read_text())
    assert set(cluster) == {"regions", "state_dir", "tls", "control", "routes"}
    assert Path(cluster["state_dir"]) == state_dir.resolve() and ADDRESS.fullmatch(cluster["control"])
    assert f"control: {cluster['control']}" in lines
    assert list(cluster["regions"]) == REGIONS
    for name, region in cluster["regions"].items():
        assert set(region) == {"servers", "etcd"} and len(region["servers"]) == len(region["etcd"]) == 1
        for entry in region["servers"] + region["etcd"]:
            assert ADDRESS.fullmatch(entry["address"]) and isinstance(entry["pid"], int), entry
        (server,), (member,) = region["servers"], region["etcd"]
        assert set(server) == {"address", "pid", "health", "dns", "http"} and set(member) == {"address", "pid"}
        assert is_server(server["pid"], name, server["address"]), cmdline(server["pid"])
        assert is_etcd(member["pid"], member["address"]), cmdline(member["pid"])
        assert peer_flags(server["pid"]) == expected_peers(cluster, name)
        assert _flag(cmdline(server["pid"]), "--etcd") == member["address"]
        assert await status_region(cluster, server["address"]) == name
    health = {s["health"] for r in cluster["regions"].values() for s in r["servers"]}
    dns_ports = {s["dns"] for r in cluster["regions"].values() for s in r["servers"]}
    listeners = {e["address"] for e in _entries(cluster)} | health | dns_ports
    for address in dns_ports:  # DNS answers on every server, UDP and TCP (docs/dns.md)
        for transport in ("+notcp", "+tcp"):
            soa = await dnsq.dig(int(address.rpartition(":")[2]), transport, "+short", "discovery.", "SOA")
            assert soa.startswith("ns.discovery. hostmaster.discovery. "), soa
    http = {s["http"] for r in cluster["regions"].values() for s in r["servers"]}
    assert len(listeners | http) == 15, "every listener has a port of its own"
    routes = [a for targets in cluster["routes"].values() for addresses in targets.values() for a in addresses]
    assert len(routes) == 6 and not set(routes) & {e["address"] for e in _entries(cluster)}

    pids = all_pids(cluster)
    started = [int(m.group(3)) for line in lines if (m := STARTED.match(line))]
    assert sorted(started) == sorted(pids), lines
    assert f"cluster.json: {state_dir.resolve() / 'cluster.json'}" in lines
    first = lines.index(f"state dir: {state_dir.resolve()}")
    table = "\n".join(lines[first + 1 : next(i for i, line in enumerate(lines) if line.startswith("mtls:"))])
    assert all(str(pid) in table for pid in pids) and all(a in table for a in health | dns_ports | http)
    assert all(e["address"] in table for e in _entries(cluster))
    assert max(len(line) for line in table.splitlines()) <= 80, table

    await _secure_by_default(state_dir.resolve(), cluster, lines)

    proc.send_signal(signal.SIGTERM)
    out, err = await finish(proc)
    assert proc.returncode == 0, err
    assert out == "stopping\n" and err == ""
    assert gone(pids), [(pid, state(pid)) for pid in pids]
    assert not state_dir.exists(), "the state dir goes unless --keep"


def _entries(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for r in cluster["regions"].values() for role in ("servers", "etcd") for e in r[role]]


async def _secure_by_default(state_dir: Path, cluster: dict[str, Any], lines: list[str]) -> None:
    """mTLS on every server from the CA in STATE_DIR/tls; the plaintext health ports answer
    anyone, the TLS ports refuse a client without a certificate; env.sh makes the CLI work
    as the admin; the policy parses; writes land in the audit log."""
    tls_dir = state_dir / "tls"
    assert cluster["tls"] == {
        "ca": str(tls_dir / "ca.pem"),
        "cert": str(tls_dir / "admin.pem"),
        "key": str(tls_dir / "admin-key.pem"),
        "trust_domain": "discovery.local",
    }
    assert (tls_dir / "ca-key.pem").stat().st_mode & 0o077 == 0, "the CA key is its owner's alone"
    assert (
        "mtls: CA tls/ca.pem (new), policy policy.toml" in lines
        and "admin: spiffe://discovery.local/admin (tls/admin.pem)" in lines
    )
    assert f"clients: source {state_dir / 'env.sh'}" in lines
    hint = lines.index("a service's certificate (in the state dir):")
    assert lines[hint + 1 : hint + 3] == [
        "  discovery certs issue --ca-dir tls --out NAME \\",
        "      --id spiffe://discovery.local/svc/NAME",
    ]
    assert all(len(line) <= 80 for line in lines[hint - 4 : hint + 3] if str(state_dir) not in line), lines
    for name, region in cluster["regions"].items():
        (server,) = region["servers"]
        argv = cmdline(server["pid"])
        assert "--insecure" not in argv
        assert {flag: _flag(argv, flag) for flag in SECURITY_FLAGS} == {
            "--tls-cert": str(tls_dir / f"server-{name}.pem"),
            "--tls-key": str(tls_dir / f"server-{name}-key.pem"),
            "--tls-client-ca": cluster["tls"]["ca"],
            "--trust-domain": "discovery.local",
            "--policy": str(state_dir / "policy.toml"),
            "--audit-log": str(state_dir / name / "audit-0.jsonl"),
            "--health-listen": server["health"],
        }
        cert = x509.load_pem_x509_certificate((tls_dir / f"server-{name}.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [server_id("discovery.local", name)]
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert await plaintext_health(server["health"]) == health_pb2.HealthCheckResponse.SERVING
        await refused_without_certificate(cluster, server["address"])
        assert _flag(argv, "--http") == server["http"]
        assert await https_status_region(tls_dir, server["http"]) == name

    # The admin as PKCS#12 for a browser: the same identity, under the documented password.
    from cryptography.hazmat.primitives.serialization import pkcs12

    bundle = pkcs12.load_pkcs12((state_dir / "admin.p12").read_bytes(), b"discovery")
    assert bundle.cert is not None and bundle.key is not None
    assert bundle.cert.certificate.public_bytes(serialization.Encoding.PEM) == (tls_dir / "admin.pem").read_bytes()
    assert [c.certificate.subject for c in bundle.additional_certs] == [
        x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes()).subject
    ]
    assert any(line.startswith("browser: import admin.p12 (password discovery)") for line in lines)

    policy = Policy.load(state_dir / "policy.toml")
    admin = policy.grants_for("spiffe://discovery.local/admin")
    assert (
        admin is not None and admin.admin and admin.may_register("payments") and admin.limits.writes_per_second >= 1000
    )
    web = policy.grants_for("spiffe://discovery.local/svc/web")
    assert web is not None and web.may_register("web.canary") and not web.may_register("payments")
    assert web.may_read("payments") and not web.admin
    for name in REGIONS:
        peer = policy.grants_for(server_id("discovery.local", name))
        assert peer is not None and peer.replicate and peer.may_read_all and not peer.admin
    assert policy.grants_for("spiffe://discovery.local/someone") is None

    env = (state_dir / "env.sh").read_text()
    us_east = cluster["regions"]["us-east"]["servers"][0]["address"]
    assert f"export DISCOVERY_SERVER={us_east}\n" in env and "export DISCOVERY_TLS_CERT=" in env
    code, out, err = await cli_with_env(
        state_dir / "env.sh", "register web 127.0.0.1:8080 --id web-1", "resolve web --json", "status --json"
    )
    assert code == 0, err
    assert '"region": "us-east"' in out and "127.0.0.1:8080" in out
    audit = (state_dir / "us-east" / "audit-0.jsonl").read_text()
    assert "spiffe://discovery.local/admin" in audit and "BEGIN" not in audit

    # Trusting the CA but with no certificate of its own, the CLI is refused (exit 4) and says
    # why; with no settings at all it points at env.sh.
    only_ca = {**clean_env(), "DISCOVERY_TLS_CA": cluster["tls"]["ca"]}
    code, _, err = await cli(["status", "--server", us_east], only_ca)
    assert code == 4 and "certificate" in err, err
    code, _, err = await cli(["status", "--server", us_east], clean_env())
    assert code != 0 and "env.sh" in err, err


async def https_status_region(tls_dir: Path, address: str) -> str:
    """GET /v1/status over HTTPS as the admin; the region it names."""
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    ctx.load_cert_chain(tls_dir / "admin.pem", tls_dir / "admin-key.pem")
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.get(f"https://{address}/v1/status", timeout=aiohttp.ClientTimeout(total=10)) as response,
    ):
        assert response.status == 200, await response.text()
        return str((await response.json())["region"])


async def cli(args: list[str], env: dict[str, str]) -> tuple[int | None, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await finish(proc)
    return proc.returncode, out, err


SECURITY_FLAGS = (
    "--tls-cert",
    "--tls-key",
    "--tls-client-ca",
    "--trust-domain",
    "--policy",
    "--audit-log",
    "--health-listen",
)


async def test_dev_insecure_serves_plaintext_as_before(
    tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    state_dir = tmp_path / "state"
    proc = await start("dev", *SMALL, "--insecure", "--state-dir", str(state_dir))
    processes.append(proc)
    lines = await read_until(proc, lambda line: line == "ready", timeout=60)
    cluster = json.loads((state_dir / "cluster.json").read_text())
    assert set(cluster) == {"regions", "state_dir", "control", "routes"}
    assert not (state_dir / "tls").exists() and not (state_dir / "policy.toml").exists()
    assert "insecure: plaintext, no identities: anyone who can reach a port may do anything" in lines
    for name, region in cluster["regions"].items():
        (server,) = region["servers"]
        argv = cmdline(server["pid"])
        assert set(server) == {"address", "pid", "dns", "http"} and "--insecure" in argv
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{server['http']}/v1/services", timeout=aiohttp.ClientTimeout(total=10)) as response,
        ):
            assert response.status == 200 and (await response.json())["region"] == name
        assert not [flag for flag in SECURITY_FLAGS if flag in argv]
        assert await status_region(cluster, server["address"]) == name
    env = (state_dir / "env.sh").read_text()
    assert "export DISCOVERY_INSECURE=1\n" in env and "unset DISCOVERY_TLS_CA" in env
    code, out, err = await cli_with_env(state_dir / "env.sh", "status --json")
    assert code == 0 and '"region": "a"' in out, err

    proc.send_signal(signal.SIGTERM)
    out, err = await finish(proc)
    assert (proc.returncode, out, err) == (0, "stopping\n", "")
    await nothing_left(cluster, timeout=0)
    assert not state_dir.exists()


async def test_dev_sigterm_during_startup_stops_everything_started(
    tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    state_dir = tmp_path / "state"
    proc = await start("dev", "--base-port", "0", "--etcd-members", "3", "--state-dir", str(state_dir))
    processes.append(proc)
    first = await read_until(proc, lambda line: line.startswith("started"), timeout=30)
    proc.send_signal(signal.SIGTERM)
    out, err = await finish(proc)
    assert proc.returncode == 0, err
    lines = first + out.splitlines()
    assert "ready" not in lines and lines[-1] == "stopping", lines
    # Every process is announced as it starts, so these are all the pids there were.
    pids = [int(m.group(3)) for line in lines if (m := STARTED.match(line))]
    assert pids and gone(pids), [(pid, state(pid)) for pid in pids]
    assert not state_dir.exists()


async def test_dev_refuses_bad_flags_and_a_busy_port(tmp_path: Path) -> None:
    async def run(*args: str) -> tuple[int | None, str]:
        proc = await start("dev", *args)
        _, err = await finish(proc, timeout=20)
        return proc.returncode, err

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        results = await asyncio.gather(
            run("--etcd-members", "2"),
            run("--regions", "us-east,us-east"),
            run("--regions", "us-east", "--base-port", str(port), "--state-dir", str(tmp_path / "s")),
            run("--trust-domain", "Not A Domain"),
        )
    (members_code, members_err), (twice_code, twice_err), (busy_code, busy_err), (domain_code, domain_err) = results
    assert members_code == 2 and "--etcd-members" in members_err
    assert domain_code == 2 and "--trust-domain: 'Not A Domain' is not a trust domain" in domain_err, domain_err
    assert twice_code == 2 and "named twice" in twice_err
    assert busy_code == 1 and f"port {port}" in busy_err and "in use" in busy_err, busy_err
    assert not (tmp_path / "s").exists(), "nothing is left of a start that failed"


# --- the API the drills use --------------------------------------------------------------------


@pytest.fixture
async def clusters() -> AsyncIterator[list[DevCluster]]:
    running: list[DevCluster] = []
    yield running
    for cluster in running:
        await asyncio.to_thread(cluster.stop)


async def test_api_three_member_etcd_leader_kill_server_restart_pause_and_keep(
    tmp_path: Path, clusters: list[DevCluster]
) -> None:
    state_dir = tmp_path / "kept"
    cluster = DevCluster(
        regions=("eu-west", "us-east"),
        servers_per_region=2,
        etcd_members=3,
        state_dir=state_dir,
        keep=True,
        server_args=("--resume-grace", "2"),
        mtls=True,
        # The seam for a fault proxy: eu-west dials us-east by another name for the same place.
        peer_via=lambda src, dst, address: address.replace("127.0.0.1", "localhost") if src == "eu-west" else address,
    )
    clusters.append(cluster)
    async with asyncio.timeout(60):
        await asyncio.to_thread(cluster.start, lambda line: None)
    described = json.loads(cluster.state_file.read_text())
    assert described == cluster.describe() and list(described["regions"]) == ["eu-west", "us-east"]

    # Three members per region, one cluster per region: same cluster id and leader within it.
    cluster_ids = set()
    for name in ("eu-west", "us-east"):
        region = described["regions"][name]
        assert len(region["etcd"]) == 3 and len(region["servers"]) == 2
        for i, member in enumerate(region["etcd"]):
            assert is_etcd(member["pid"], member["address"])
            assert "--initial-cluster-state=new" in cmdline(member["pid"])
            assert cmdline(member["pid"]).count(f"--name=etcd-{i}") == 1
        statuses = [m.status() for m in cluster.region(name).etcd.members]
        assert len({s["header"]["cluster_id"] for s in statuses}) == 1
        assert len({s["leader"] for s in statuses}) == 1
        cluster_ids.add(statuses[0]["header"]["cluster_id"])
        for server in region["servers"]:
            argv = cmdline(server["pid"])
            assert is_server(server["pid"], name, server["address"]) and argv[-2:] == ["--resume-grace", "2"]
            assert _flag(argv, "--etcd") == ",".join(m["address"] for m in region["etcd"])
    assert len(cluster_ids) == 2, "each region has an etcd cluster of its own"
    east, west = (",".join(s["address"] for s in described["regions"][r]["servers"]) for r in ("us-east", "eu-west"))
    for server in described["regions"]["us-east"]["servers"]:
        assert peer_flags(server["pid"]) == [f"--peer=eu-west={west}"]
    for server in described["regions"]["eu-west"]["servers"]:
        assert peer_flags(server["pid"]) == [f"--peer=us-east={east.replace('127.0.0.1', 'localhost')}"]

    await _writes_survive_the_etcd_leader_dying(cluster)
    await _a_killed_server_restarts_on_its_address(cluster)
    await _a_paused_region_is_stopped_then_resumed(cluster)

    pids = [pid for region in cluster.running for pid in region.pids()]
    await asyncio.to_thread(cluster.stop)
    assert gone(pids), [(pid, state(pid)) for pid in pids]
    assert (state_dir / "cluster.json").is_file() and (state_dir / "us-east" / "etcd-0.log").is_file(), "kept"


async def _writes_survive_the_etcd_leader_dying(cluster: DevCluster) -> None:
    region = cluster.region("us-east")
    leader = await asyncio.to_thread(cluster.etcd_leader, "us-east")
    old_pid = region.etcd.members[leader].pid
    async with channel(cluster.describe(), region.servers[0].address) as ch:
        registry = registry_pb2_grpc.RegistryStub(ch)
        await registry.Register(_register("before"), timeout=CALL_TIMEOUT)
        cluster.kill_etcd_member("us-east", leader)
        assert not alive(old_pid)

        async def write() -> bool:
            try:
                await registry.Register(_register("after"), timeout=3)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
                return False
            return True

        await eventually(write, timeout=20, interval=0.1)
    new_leader = await asyncio.to_thread(cluster.etcd_leader, "us-east")
    assert new_leader != leader
    new_pid = await asyncio.to_thread(cluster.restart_etcd_member, "us-east", leader)
    assert new_pid != old_pid and is_etcd(new_pid, region.etcd.members[leader].endpoint)
    assert json.loads(cluster.state_file.read_text())["regions"]["us-east"]["etcd"][leader]["pid"] == new_pid


def _register(instance_id: str) -> registry_pb2.RegisterRequest:
    return registry_pb2.RegisterRequest(instance=instance("web", "10.0.0.2:80", instance_id=instance_id))


async def _a_killed_server_restarts_on_its_address(cluster: DevCluster) -> None:
    server = cluster.region("eu-west").servers[1]
    old_pid = server.pid
    cluster.kill_server("eu-west", 1)
    assert not alive(old_pid)
    new_pid = await asyncio.to_thread(cluster.restart_server, "eu-west", 1)
    assert new_pid != old_pid and is_server(new_pid, "eu-west", server.address)
    assert await status_region(cluster.describe(), server.address) == "eu-west"
    assert json.loads(cluster.state_file.read_text())["regions"]["eu-west"]["servers"][1]["pid"] == new_pid


async def _a_paused_region_is_stopped_then_resumed(cluster: DevCluster) -> None:
    paused, other = cluster.region("eu-west").pids(), cluster.region("us-east").pids()
    assert len(paused) == 5
    cluster.pause_region("eu-west")
    try:
        # pause_region returns once every thread has stopped: no wait here.
        assert [state(pid) for pid in paused] == ["T"] * 5 and "T" not in [state(pid) for pid in other]
    finally:
        cluster.resume_region("eu-west")
    assert "T" not in [state(pid) for pid in paused]
    assert await status_region(cluster.describe(), cluster.region("eu-west").servers[0].address) == "eu-west"


def test_etcd_process_alone_keeps_its_single_member_flags(tmp_path: Path) -> None:
    """The fixtures' EtcdProcess: a single-member cluster, no bootstrap token, same flags as ever."""
    member = EtcdProcess(tmp_path / "etcd").start()
    try:
        argv = cmdline(member.pid)
        assert f"--initial-cluster=etcd={member.peer_url}" in argv
        for flag in ("--grpc-keepalive-min-time=500ms", "--unsafe-no-fsync"):
            assert flag in argv
        assert not [a for a in argv if a.startswith("--initial-cluster-")]
        assert member.is_leader() and os.getsid(member.pid) == member.pid  # its own session
    finally:
        member.stop()


# --- however `discovery dev` dies, nothing it started outlives it ------------------------------


SMALL = ("--regions", "a,b", "--base-port", "0")


def port_free(address: str) -> bool:
    """Whether the port can be listened on again (a connection of the dead process lingering
    in TIME_WAIT does not count, as for the servers, which bind with SO_REUSEADDR)."""
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
        return True


async def nothing_left(cluster: dict[str, Any], timeout: float = 20.0) -> None:
    """Every process of ``cluster`` (its cluster.json) exits and frees its port within ``timeout``."""
    pids, addresses = all_pids(cluster), [e["address"] for e in _entries(cluster)]

    async def probe() -> bool:
        survivors = [(pid, state(pid), cmdline(pid)[:4]) for pid in pids if alive(pid)]
        assert not survivors, f"still running: {survivors}"
        busy = [a for a in addresses if not port_free(a)]
        assert not busy, f"ports still held: {busy}"
        return True

    await eventually(probe, timeout=timeout, interval=0.05)


async def test_dev_sigkill_takes_every_process_along(
    tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    state_dir = tmp_path / "state"
    proc = await start("dev", *SMALL, "--state-dir", str(state_dir))
    processes.append(proc)
    await read_until(proc, lambda line: line == "ready", timeout=60)
    cluster = json.loads((state_dir / "cluster.json").read_text())
    assert all(alive(pid) for pid in all_pids(cluster))
    ca = (state_dir / "tls" / "ca.pem").read_bytes()

    proc.kill()  # no handler runs: only the kernel can take the children along
    await finish(proc)
    assert proc.returncode == -signal.SIGKILL
    await nothing_left(cluster)

    # A killed process removes no files: the next start says so, and --replace clears them.
    assert (state_dir / "cluster.json").is_file()
    again = await start("dev", *SMALL, "--state-dir", str(state_dir))
    _, err = await finish(again)
    assert again.returncode == 2 and "already holds a, b, cluster.json" in err and "--replace" in err, err
    assert "none of its processes is running" in err
    replacing = await start("dev", *SMALL, "--state-dir", str(state_dir), "--replace")
    processes.append(replacing)
    lines = await read_until(replacing, lambda line: line == "ready", timeout=60)
    assert f"replacing the earlier cluster of state dir {state_dir.resolve()}: removed a, b, cluster.json" in lines
    new = json.loads((state_dir / "cluster.json").read_text())
    assert set(all_pids(new)).isdisjoint(all_pids(cluster))
    # The CA is used again, so certificates issued from it (and a shell's env.sh) still work.
    assert (state_dir / "tls" / "ca.pem").read_bytes() == ca and new["tls"] == cluster["tls"]
    assert any(line.startswith("mtls: CA tls/ca.pem (kept from an earlier run)") for line in lines), lines
    assert await status_region(new, new["regions"]["a"]["servers"][0]["address"]) == "a"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
async def test_dev_sigint_and_sighup_stop_everything_like_sigterm(
    sig: signal.Signals, tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    state_dir = tmp_path / "state"
    proc = await start("dev", *SMALL, "--state-dir", str(state_dir))
    processes.append(proc)
    await read_until(proc, lambda line: line == "ready", timeout=60)
    cluster = json.loads((state_dir / "cluster.json").read_text())

    proc.send_signal(sig)
    out, err = await finish(proc)
    assert (proc.returncode, out, err) == (0, "stopping\n", "")
    await nothing_left(cluster, timeout=0)  # stopped before it exited: nothing to wait for
    assert not state_dir.exists(), "a full stop: the state dir goes"


# A terminal of our own: the child becomes a session leader with the pty as its controlling
# terminal (as a shell's job is), then turns into `discovery dev`, same pid.
ON_A_TERMINAL = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(1, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'discovery', *sys.argv[1:]])"
)


async def test_dev_terminal_closed_sighup_and_no_terminal_to_print_to_still_stops_everything(
    tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    state_dir = tmp_path / "state"
    master, terminal = os.openpty()
    tty.setraw(terminal)  # lines end in "\n", as on a pipe
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ON_A_TERMINAL, "dev", *SMALL, "--state-dir", str(state_dir),
        stdin=asyncio.subprocess.DEVNULL, stdout=terminal, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    processes.append(proc)
    os.close(terminal)
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(master, "rb", buffering=0)
    )
    try:
        await lines_until(reader, lambda line: line == "ready", timeout=60)
        cluster = json.loads((state_dir / "cluster.json").read_text())
    finally:
        # Closing the last descriptor of the master hangs the terminal up: the kernel sends
        # SIGHUP to its session, and every later write of `discovery dev` to it fails (EIO).
        transport.close()
    _, err = await finish(proc)
    assert proc.returncode == 0 and err == "", err
    await nothing_left(cluster, timeout=0)
    assert not state_dir.exists(), "a full stop: the state dir goes"


# --- an earlier cluster in the way: refused, or replaced ----------------------------------------


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def named(err: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"pid (\d+) \(", err)}


async def test_dev_refuses_to_start_where_a_cluster_runs_and_names_its_processes(
    tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    state_dir = tmp_path / "state"
    first = await start("dev", *SMALL, "--state-dir", str(state_dir))
    processes.append(first)
    await read_until(first, lambda line: line == "ready", timeout=60)
    before = (state_dir / "cluster.json").read_text()
    cluster = json.loads(before)

    second = await start("dev", *SMALL, "--state-dir", str(state_dir))
    out, err = await finish(second, timeout=30)
    assert second.returncode == 2 and out == "", (out, err)
    assert err.startswith(f"discovery dev: error: the cluster of state dir {state_dir.resolve()} is still running: ")
    assert named(err) == {first.pid, *all_pids(cluster)}, err
    assert f"pid {first.pid} (discovery dev)" in err
    for name, region in cluster["regions"].items():
        (server,), (member,) = region["servers"], region["etcd"]
        assert f"pid {server['pid']} ({name} server-0 at {server['address']})" in err
        assert f"pid {member['pid']} ({name} etcd-0 at {member['address']})" in err
    assert "add --replace" in err and len(err.splitlines()) == 1

    # The first cluster is untouched: same processes, same file, still serving.
    assert first.returncode is None and all(alive(pid) for pid in all_pids(cluster))
    assert (state_dir / "cluster.json").read_text() == before
    for name, region in cluster["regions"].items():
        assert await status_region(cluster, region["servers"][0]["address"]) == name

    help_out, _ = await finish(await start("dev", "--help"))
    assert "--replace" in help_out and "exits 2" in help_out
    assert "--insecure" in help_out and "--trust-domain" in help_out and "env.sh" in help_out


async def test_dev_replace_stops_the_running_cluster_then_starts_in_its_place(
    tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    state_dir = tmp_path / "state"
    first = await start("dev", *SMALL, "--state-dir", str(state_dir))
    processes.append(first)
    await read_until(first, lambda line: line == "ready", timeout=60)
    old = json.loads((state_dir / "cluster.json").read_text())

    second = await start("dev", *SMALL, "--state-dir", str(state_dir), "--replace")
    processes.append(second)
    lines = await read_until(second, lambda line: line == "ready", timeout=90)
    replacing = [line for line in lines if line.startswith("replacing")]
    assert len(replacing) == 1 and named(replacing[0]) == {first.pid, *all_pids(old)}, lines

    # The first `discovery dev` got SIGTERM and stopped its own cluster, as on Ctrl-C.
    out, err = await finish(first)
    assert first.returncode == 0 and out.endswith("stopping\n") and err == "", (out, err)
    assert gone(all_pids(old)), [(pid, state(pid)) for pid in all_pids(old)]
    new = json.loads((state_dir / "cluster.json").read_text())
    assert set(all_pids(new)).isdisjoint(all_pids(old))
    for name, region in new["regions"].items():
        assert await status_region(new, region["servers"][0]["address"]) == name


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports, for a fixed --base-port."""
    for _ in range(100):
        (first,) = free_ports(1)
        if first + count <= 65535 and all(port_free(f"127.0.0.1:{p}") for p in range(first, first + count)):
            return first
    raise AssertionError(f"no {count} consecutive free ports")


async def test_dev_default_state_dir_finds_the_cluster_on_its_ports_refuses_then_replaces(
    tmp_path: Path, processes: list[asyncio.subprocess.Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Default state dirs go to the temp dir: this test's own, so no other cluster is found.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    base = consecutive_free_ports(2)
    fixed = ("--regions", "a,b", "--base-port", str(base))
    first = await start("dev", *fixed)
    processes.append(first)
    lines = await read_until(first, lambda line: line == "ready", timeout=60)
    state_file = Path(next(line for line in lines if line.startswith("cluster.json: ")).partition(": ")[2])
    assert state_file.parent.parent == tmp.resolve()
    old = read_json(state_file)

    second = await start("dev", *fixed)
    _, err = await finish(second, timeout=30)
    assert second.returncode == 2, err
    assert f"ports {base}-{base + 1} on 127.0.0.1 are held by the cluster of state dir {state_file.parent}" in err
    assert named(err) == {first.pid, *all_pids(old)} and "add --replace" in err, err
    assert first.returncode is None and all(alive(pid) for pid in all_pids(old))

    third = await start("dev", *fixed, "--replace")
    processes.append(third)
    lines = await read_until(third, lambda line: line == "ready", timeout=90)
    new = read_json(Path(next(line for line in lines if line.startswith("cluster.json: ")).partition(": ")[2]))
    _, err = await finish(first)
    assert first.returncode == 0 and err == "", err
    assert gone(all_pids(old)) and not state_file.parent.exists(), "the first removed its own state dir"
    assert await status_region(new, f"127.0.0.1:{base}") == "a"
    assert await status_region(new, f"127.0.0.1:{base + 1}") == "b"


async def test_dev_replace_stops_leftover_processes_but_never_a_reused_pid(
    tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    """What a version without the lifeline left: an etcd of the state dir still running, with
    no `discovery dev`; and a pid of cluster.json now taken by an unrelated process."""
    state_dir = tmp_path / "state"
    leftover = EtcdProcess(state_dir / "a" / "etcd-0").start()
    unrelated = await asyncio.create_subprocess_exec("sleep", "120")
    try:
        (state_dir / "cluster.json").write_text(
            json.dumps(
                {
                    "regions": {
                        "a": {
                            "servers": [{"address": "127.0.0.1:1", "pid": unrelated.pid}],
                            "etcd": [{"address": leftover.endpoint, "pid": leftover.pid}],
                        },
                        "b": {"servers": [{"address": "127.0.0.1:2", "pid": 2**22 + 1}], "etcd": []},
                    },
                    "state_dir": str(state_dir),
                }
            )
        )
        refused = await start("dev", *SMALL, "--state-dir", str(state_dir))
        _, err = await finish(refused, timeout=30)
        assert refused.returncode == 2, err
        assert (
            "processes of an earlier cluster" in err and f"pid {leftover.pid} (a etcd-0 at {leftover.endpoint})" in err
        )
        assert named(err) == {leftover.pid}, "a pid is named only if /proc says it is that very process"

        replacing = await start("dev", *SMALL, "--state-dir", str(state_dir), "--replace")
        processes.append(replacing)
        await read_until(replacing, lambda line: line == "ready", timeout=90)
        assert not leftover.running() and leftover.proc is not None
        assert leftover.proc.returncode == -signal.SIGTERM, "stopped by SIGTERM (etcd re-raises it), no SIGKILL needed"
        assert alive(unrelated.pid) and cmdline(unrelated.pid) == ["sleep", "120"], "never touched"
    finally:
        leftover.stop()
        unrelated.kill()
        await unrelated.wait()


LIFELINE_PARENT = """
import os, sys, threading, time
from discovery.devtools import lifeline
# Asked from a thread that ends at once, as DevCluster's region threads do: the trap of
# PR_SET_PDEATHSIG is that it fires when the forking *thread* ends, not the process.
thread = threading.Thread(target=lambda: print(lifeline.popen(["sleep", "60"]).pid, flush=True))
thread.start()
thread.join()
deadline = time.monotonic() + 10
# join() returns before the kernel is done with the thread; once its task is gone, a
# parent-death signal owed to its children has been sent.
while os.path.exists(f"/proc/self/task/{thread.native_id}") and time.monotonic() < deadline:
    time.sleep(0.01)
print("thread ended", flush=True)
sys.stdin.read()  # until the test kills us
"""


def sigkill_pending(pid: int) -> bool:
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return any(int(status[field], 16) & (1 << (signal.SIGKILL - 1)) for field in ("SigPnd", "ShdPnd"))


async def test_lifeline_child_outlives_the_thread_that_started_it_not_the_process() -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LIFELINE_PARENT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    try:
        lines = await read_until(parent, lambda line: line == "thread ended", timeout=20)
        child = int(lines[0])
        assert alive(child) and not sigkill_pending(child), "killed along with the thread that started it"

        async def exec_done() -> bool:  # the lifeline shim becomes the program, same pid
            return cmdline(child) == ["sleep", "60"]

        await eventually(exec_done, timeout=10)
    finally:
        parent.kill()
        await parent.wait()

    async def child_gone() -> bool:
        return not alive(child)

    await eventually(child_gone, timeout=10, interval=0.02)
