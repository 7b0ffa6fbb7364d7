"""The HTTP door over mTLS (docs/http.md, "Security"): HTTPS with the server's certificate,
no client certificate no connection, the same grants as gRPC (read per service, Status and
/metrics need admin), denials audited, the plain metrics listener without certificates, and
a rotated server certificate reaching new HTTPS handshakes."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from discovery.devtools.etcd import EtcdProcess
from discovery.security.certs import Issued
from discovery.server import Server
from discovery_pb.v1 import registry_pb2, types_pb2
from tests.support.helpers import eventually
from tests.support.http import TIMEOUT, base, get_json
from tests.support.secure import ADMIN, ADMIN_GRANT, TRUST_DOMAIN, Pki, svc
from tests.support.servers import Servers, Stubs

pytestmark = pytest.mark.slow
READER = f"spiffe://{TRUST_DOMAIN}/team/reader"
POLICY = f"""
{ADMIN_GRANT}

[[grant]]
identity = "{READER}"
read = ["web"]

[[grant]]
identity = "spiffe://{TRUST_DOMAIN}/discovery/server/*"
replicate = true
read = ["*"]
"""


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
async def server(pki: Pki, servers: Servers, etcd: EtcdProcess) -> Server:
    settings = pki.settings("us-east", policy=pki.policy(POLICY))
    return await servers.start(
        etcd, region="us-east", http_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", **settings
    )


def _context(pki: Pki, issued: Issued | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    if issued is not None:
        assert issued.cert_path and issued.key_path
        ctx.load_cert_chain(issued.cert_path, issued.key_path)
    return ctx


@pytest.fixture
async def as_identity(pki: Pki) -> AsyncIterator[Callable[[str | None], aiohttp.ClientSession]]:
    sessions: list[aiohttp.ClientSession] = []

    def session(identity: str | None) -> aiohttp.ClientSession:
        issued = pki.client(identity) if identity else None
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_context(pki, issued)))
        sessions.append(s)
        return s

    yield session
    for s in sessions:
        await s.close()


async def _register(pki: Pki, server: Server, service: str, address: str) -> int:
    import grpc.aio

    channel: grpc.aio.Channel = pki.channel(f"127.0.0.1:{server.port}", pki.client(ADMIN))
    try:
        stubs = Stubs(channel)
        reply = await stubs.registry.Register(
            registry_pb2.RegisterRequest(instance=types_pb2.Instance(service=service, address=address)), timeout=5
        )
        return int(reply.revision)
    finally:
        await channel.close()


async def test_no_client_certificate_no_connection(server: Server, pki: Pki, as_identity: Any, tmp_path: Path) -> None:
    url = base(server)
    assert url.startswith("https://")
    for path in ("/v1/services", "/healthz", "/ui/"):
        with pytest.raises(aiohttp.ClientError):
            async with as_identity(None).get(url + path, timeout=TIMEOUT) as response:
                await response.read()
    # A certificate of another CA does not connect either.
    from discovery.security.certs import CertificateAuthority

    foreign = CertificateAuthority.create(tmp_path / "other").issue(spiffe_id=ADMIN, out=tmp_path / "foreign")
    ctx = _context(pki, foreign)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(url + "/healthz", timeout=TIMEOUT) as response:
                await response.read()
    # Plain HTTP to the HTTPS port is no way in.
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"http://127.0.0.1:{server.http.port}/healthz", timeout=TIMEOUT) as response:
                assert response.status != 200
                await response.read()


async def test_read_grants_apply_per_service_and_status_needs_admin(
    server: Server, pki: Pki, as_identity: Any, tmp_path: Path
) -> None:
    await _register(pki, server, "web", "10.0.0.1:80")
    revision = await _register(pki, server, "db", "10.0.0.2:5432")
    url = base(server)
    reader, admin = as_identity(READER), as_identity(ADMIN)
    status, body, _ = await get_json(reader, f"{url}/v1/services/web?min_revision={revision}")
    assert status == 200 and len(body["endpoints"]) == 1
    status, body, _ = await get_json(reader, f"{url}/v1/services/db")
    assert status == 403 and body["error"] == "permission_denied" and READER in body["message"]
    status, body, _ = await get_json(reader, f"{url}/v1/services")
    assert status == 200 and [s["service"] for s in body["services"]] == ["web"]
    status, body, _ = await get_json(admin, f"{url}/v1/services")
    assert [s["service"] for s in body["services"]] == ["db", "web"]
    status, body, _ = await get_json(reader, f"{url}/v1/status")
    assert status == 403 and "admin" in body["message"]
    status, body, _ = await get_json(admin, f"{url}/v1/status")
    assert status == 200 and body["region"] == "us-east"
    for path in ("/v1/events?service=db", "/v1/events"):  # every service needs read on *
        status, body, _ = await get_json(reader, url + path)
        assert status == 403, path
    async with reader.get(f"{url}/v1/events?service=web", timeout=aiohttp.ClientTimeout(total=None, sock_read=10)) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
    status, body, _ = await get_json(reader, f"{url}/metrics")
    assert status == 403
    async with admin.get(f"{url}/metrics", timeout=TIMEOUT) as response:
        assert response.status == 200 and "discovery_view_revision" in await response.text()
    async with admin.get(f"{url}/ui/", timeout=TIMEOUT) as response:
        assert response.status == 200 and "default-src 'none'" in response.headers["Content-Security-Policy"]
    # Denials over HTTP are audited as over gRPC, with the caller's identity.
    audit = [json.loads(line) for line in (tmp_path / "audit-us-east.jsonl").read_text().splitlines()]
    denied = [e for e in audit if e["event"] == "denied"]
    assert any(e["method"] == "Status" and e["identity"] == READER and e["code"] == "PERMISSION_DENIED" for e in denied)
    assert any(e["method"] == "Resolve" and e["identity"] == READER and e["service"] == "db" for e in denied)


async def test_unknown_identity_is_unauthenticated(server: Server, as_identity: Any) -> None:
    stranger = as_identity(svc("stranger").replace("/svc/", "/nobody/"))
    status, body, _ = await get_json(stranger, f"{base(server)}/v1/services")
    assert status == 401 and body["error"] == "unauthenticated"


async def test_the_plain_metrics_listener_needs_no_certificate(server: Server) -> None:
    assert server.http is not None
    async with aiohttp.ClientSession() as s:
        for path in ("/metrics", "/healthz", "/readyz"):
            async with s.get(f"http://127.0.0.1:{server.http.metrics_port}{path}", timeout=TIMEOUT) as response:
                assert response.status == 200, path
        async with s.get(f"http://127.0.0.1:{server.http.metrics_port}/v1/services", timeout=TIMEOUT) as response:
            assert response.status == 404  # the API is not on the plain port


async def _served_serial(pki: Pki, port: int) -> int:
    ctx = _context(pki, pki.client(ADMIN))
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()


async def test_a_rotated_server_certificate_reaches_new_https_handshakes(server: Server, pki: Pki) -> None:
    assert server.http is not None
    issued = pki.server("us-east")
    before = await _served_serial(pki, server.http.port)
    assert before == x509.load_pem_x509_certificate(issued.cert).serial_number
    assert issued.cert_path and issued.key_path
    fresh = pki.ca.issue(
        spiffe_id=f"spiffe://{TRUST_DOMAIN}/discovery/server/us-east",
        dns=("localhost",),
        ips=("127.0.0.1",),
        out=issued.cert_path.parent / "rotated",
    )
    issued.key_path.write_bytes(fresh.key)
    issued.cert_path.write_bytes(fresh.cert)
    server.reload()
    expected = x509.load_pem_x509_certificate(fresh.cert).serial_number

    async def rotated() -> bool:
        return await _served_serial(pki, server.http.port) == expected

    await eventually(rotated, timeout=10, interval=0.1)


async def test_a_policy_reload_closes_the_event_streams_it_no_longer_allows(
    server: Server, pki: Pki, as_identity: Any
) -> None:
    """An event stream is authorized when it opens; a reload that takes the read grant away
    closes it, and the reader's reconnect is refused; the admin's stream goes on."""
    reader, admin = as_identity(READER), as_identity(ADMIN)
    url = f"{base(server)}/v1/events?service=web"
    async with (
        reader.get(url, timeout=aiohttp.ClientTimeout(total=30)) as revoked,
        admin.get(url, timeout=aiohttp.ClientTimeout(total=30)) as kept,
    ):
        assert revoked.status == 200 and kept.status == 200
        for stream in (revoked, kept):
            async with asyncio.timeout(10):
                assert (await stream.content.readuntil(b"\n\n")).startswith(b"retry:")
        pki.policy(POLICY.replace('read = ["web"]', 'read = ["db"]'))  # the file the server reads
        server.reload()

        async def drained() -> bytes:
            rest = b""
            async with asyncio.timeout(10):
                while chunk := await revoked.content.read(4096):
                    rest += chunk
            return rest

        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            await drained()
        async with asyncio.timeout(10):  # the admin's stream still carries keep-alives
            assert b"event:" in await kept.content.readuntil(b"\n\n")
    status, body, _ = await get_json(reader, url)
    assert status == 403 and body["error"] == "permission_denied", body
