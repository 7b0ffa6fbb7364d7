"""`discovery health` against real servers: SERVING (0), a stopped server, a server that has
begun shutting down (NOT_SERVING), a port that never answers (--timeout), an unknown service
(all 4, with a one-line reason), the plaintext --health-listen port, and the mTLS port with
and without a client certificate."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

import pytest

from discovery.devtools.etcd import EtcdProcess
from tests.support.secure import ADMIN, Pki
from tests.support.servers import Servers

CLI = [sys.executable, "-m", "discovery", "health"]


async def health(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DISCOVERY_")}
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})},
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


async def test_a_serving_server_exits_0(etcd: EtcdProcess, servers: Servers) -> None:
    server = await servers.start(etcd, health_listen="127.0.0.1:0")
    assert await health("--server", f"127.0.0.1:{server.port}", "--insecure") == (0, "SERVING\n", "")
    code, out, err = await health("--server", f"127.0.0.1:{server.port}", "--insecure", "--json")
    assert (code, err) == (0, "") and json.loads(out)["status"] == "SERVING"
    code, out, _ = await health(
        "--server", f"127.0.0.1:{server.port}", "--insecure", "--service", "discovery.v1.Lookup"
    )
    assert (code, out) == (0, "SERVING\n")
    # The plaintext port that serves health alone (for probes without a certificate).
    assert await health("--server", f"127.0.0.1:{server.health_port}", "--insecure") == (0, "SERVING\n", "")


async def test_an_unknown_service_exits_4(etcd: EtcdProcess, servers: Servers) -> None:
    server = await servers.start(etcd)
    code, out, err = await health("--server", f"127.0.0.1:{server.port}", "--insecure", "--service", "no.Such")
    assert (code, out) == (4, "")
    assert "knows no service 'no.Such'" in _one_line(err)


async def test_a_stopped_server_exits_4(etcd: EtcdProcess, servers: Servers) -> None:
    server = await servers.start(etcd)
    await servers.stop(server)
    code, out, err = await health("--server", f"127.0.0.1:{server.port}", "--insecure")
    assert (code, out) == (4, "")
    assert (
        _one_line(err)
        == f"discovery health: error: unavailable: cannot reach the discovery server at 127.0.0.1:{server.port}"
    )


async def test_a_server_shutting_down_answers_not_serving(etcd: EtcdProcess, servers: Servers) -> None:
    server = await servers.start(etcd, health_listen="127.0.0.1:0")
    # What Server.stop does first (docs: shutdown order 1): balancers and probes see NOT_SERVING
    # while in-flight calls finish; the health port stays up until then.
    await server._health.enter_graceful_shutdown()
    for port in (server.port, server.health_port):
        code, out, err = await health("--server", f"127.0.0.1:{port}", "--insecure")
        assert (code, out) == (4, "")
        assert _one_line(err) == f"discovery health: error: 127.0.0.1:{port} answers NOT_SERVING for the server"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def test_no_answer_within_the_timeout_exits_4(silent_port: int) -> None:
    started = time.monotonic()
    code, out, err = await health("--server", f"127.0.0.1:{silent_port}", "--insecure", "--timeout", "0.5")
    assert (code, out) == (4, "")
    assert _one_line(err) == f"discovery health: error: 127.0.0.1:{silent_port}: no answer within 0.5s (--timeout)"
    assert time.monotonic() - started < 20  # the process start dominates; not hung


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def test_the_mtls_port_with_and_without_a_certificate(etcd: EtcdProcess, servers: Servers, pki: Pki) -> None:
    server = await servers.start(etcd, health_listen="127.0.0.1:0", **pki.settings("us-east"))
    admin = pki.client(ADMIN)
    assert admin.cert_path and admin.key_path
    env = {
        "DISCOVERY_TLS_CA": str(pki.ca_path),
        "DISCOVERY_TLS_CERT": str(admin.cert_path),
        "DISCOVERY_TLS_KEY": str(admin.key_path),
    }
    assert await health("--server", f"127.0.0.1:{server.port}", env=env) == (0, "SERVING\n", "")
    flags = ["--tls-ca", str(pki.ca_path), "--tls-cert", str(admin.cert_path), "--tls-key", str(admin.key_path)]
    assert await health("--server", f"127.0.0.1:{server.port}", *flags) == (0, "SERVING\n", "")
    # No client certificate: the server refuses the handshake.
    code, out, err = await health("--server", f"127.0.0.1:{server.port}", "--tls-ca", str(pki.ca_path))
    assert (code, out) == (4, "")
    assert "may have refused this client's certificate" in _one_line(err)
    # Plaintext against the mTLS port: no answer a health check could take for SERVING.
    code, _, err = await health("--server", f"127.0.0.1:{server.port}", "--insecure", "--timeout", "2")
    assert code == 4 and "the server may require TLS" in _one_line(err)
    # The plaintext health port needs no certificate.
    assert await health("--server", f"127.0.0.1:{server.health_port}", "--insecure") == (0, "SERVING\n", "")


async def test_half_tls_settings_are_a_usage_error() -> None:
    code, _, err = await health("--server", "127.0.0.1:1", "--tls-cert", "/nonexistent.pem")
    assert code == 2 and _one_line(err).startswith("discovery health: error:")
