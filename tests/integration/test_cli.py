"""The `discovery` command end to end: real processes, real server, exit codes, output."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from discovery.devtools.etcd import EtcdProcess
from discovery.devtools.process import free_port
from discovery_pb.v1 import types_pb2
from tests.support.helpers import eventually

CLI = [sys.executable, "-m", "discovery"]


async def run(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def read_line(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        line = await proc.stdout.readline()
    assert line, "process closed its output"
    return line.decode()


def catches_sigterm(pid: int) -> bool:
    """Whether the process has its SIGTERM handler on (until then SIGTERM kills it outright,
    and a loaded machine can take over a second to import and get there)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.fixture
async def server_addr(etcd, servers) -> str:
    server = await servers.start(etcd)
    return f"127.0.0.1:{server.port}"


async def test_register_resolve_status_deregister(server_addr: str) -> None:
    s = ("--server", server_addr)
    code, out, err = await run(
        "register",
        "web",
        "10.0.0.1:8080",
        "--id",
        "web-1",
        "--zone",
        "z1",
        "--tag",
        "canary",
        "--meta",
        "version=1.4",
        "--weight",
        "50",
        "--json",
        *s,
    )
    assert (code, err) == (0, "")
    registered = json.loads(out)
    assert registered["service"] == "web" and registered["instance_id"] == "web-1" and registered["revision"] > 0

    code, out, err = await run("resolve", "web", "--min-revision", str(registered["revision"]), "--json", *s)
    assert (code, err) == (0, "")
    answer = json.loads(out)
    assert answer["service"] == "web" and answer["revision"] >= registered["revision"]
    (endpoint,) = answer["endpoints"]
    assert {
        k: endpoint[k]
        for k in ("instance_id", "address", "region", "zone", "status", "weight", "tags", "metadata", "stale")
    } == {
        "instance_id": "web-1",
        "address": "10.0.0.1:8080",
        "region": "us-east",
        "zone": "z1",
        "status": "SERVING",
        "weight": 50,
        "tags": ["canary"],
        "metadata": {"version": "1.4"},
        "stale": False,
    }

    code, out, _ = await run("resolve", "web", "--scope", "failover", *s)
    assert code == 0 and "web-1" in out and "10.0.0.1:8080" in out

    code, out, _ = await run("status", "--json", *s)
    status = json.loads(out)
    assert code == 0 and status["region"] == "us-east" and status["instance_count"] == 1
    assert status["etcd"]["healthy"] is True

    code, out, _ = await run("deregister", "web", "web-1", *s)
    assert code == 0 and "deregistered" in out
    code, out, err = await run("deregister", "web", "web-1", *s)
    assert code == 3 and out == ""
    assert err.count("\n") == 1 and "not_found" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("register", "Web", "10.0.0.1:80"), 2, "instance.service"),
        (("register", "web", "10.0.0.1:0"), 2, "instance.address"),
        (("register", "web", "10.0.0.1:80", "--ttl", "7200"), 2, "instance.ttl_seconds"),
        (("register", "web", "10.0.0.1:80", "--meta", "novalue"), 2, "--meta"),
        (("resolve", "web_x"), 2, "service"),
        (("resolve", "web", "--scope", "galaxy"), 2, "invalid choice"),
        (("deregister", "web", "missing"), 3, "not_found"),
    ],
)
async def test_errors_are_one_line_with_exit_codes(
    server_addr: str, args: tuple[str, ...], code: int, needle: str
) -> None:
    got, _out, err = await run(*args, "--server", server_addr)
    assert got == code, err
    assert needle in err and "Traceback" not in err
    if code != 2 or needle != "invalid choice":  # argparse prints its usage too
        assert err.count("\n") == 1


async def test_unreachable_server_exits_4() -> None:
    code, _, err = await run("status", "--server", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert code == 4 and "cannot reach" in err and err.count("\n") == 1


async def test_server_address_from_environment(server_addr: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "status",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DISCOVERY_SERVER": server_addr},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0 and json.loads(out)["region"] == "us-east"


@pytest.mark.parametrize("command", ["", "serve", "dev", "register", "deregister", "resolve", "watch", "status"])
async def test_help_shows_examples(command: str) -> None:
    code, out, _ = await run(*([command] if command else []), "--help")
    assert code == 0 and "example" in out.lower()


async def test_leased_register_heartbeats_then_deregisters_on_sigterm(server_addr: str) -> None:
    s = ("--server", server_addr)
    proc = await start("register", "api", "10.0.0.9:9000", "--ttl", "2", "--json", *s)
    try:
        registered = json.loads(await read_line(proc))
        # Outlive the TTL a few times over: only heartbeats keep it.
        for _ in range(3):
            code, out, _ = await run("resolve", "api", "--json", *s)
            assert code == 0
            assert [e["instance_id"] for e in json.loads(out)["endpoints"]] == [registered["instance_id"]]
            await asyncio.sleep(1.5)  # letting time pass is the point here, not synchronisation
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            await proc.wait()
        assert proc.returncode == 0

        async def gone() -> bool:  # the deregistration's revision is not printed: poll
            code, out, _ = await run("resolve", "api", "--json", *s)
            return code == 0 and json.loads(out)["endpoints"] == []

        await eventually(gone, timeout=10, interval=0.1)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_leased_register_drains_before_deregistering(etcd, servers, connect) -> None:
    """SIGTERM: the instance turns DRAINING (seen by a watcher while the command still
    runs), stays for --drain, and only then is deregistered; stdout keeps its one JSON line."""
    from tests.support.helpers import watch

    server = await servers.start(etcd)
    s = ("--server", f"127.0.0.1:{server.port}")
    observer = watch(connect(server).lookup, "api")
    proc = await start("register", "api", "10.0.0.9:9000", "--id", "api-1", "--ttl", "2", "--drain", "2", "--json", *s)
    key = ("us-east", "api", "api-1")
    try:
        registered = json.loads(await read_line(proc))
        assert registered["instance_id"] == "api-1"
        await observer.until(lambda w: key in w.state)
        proc.send_signal(signal.SIGTERM)
        await observer.until(lambda w: key in w.state and w.state[key].status == types_pb2.DRAINING)
        assert proc.returncode is None  # still draining
        await observer.until(lambda w: key not in w.state)
        async with asyncio.timeout(10):
            out, err = await proc.communicate()
        assert proc.returncode == 0 and out.decode() == "" and err.decode() == ""
        kinds = [
            (types_pb2.Change.Kind.Name(c.kind), types_pb2.Status.Name(c.instance.status) if c.instance.status else "")
            for c in observer.changes
            if c.instance_id == "api-1"
        ]
        assert kinds[-2:] == [("PUT", "DRAINING"), ("DELETE", "")], kinds
    finally:
        await observer.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_watch_prints_snapshot_then_changes(server_addr: str) -> None:
    s = ("--server", server_addr)
    await run("register", "db", "10.0.0.1:5432", "--id", "db-1", *s)
    proc = await start("watch", "db", "--json", *s)
    try:
        snapshot = json.loads(await read_line(proc))
        assert snapshot["kind"] == "SNAPSHOT" and [i["instance_id"] for i in snapshot["instances"]] == ["db-1"]
        await run("register", "db", "10.0.0.2:5432", "--id", "db-2", *s)
        change = json.loads(await read_line(proc))
        assert change["kind"] == "CHANGES" and change["revision"] > snapshot["revision"]
        assert [(c["kind"], c["instance_id"]) for c in change["changes"]] == [("PUT", "db-2")]
    finally:
        proc.terminate()
        await proc.wait()


async def test_serve_exits_cleanly_on_sigterm(private_etcd: EtcdProcess, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'region = "eu-west"\nlisten = "127.0.0.1:1"\netcd = ["{private_etcd.endpoint}"]\n')
    proc = await start("serve", "--config", str(config), "--listen", f"127.0.0.1:{port}", "--insecure")  # flag wins
    try:

        async def up() -> bool:
            code, out, _ = await run("status", "--json", "--server", f"127.0.0.1:{port}", "--timeout", "1")
            return code == 0 and json.loads(out)["region"] == "eu-west"

        await eventually(up, timeout=20, interval=0.2)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, err = await proc.communicate()
        assert proc.returncode == 0
        assert only_the_insecure_warning(err.decode())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def only_the_insecure_warning(stderr: str) -> bool:
    """A clean run of an --insecure server says one thing on stderr: that it is insecure."""
    lines = stderr.splitlines()
    return len(lines) == 1 and "WITHOUT TLS (--insecure)" in lines[0]


async def test_serve_refuses_to_start_without_tls_or_insecure(tmp_path: Path) -> None:
    code, _, err = await run("serve", "--region", "us-east", "--listen", "127.0.0.1:1")
    assert code == 2
    assert "no TLS settings" in err and "--tls-cert" in err and "--insecure" in err
    code, _, err = await run("serve", "--region", "us-east", "--tls-cert", str(tmp_path / "c.pem"))
    assert code == 2 and "tls_key: required with tls_cert" in err


async def test_serve_rejects_bad_config(tmp_path: Path) -> None:
    code, _, err = await run("serve", "--listen", "127.0.0.1:1", "--insecure")
    assert code == 2 and "region" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('region = "us-east"\ninsecure = true\nlisen = "typo"\n')
    code, _, err = await run("serve", "--config", str(bad))
    assert code == 2 and "lisen" in err


async def test_serve_stops_cleanly_on_sigterm_while_waiting_for_etcd() -> None:
    """etcd unreachable at startup: the server waits for it, and a SIGTERM meanwhile still
    ends it at once, exit 0, nothing on stderr."""
    proc = await start("serve", "--region", "us-east", "--listen", f"127.0.0.1:{free_port()}",
                       "--etcd", f"127.0.0.1:{free_port()}", "--insecure")  # fmt: skip
    try:

        async def handler_on() -> bool:
            return catches_sigterm(proc.pid)

        await eventually(handler_on, timeout=20, interval=0.05)
        await asyncio.sleep(0.5)  # into its wait for etcd: nothing else to observe from outside
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, err = await proc.communicate()
        assert proc.returncode == 0 and only_the_insecure_warning(err.decode())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ('region = "us-east"\ngrace_seconds = "5"\n', "grace_seconds: expected a number"),
        ('region = "us-east"\netcd = 2379\n', "etcd: expected a list"),
        # Names are fine (resolved by the store); a bare IPv6 address is not.
        ('region = "us-east"\netcd = ["::1:2379"]\n', "etcd: '::1:2379': write an IPv6 address as [ADDR]:PORT"),
        ('region = "us-east"\nlisten = 7400\n', "listen: expected a string"),
    ],
)
async def test_serve_config_type_errors_are_one_line(tmp_path: Path, config: str, needle: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(config + "insecure = true\n")
    code, _, err = await run("serve", "--config", str(path))
    assert code == 2 and needle in err and err.count("\n") == 1, err


async def test_out_of_range_numbers_are_usage_errors() -> None:
    for args in (("register", "web", "10.0.0.1:80", "--weight", "99999999999"),
                 ("resolve", "web", "--min-revision", "99999999999999999999")):  # fmt: skip
        code, _, err = await run(*args)
        assert code == 2 and "is not within" in err and "Traceback" not in err


async def test_output_into_a_closed_pipe_is_not_an_error(etcd, servers, connect) -> None:
    from tests.support.helpers import register

    server = await servers.start(etcd)
    stubs = connect(server)
    for i in range(300):  # enough output to outrun the pipe once head has gone
        await register(stubs, "web", f"10.0.{i // 250}.{i % 250}:80")
    shell = f"{' '.join(CLI)} resolve web --server 127.0.0.1:{server.port} | head -n 1"
    proc = await asyncio.create_subprocess_shell(shell, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(20):
        out, err = await proc.communicate()
    assert out.decode().startswith("ID") and not err.decode(), err.decode()
