"""mTLS on a real grpc.aio server (the standard health service) whose material comes from
ServerCertificates: who is refused, rotation without a restart, a bad file kept out, a CA
overlap, the peer identity check of replication dialers, and the `discovery certs` command."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from discovery.cli.main import main
from discovery.security.certs import CertificateAuthority, server_id, service_id
from discovery.security.tls import (
    PeerMismatch,
    ServerCertificates,
    TlsFiles,
    channel_credentials,
    check_peer,
    load_material,
    peer_uris,
)

TIMEOUT = 5.0
TD = "td"
SERVER = server_id(TD, "eu-west")


@dataclass
class Rig:
    dir: Path
    ca: CertificateAuthority
    files: TlsFiles  # the server's
    certs: ServerCertificates
    health: health.aio.HealthServicer
    port: int
    events: list[tuple[str, str]] = field(default_factory=list)
    reloaded: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def issue_server(self) -> None:
        """A new server certificate and key over the files in use (a rotation)."""
        self.ca.issue(spiffe_id=SERVER, dns=("localhost",), ips=("127.0.0.1",), out=self.dir / "server")

    def client(self, name: str = "web", ca: CertificateAuthority | None = None, **kw: object) -> TlsFiles:
        issued = (ca or self.ca).issue(spiffe_id=service_id(TD, name), out=self.dir / f"client-{name}", **kw)  # type: ignore[arg-type]
        assert issued.cert_path is not None and issued.key_path is not None
        return TlsFiles(issued.cert_path, issued.key_path, self.dir / "ca-bundle.pem")


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    ca = CertificateAuthority.create(tmp_path / "ca")
    (tmp_path / "ca-bundle.pem").write_bytes(ca.pem)
    ca.issue(spiffe_id=SERVER, dns=("localhost",), ips=("127.0.0.1",), out=tmp_path / "server")
    files = TlsFiles(tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "ca-bundle.pem")
    events: list[tuple[str, str]] = []
    reloaded = asyncio.Event()

    def on_event(kind: str, message: str) -> None:
        events.append((kind, message))
        if kind == "reloaded":
            reloaded.set()

    certs = ServerCertificates(files, poll_seconds=3600, on_event=on_event)
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", certs.credentials())
    await server.start()
    try:
        yield Rig(tmp_path, ca, files, certs, servicer, port, events, reloaded)
    finally:
        await server.stop(None)


def write(path: str | os.PathLike[str], data: bytes) -> None:
    Path(path).write_bytes(data)


async def check(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    """One Check on a new channel (so a new handshake); the status, or the RPC error's code."""
    channel = grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
    async with channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    return int(response.status)


async def refused(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await check(address, credentials)
    code: grpc.StatusCode = e.value.code()
    return code


async def served_serial(rig: Rig, client: TlsFiles) -> str:
    """The serial of the certificate a new handshake gets (Python's ssl: gRPC shows none)."""
    ctx = ssl.create_default_context(cafile=str(client.ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(client.cert), str(client.key))
    ctx.set_alpn_protocols(["h2"])
    async with asyncio.timeout(TIMEOUT):
        _, writer = await asyncio.open_connection("127.0.0.1", rig.port, ssl=ctx)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        with contextlib.suppress(ssl.SSLError):  # the server's HTTP/2 greeting arrives after our goodbye
            await writer.wait_closed()
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_client_with_the_ca_and_a_certificate_connects(rig: Rig) -> None:
    assert await check(rig.address, channel_credentials(rig.client())) == SERVING


async def test_refused_clients_see_unavailable(rig: Rig) -> None:
    other_ca = CertificateAuthority.create()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    no_cert = grpc.ssl_channel_credentials(root_certificates=rig.ca.pem)
    cases = {
        "plaintext": None,
        "no client certificate": no_cert,
        "another CA": channel_credentials(rig.client("rogue", ca=other_ca)),
        "expired": channel_credentials(rig.client("old", not_before=past, days=1)),
    }
    codes = {name: await refused(rig.address, creds) for name, creds in cases.items()}
    assert codes == dict.fromkeys(cases, grpc.StatusCode.UNAVAILABLE)
    assert await check(rig.address, channel_credentials(rig.client())) == SERVING  # the server is fine


async def test_rotation_reaches_new_handshakes_while_an_open_watch_survives(rig: Rig) -> None:
    client = rig.client()
    async with grpc.aio.secure_channel(rig.address, channel_credentials(client)) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        async with asyncio.timeout(TIMEOUT):
            assert (await watch.read()).status == SERVING
        old = rig.certs.current.serial
        assert await served_serial(rig, client) == old

        rig.issue_server()
        assert rig.certs.check() is True
        new = rig.certs.current.serial
        assert new != old and rig.events[-1][0] == "reloaded"
        assert await served_serial(rig, client) == new
        assert await check(rig.address, channel_credentials(client)) == SERVING

        await rig.health.set("", NOT_SERVING)  # the stream opened under the old certificate still delivers
        async with asyncio.timeout(TIMEOUT):
            assert (await watch.read()).status == NOT_SERVING
        watch.cancel()


async def test_run_reloads_at_request_reload(rig: Rig) -> None:
    task = asyncio.create_task(rig.certs.run())  # polls every hour: only request_reload wakes it
    try:
        old = rig.certs.current.serial
        rig.issue_server()
        rig.certs.request_reload()
        async with asyncio.timeout(TIMEOUT):
            await rig.reloaded.wait()
        assert rig.certs.current.serial != old
        assert await served_serial(rig, rig.client()) == rig.certs.current.serial
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_bad_key_keeps_the_old_material(rig: Rig) -> None:
    client = rig.client()
    serial = rig.certs.current.serial
    stranger = rig.ca.issue(spiffe_id=SERVER)
    write(rig.files.key, stranger.key)
    assert rig.certs.check() is False
    assert rig.certs.reload_failures == 1 and rig.certs.current.serial == serial
    kind, message = rig.events[-1]
    assert kind == "rejected" and "does not belong" in message and f"serial {serial} stays in use" in message
    assert await served_serial(rig, client) == serial
    assert await check(rig.address, channel_credentials(client)) == SERVING

    rig.issue_server()  # the rotation finished properly: taken
    assert rig.certs.check() is True and rig.certs.reload_failures == 1
    assert await served_serial(rig, client) == rig.certs.current.serial != serial


async def test_a_ca_overlap_accepts_clients_of_both(rig: Rig) -> None:
    new_ca = CertificateAuthority.create()
    old_client, new_client = rig.client("old"), rig.client("new", ca=new_ca)
    assert await refused(rig.address, channel_credentials(new_client)) == grpc.StatusCode.UNAVAILABLE

    write(rig.files.ca, rig.ca.pem + new_ca.pem)  # the bundle: old and new CA
    assert rig.certs.check() is True
    assert await check(rig.address, channel_credentials(old_client)) == SERVING
    assert await check(rig.address, channel_credentials(new_client)) == SERVING

    # The server moves to the new CA too; clients trusting both keep connecting.
    new_ca.issue(spiffe_id=SERVER, dns=("localhost",), ips=("127.0.0.1",), out=rig.dir / "server")
    assert rig.certs.check() is True
    assert await check(rig.address, channel_credentials(old_client)) == SERVING
    assert await check(rig.address, channel_credentials(new_client)) == SERVING


async def test_peer_uris_and_check_peer(rig: Rig) -> None:
    dialer = rig.client("dialer")
    uris = await peer_uris(rig.address, dialer, timeout=TIMEOUT)
    assert uris == (SERVER,)
    check_peer(uris, SERVER, address=rig.address)
    with pytest.raises(PeerMismatch, match=f"presents {SERVER}, not {server_id(TD, 'us-east')}: check --peer"):
        check_peer(uris, server_id(TD, "us-east"), address=rig.address)
    # Another CA's view of the server: the handshake itself fails.
    other = CertificateAuthority.create()
    (rig.dir / "other-ca.pem").write_bytes(other.pem)
    with pytest.raises(ssl.SSLError):
        await peer_uris(rig.address, dialer._replace(ca=rig.dir / "other-ca.pem"), timeout=TIMEOUT)


def test_certs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = tmp_path / "tls"
    assert main(["certs", "ca", "--dir", str(ca_dir)]) == 0
    assert f"wrote {ca_dir / 'ca.pem'}" in capsys.readouterr().out
    assert (ca_dir / "ca-key.pem").stat().st_mode & 0o077 == 0
    first = (ca_dir / "ca.pem").read_bytes()

    assert main(["certs", "ca", "--dir", str(ca_dir)]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert (ca_dir / "ca.pem").read_bytes() == first
    assert main(["certs", "ca", "--dir", str(ca_dir), "--force"]) == 0
    assert (ca_dir / "ca.pem").read_bytes() != first
    capsys.readouterr()

    web = service_id(TD, "web")
    argv = ["certs", "issue", "--ca-dir", str(ca_dir), "--id", web, "--out", str(tmp_path / "web")]
    assert main([*argv, "--days", "2", "--dns", "localhost", "--ip", "127.0.0.1"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'web.pem'}" in out and f"identity {web}" in out
    material = load_material(TlsFiles(tmp_path / "web.pem", tmp_path / "web-key.pem", ca_dir / "ca.pem"))
    assert material.identity == web and f"serial {material.serial}" in out
    left = material.not_after - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=1, hours=23) < left <= datetime.timedelta(days=2)

    for bad in ("https://td/svc/web", "spiffe://TD/svc/web", "spiffe://td", "spiffe://td/svc//web", "spiffe://td/.."):
        with pytest.raises(SystemExit) as e:
            main([*argv[:4], "--id", bad, "--out", str(tmp_path / "bad")])
        assert e.value.code == 2
    assert "spiffe://" in capsys.readouterr().err
    assert main(["certs", "issue", "--ca-dir", str(tmp_path / "none"), "--id", web, "--out", str(tmp_path / "x")]) == 1
    assert "discovery certs ca --dir" in capsys.readouterr().err


async def test_a_certificate_from_the_command_is_accepted(rig: Rig, tmp_path: Path) -> None:
    out = tmp_path / "cli-client"
    argv = ["certs", "issue", "--ca-dir", str(tmp_path / "ca"), "--id", service_id(TD, "cli"), "--out", str(out)]
    code = await asyncio.to_thread(main, argv)  # main runs its own event loop
    assert code == 0
    files = TlsFiles(f"{out}.pem", f"{out}-key.pem", rig.files.ca)
    assert await check(rig.address, channel_credentials(files)) == SERVING
