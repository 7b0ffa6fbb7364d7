"""Health checks: a checker SIGKILLed, the command line and the client library, the
Recheck door, Watch, and mixed old/new records (docs/health-checks.md)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from discovery.devtools.process import free_port
from discovery_client import DirectClient, check
from discovery_pb.v1 import health_checks_pb2 as hpb
from discovery_pb.v1 import lookup_pb2, types_pb2
from discovery_pb.v1.health_checks_pb2_grpc import HealthChecksStub
from discovery_pb.v1.types_pb2 import CheckResult
from tests.support.backends import TcpBackend
from tests.support.health import DETECT, HEALTH, endpoints, register, state_of, until_state
from tests.support.health import check as spec
from tests.support.helpers import ALL_STATUSES, CALL_TIMEOUT, eventually, watch

CLI = [sys.executable, "-m", "discovery"]


async def run(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_sigkilled_checker_s_checks_move_and_keep_running(
    servers, etcd, connect, key_prefix, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(
        f'region = "us-east"\nlisten = "127.0.0.1:{port}"\netcd = ["{etcd.endpoint}"]\nkey_prefix = "{key_prefix}"\n'
        "insecure = true\nhealth_min_interval_seconds = 0.1\nelection_ttl_seconds = 2\n"
    )
    child = await asyncio.create_subprocess_exec(
        *CLI, "serve", "--config", str(config), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        local = await servers.start(etcd, **HEALTH)
        stubs = connect(local)
        backends = [await TcpBackend().start() for _ in range(10)]
        for i, backend in enumerate(backends):
            await register(stubs, backend.address, f"db-{i}", spec())
        checker = local.health.checker

        async def shared() -> bool:
            return (
                len(checker.targets) == 10 and 0 < len(checker.mine) < 10 and len(local.health.membership.members) == 2
            )

        await eventually(shared, timeout=20)
        theirs = set(checker.targets) - checker.mine
        child.send_signal(signal.SIGKILL)
        await child.wait()

        async def took_over() -> bool:
            return len(checker.mine) == 10

        await eventually(took_over, timeout=10)  # the membership lease (2 s) expires
        victim = sorted(theirs)[0].instance_id
        await backends[int(victim.split("-")[1])].stop()
        await until_state(stubs, victim, types_pb2.NOT_SERVING, timeout=DETECT * 4)
        for backend in backends:
            await backend.stop()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_command_line_registers_a_check_and_shows_its_verdict(servers, etcd) -> None:
    server = await servers.start(etcd, **HEALTH)
    s = ("--server", f"127.0.0.1:{server.port}")
    backend = await TcpBackend().start()
    code, out, err = await run(
        "register", "db", backend.address, "--id", "db-1", "--check", "tcp", "--check-interval", "0.2",
        "--check-timeout", "0.15", *s,
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    await backend.stop()

    async def critical() -> dict[str, Any]:
        _, out, _ = await run("resolve", "db", "--status", "serving", "--status", "not_serving", "--json", *s)
        found = json.loads(out)["endpoints"][0]
        return found if found.get("check", {}).get("state") == "critical" else {}

    found = await eventually(critical, timeout=DETECT * 4)
    assert found["status"] == "NOT_SERVING" and found["check"]["reason"].startswith("tcp connect refused")
    code, out, _ = await run("resolve", "db", "--status", "serving", "--status", "not_serving", *s)
    assert "# db-1: check critical since " in out and "tcp connect refused, 3 consecutive failures" in out
    code, out, _ = await run("status", *s)
    assert code == 0 and "checks     1 of the region's 1 run here (1 checkers)" in out
    assert all(len(line) <= 80 for line in out.splitlines())

    code, _, err = await run("register", "db", backend.address, "--check", "udp", *s)
    assert code == 2 and "tcp, grpc[:SERVICE]" in err
    code, _, err = await run("register", "db", backend.address, "--check-interval", "5", *s)
    assert code == 2 and "need --check KIND" in err
    code, _, err = await run("register", "db", backend.address, "--check", "http:healthz", *s)
    assert code != 0 and "must start with '/'" in err


async def test_client_library_registers_a_check_and_reads_its_state(servers, etcd) -> None:
    server = await servers.start(etcd, **HEALTH)
    backend = await TcpBackend().start()
    async with DirectClient([f"127.0.0.1:{server.port}"]) as client:
        await client.register("db", backend.address, instance_id="db-1", check=check("tcp", interval=0.2, timeout=0.15))

        async def passing() -> Any:
            resp = await client.resolve("db")
            return resp.endpoints and resp.endpoints[0].instance.check_result.state == CheckResult.PASSING

        await eventually(passing, timeout=5)
    from discovery_client import Endpoint

    resp_instance = (await _one(server)).instance
    ep = Endpoint.from_proto(resp_instance)
    assert ep.check is not None and ep.check.state == "passing" and ep.check.reason.startswith("tcp connect ok")
    with pytest.raises(Exception, match="use tcp"):
        check("icmp")
    await backend.stop()


async def _one(server: Any) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        from discovery_pb.v1.lookup_pb2_grpc import LookupStub

        resp = await LookupStub(channel).Resolve(lookup_pb2.ResolveRequest(service="db"), timeout=CALL_TIMEOUT)
    return resp.endpoints[0]


async def test_watch_shows_a_failing_check_as_not_serving(servers, etcd, connect) -> None:
    server = await servers.start(etcd, **HEALTH)
    stubs = connect(server)
    backend = await TcpBackend().start()
    await register(stubs, backend.address, "db-1", spec())
    watcher = watch(stubs.lookup, "db")
    try:
        await watcher.until(lambda w: w.snapshots >= 1, timeout=5)
        await backend.stop()

        def critical(w: Any) -> bool:
            found = w.state.get(("us-east", "db", "db-1"))
            return found is not None and found.check_result.state == CheckResult.CRITICAL

        await watcher.until(critical, timeout=DETECT * 4)
        assert watcher.state[("us-east", "db", "db-1")].status == types_pb2.NOT_SERVING
        # A new watcher's snapshot shows it the same way.
        late = watch(stubs.lookup, "db")
        await late.until(lambda w: w.snapshots >= 1, timeout=5)
        assert late.state[("us-east", "db", "db-1")].status == types_pb2.NOT_SERVING
        await late.close()
    finally:
        await watcher.close()


async def test_recheck_refuses_bad_requests(servers, etcd) -> None:
    server = await servers.start(etcd, **HEALTH)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = HealthChecksStub(channel)
        for request, words in (
            (hpb.RecheckRequest(region="eu-west"), "not this server's region"),
            (hpb.RecheckRequest(region="us-east", targets=[hpb.CheckTarget(service="Bad Name")]), "targets[0].service"),
            (
                hpb.RecheckRequest(region="us-east", targets=[hpb.CheckTarget(service="db", instance_id="x")] * 65),
                "at most 64",
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Recheck(request, timeout=CALL_TIMEOUT)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in (err.value.details() or "")
        # An instance it does not know (or that has no check) is answered unknown, never probed.
        resp = await stub.Recheck(
            hpb.RecheckRequest(region="us-east", targets=[hpb.CheckTarget(service="db", instance_id="nope")]),
            timeout=CALL_TIMEOUT,
        )
        assert [o.known for o in resp.outcomes] == [False]
    assert server.health.checker.stats.runs == 0


async def test_mixed_records_old_shape_served_new_shape_kept(regions, region_etcds, connect) -> None:
    """An old record (no check fields) is served and never checked; a record with a check but
    no verdict (what an old server stores for a new client) is checked by a new server; a
    verdict replicates byte for byte (an old receiver keeps it, serving the owner's status)."""
    await regions.start({r: region_etcds[r] for r in "ab"}, **HEALTH)
    a, b = regions["a"][0], regions["b"][0]
    old = types_pb2.Instance(service="db", instance_id="old", region="a", address="127.0.0.1:1", weight=100, status=1)
    new = types_pb2.Instance(
        service="db", instance_id="new", region="a", address="127.0.0.1:1", weight=100, status=1, check=spec()
    )
    for record in (old, new):
        await a.store.put(a.keys.instance("a", "db", record.instance_id), record.SerializeToString())
    stubs_a, stubs_b = connect(a), connect(b)
    await until_state(stubs_a, "new", types_pb2.NOT_SERVING, timeout=DETECT * 4)
    assert await state_of(stubs_a, "old") == (types_pb2.SERVING, 0)
    assert ("a", "db", "old") not in {tuple(k) for k in a.health.checker.targets}
    await until_state(stubs_b, "new", types_pb2.NOT_SERVING, timeout=DETECT * 4, scope=lookup_pb2.ALL)
    replica = await b.store.get(b.keys.instance("a", "db", "new"))
    origin = await a.store.get(a.keys.instance("a", "db", "new"))
    assert replica is not None and origin is not None and replica.value == origin.value
    stored = types_pb2.Instance.FromString(replica.value)
    assert stored.status == types_pb2.SERVING and stored.check_result.state == CheckResult.CRITICAL
    answer = await endpoints(stubs_b, scope=lookup_pb2.ALL, statuses=ALL_STATUSES)
    assert answer["old"].status == types_pb2.SERVING and answer["new"].status == types_pb2.NOT_SERVING
