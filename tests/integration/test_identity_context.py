"""What grpc.aio puts in ``context.auth_context()`` for each shape of client certificate, and
the identity discovery.security.identity reads from it: a real server over mTLS, real
certificates. If a grpcio upgrade changes the keys, this is the test that says so."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from discovery.security.certs import CertificateAuthority, Issued
from discovery.security.identity import Caller, IdentityError, caller_from_auth_context, serial_of

TD = "example.org"
WEB = f"spiffe://{TD}/svc/web"


class _Probe:
    """A server whose one method records the auth context of the call."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.seen: dict[str, list[bytes]] = {}
        self.peer = ""
        self.server = grpc.aio.server()
        self.port = 0

    async def _handle(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.seen = {k: list(v) for k, v in context.auth_context().items()}
        self.peer = context.peer()
        return b"ok"

    async def start(self) -> None:
        handler = grpc.unary_unary_rpc_method_handler(self._handle)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("probe.Probe", {"Call": handler})])
        leaf = self.ca.issue(dns=("localhost",), ips=("127.0.0.1",))
        creds = grpc.ssl_server_credentials(
            [(leaf.key, leaf.cert)], root_certificates=self.ca.pem, require_client_auth=True
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        await self.server.start()

    async def call(self, client: Issued) -> dict[str, list[bytes]]:
        creds = grpc.ssl_channel_credentials(self.ca.pem, client.key, client.cert)
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{self.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
        ) as channel:
            assert await channel.unary_unary("/probe.Probe/Call")(b"", timeout=10) == b"ok"
        return self.seen


@pytest.fixture
async def probe(tmp_path: Path) -> AsyncIterator[_Probe]:
    p = _Probe(CertificateAuthority.create(tmp_path / "ca"))
    await p.start()
    yield p
    await p.server.stop(None)


def _common(seen: dict[str, list[bytes]], client: Issued) -> None:
    assert seen["transport_security_type"] == [b"ssl"]
    assert seen["x509_pem_cert"] == [client.cert]  # the leaf exactly as issued: serial comes from it


async def test_one_spiffe_uri(probe: _Probe) -> None:
    client = probe.ca.issue(spiffe_id=WEB)
    seen = await probe.call(client)
    _common(seen, client)
    assert seen["peer_uri"] == [WEB.encode()]
    assert seen["peer_spiffe_id"] == [WEB.encode()]
    assert seen["x509_subject_alternative_name"] == [WEB.encode()]
    assert seen["x509_common_name"] == [WEB.encode()]  # certs.issue copies the ID into the CN
    caller = caller_from_auth_context(seen, probe.peer, TD)
    assert caller == Caller(WEB, serial_of(client.cert), probe.peer)
    assert probe.peer.startswith("ipv4:127.0.0.1:")


async def test_two_uris_have_no_spiffe_id_and_are_refused(probe: _Probe) -> None:
    client = probe.ca.issue(spiffe_id=WEB, uris=(f"spiffe://{TD}/svc/admin",))
    seen = await probe.call(client)
    _common(seen, client)
    assert "peer_spiffe_id" not in seen  # gRPC itself will not pick one
    assert seen["peer_uri"] == [WEB.encode(), f"spiffe://{TD}/svc/admin".encode()]
    with pytest.raises(IdentityError, match="2 URI SANs"):
        caller_from_auth_context(seen, probe.peer, TD)


async def test_spiffe_plus_other_uri_is_refused(probe: _Probe) -> None:
    seen = await probe.call(probe.ca.issue(spiffe_id=WEB, uris=("https://example.org/x",)))
    assert "peer_spiffe_id" not in seen
    assert seen["peer_uri"] == [WEB.encode(), b"https://example.org/x"]
    with pytest.raises(IdentityError, match="exactly one"):
        caller_from_auth_context(seen, probe.peer, TD)


async def test_cn_only(probe: _Probe) -> None:
    client = probe.ca.issue(common_name="legacy-batch")
    seen = await probe.call(client)
    _common(seen, client)
    assert "peer_uri" not in seen and "peer_spiffe_id" not in seen
    assert "x509_subject_alternative_name" not in seen
    assert seen["x509_common_name"] == [b"legacy-batch"]
    assert caller_from_auth_context(seen, probe.peer, TD).identity == "legacy-batch"


async def test_dns_and_ip_sans_beside_the_uri(probe: _Probe) -> None:
    seen = await probe.call(probe.ca.issue(spiffe_id=WEB, dns=("web.example.org",), ips=("10.0.0.1",)))
    # x509_subject_alternative_name mixes every kind of SAN: the identity is read from peer_uri.
    assert seen["x509_subject_alternative_name"] == [WEB.encode(), b"web.example.org", b"10.0.0.1"]
    assert seen["peer_uri"] == [WEB.encode()]
    assert seen["peer_spiffe_id"] == [WEB.encode()]
    assert seen["peer_dns"] == [b"web.example.org"]
    assert seen["peer_ip"] == [b"10.0.0.1"]
    assert caller_from_auth_context(seen, probe.peer, TD).identity == WEB


async def test_non_spiffe_uri_only_is_refused_not_read_from_the_cn(probe: _Probe) -> None:
    seen = await probe.call(probe.ca.issue(uris=("https://example.org/x",), common_name="admin"))
    assert "peer_spiffe_id" not in seen
    assert seen["peer_uri"] == [b"https://example.org/x"]
    with pytest.raises(IdentityError, match="not a valid SPIFFE ID"):
        caller_from_auth_context(seen, probe.peer, TD)


async def test_foreign_trust_domain_is_refused(probe: _Probe) -> None:
    seen = await probe.call(probe.ca.issue(spiffe_id="spiffe://other.org/svc/web"))
    assert seen["peer_spiffe_id"] == [b"spiffe://other.org/svc/web"]
    with pytest.raises(IdentityError, match=r"trust domain 'other\.org'"):
        caller_from_auth_context(seen, probe.peer, TD)


def test_keys_are_bytes_lists() -> None:
    # the auth context maps str to a list of bytes; the parser takes any Sequence[bytes]
    assert caller_from_auth_context({"peer_uri": (WEB.encode(),)}, "p", TD).identity == WEB
