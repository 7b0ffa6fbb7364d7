"""The client's transport security and the refusals it maps: TLS settings from the environment
and flags, mTLS calls, refused handshakes with a hint, UNAUTHENTICATED / PERMISSION_DENIED /
RESOURCE_EXHAUSTED (its retry-after honoured), the CLI's exit codes, and the xDS bootstrap.

Against a small grpc.aio server of this module that requires client certificates from a real
CA (``discovery.security.certs``) and answers as each test tells it to.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from discovery.security.certs import CertificateAuthority
from discovery_client import (
    AccessDenied,
    ClientConfig,
    ConfigError,
    DirectClient,
    DiscoveryClient,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    TlsConfig,
    Unauthenticated,
    Unreachable,
)
from discovery_client.tls import NO_SETTINGS
from discovery_pb.v1 import lookup_pb2, lookup_pb2_grpc, types_pb2

TRUST = "discovery.test"
CLIENT_ID = f"spiffe://{TRUST}/svc/web"


@dataclass
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    cert: Path  # the client's, from the same CA
    key: Path
    foreign_cert: Path  # a client certificate from another CA
    foreign_key: Path
    named_cert: Path  # a server certificate naming only disc.example
    named_key: Path

    def tls(self, **changes: Any) -> TlsConfig:
        return TlsConfig(ca=str(self.ca), cert=str(self.cert), key=str(self.key), **changes)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(d / "ca")
    other = CertificateAuthority.create(d / "other", name="another CA")
    server = ca.issue(
        spiffe_id=f"spiffe://{TRUST}/discovery/server/a", dns=("localhost",), ips=("127.0.0.1",), out=d / "s"
    )
    named = ca.issue(spiffe_id=f"spiffe://{TRUST}/discovery/server/a", dns=("disc.example",), out=d / "named")
    client = ca.issue(spiffe_id=CLIENT_ID, out=d / "client")
    foreign = other.issue(spiffe_id=CLIENT_ID, out=d / "foreign")
    paths = [server, named, client, foreign]
    assert all(p.cert_path and p.key_path for p in paths)
    return Pki(
        d,
        d / "ca" / "ca.pem",
        server.cert_path,  # type: ignore[arg-type]
        server.key_path,  # type: ignore[arg-type]
        client.cert_path,  # type: ignore[arg-type]
        client.key_path,  # type: ignore[arg-type]
        foreign.cert_path,  # type: ignore[arg-type]
        foreign.key_path,  # type: ignore[arg-type]
        named.cert_path,  # type: ignore[arg-type]
        named.key_path,  # type: ignore[arg-type]
    )


@dataclass
class Lookup(lookup_pb2_grpc.LookupServicer):
    """Resolve and Watch that answer as ``answers`` says (one entry per call; the last repeats)."""

    answers: list[str] = field(default_factory=lambda: ["ok"])
    calls: list[float] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    retry_after_ms: str = "300"

    async def _answer(self, context: grpc.aio.ServicerContext) -> None:
        self.calls.append(time.monotonic())
        ids = context.auth_context().get("x509_subject_alternative_name", [])
        self.peers += [i.decode() for i in ids]
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        if answer == "unauthenticated":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"certificate identity {CLIENT_ID} is not in policy")
        if answer == "denied":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{CLIENT_ID} may not read 'web' (allowed: api)")
        if answer == "exhausted":
            context.set_trailing_metadata(
                (("retry-after-ms", self.retry_after_ms), ("discovery-limit", "writes_per_second"))
            )
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "over writes_per_second (10/s)")

    async def Resolve(self, request: Any, context: grpc.aio.ServicerContext) -> lookup_pb2.ResolveResponse:
        await self._answer(context)
        return lookup_pb2.ResolveResponse(service=request.service, revision=7)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await self._answer(context)
        instance = types_pb2.Instance(
            service=request.service,
            instance_id="w1",
            region="a",
            address="10.0.0.1:80",
            weight=100,
            status=types_pb2.SERVING,
        )
        yield lookup_pb2.WatchResponse(kind=lookup_pb2.WatchResponse.SNAPSHOT, revision=7, instances=[instance])
        while True:
            await asyncio.sleep(1)
            yield lookup_pb2.WatchResponse(kind=lookup_pb2.WatchResponse.KEEPALIVE, revision=7)


@dataclass
class FakeServer:
    address: str
    lookup: Lookup


async def _serve(pki: Pki, *, secure: bool = True, named: bool = False) -> AsyncIterator[FakeServer]:
    server = grpc.aio.server()
    lookup = Lookup()
    lookup_pb2_grpc.add_LookupServicer_to_server(lookup, server)
    if secure:
        cert, key = (pki.named_cert, pki.named_key) if named else (pki.server_cert, pki.server_key)
        creds = grpc.ssl_server_credentials(
            [(key.read_bytes(), cert.read_bytes())], root_certificates=pki.ca.read_bytes(), require_client_auth=True
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield FakeServer(f"127.0.0.1:{port}", lookup)
    finally:
        await server.stop(None)


@pytest.fixture
async def secure(pki: Pki) -> AsyncIterator[FakeServer]:
    async for s in _serve(pki):
        yield s


@pytest.fixture
async def plain(pki: Pki) -> AsyncIterator[FakeServer]:
    async for s in _serve(pki, secure=False):
        yield s


@pytest.fixture
async def named(pki: Pki) -> AsyncIterator[FakeServer]:
    async for s in _serve(pki, named=True):
        yield s


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No TLS variables at all (tests/conftest.py sets DISCOVERY_INSECURE=1 for the suite)."""
    for name in ("DISCOVERY_INSECURE", "DISCOVERY_TLS_CA", "DISCOVERY_TLS_CERT", "DISCOVERY_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("DISCOVERY_TLS_SERVER_NAME", raising=False)
    yield


def direct(address: str, tls: TlsConfig, **kwargs: Any) -> DirectClient:
    return DirectClient(address, call_timeout=2.0, retry=RetryPolicy(attempts=1, deadline=3.0), tls=tls, **kwargs)


# --- settings ----------------------------------------------------------------------------


def test_settings_from_the_environment() -> None:
    env = {
        "DISCOVERY_TLS_CA": "/p/ca.pem",
        "DISCOVERY_TLS_CERT": " /p/c.pem ",
        "DISCOVERY_TLS_KEY": "/p/k.pem",
        "DISCOVERY_TLS_SERVER_NAME": "disc.example",
    }
    assert TlsConfig.from_env(env) == TlsConfig("/p/ca.pem", "/p/c.pem", "/p/k.pem", "disc.example")
    assert TlsConfig.from_env({"DISCOVERY_INSECURE": "1"}) == TlsConfig(insecure=True)
    assert TlsConfig.from_env({"DISCOVERY_INSECURE": "0"}) == TlsConfig()
    with pytest.raises(ConfigError, match="DISCOVERY_INSECURE"):
        TlsConfig.from_env({"DISCOVERY_INSECURE": "perhaps"})


def test_explicit_settings_win_over_the_environment() -> None:
    env = TlsConfig.from_env(
        {"DISCOVERY_TLS_CA": "/e/ca.pem", "DISCOVERY_TLS_CERT": "/e/c", "DISCOVERY_TLS_KEY": "/e/k"}
    )
    assert env.merged(cert="/f/c", key="/f/k") == TlsConfig("/e/ca.pem", "/f/c", "/f/k")
    assert env.merged() == env
    assert env.merged(insecure=True) == TlsConfig(insecure=True)  # --insecure drops inherited TLS files
    inherited = TlsConfig(insecure=True)
    assert inherited.merged(ca="/f/ca", cert="/f/c", key="/f/k") == TlsConfig("/f/ca", "/f/c", "/f/k")
    with pytest.raises(ConfigError, match="both TLS files and insecure"):
        inherited.merged(ca="/f/ca", insecure=True).validate()


def test_neither_tls_nor_insecure_is_refused_with_advice(no_env: None) -> None:
    with pytest.raises(ConfigError) as info:
        TlsConfig.from_env().validate()
    assert str(info.value) == NO_SETTINGS
    assert "STATE_DIR/env.sh" in NO_SETTINGS and "DISCOVERY_INSECURE=1" in NO_SETTINGS
    with pytest.raises(ConfigError, match="no TLS settings"):
        DirectClient("127.0.0.1:1")
    with pytest.raises(ConfigError, match="no TLS settings"):
        ClientConfig(region="a", servers=("127.0.0.1:1",)).validate()


def test_bad_combinations_and_files_are_named(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cert is set without its key: set DISCOVERY_TLS_KEY or --tls-key"):
        TlsConfig(ca=str(pki.ca), cert=str(pki.cert)).validate()
    with pytest.raises(ConfigError, match="both TLS files and insecure"):
        pki.tls(insecure=True).validate()
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=f"TLS ca file {missing} .*cannot read it"):
        TlsConfig(ca=str(missing)).validate()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM file"):
        TlsConfig(ca=str(pki.ca), cert=str(garbage), key=str(pki.key)).validate()
    TlsConfig(ca=str(pki.ca)).validate()  # server authentication only: accepted (our servers refuse it)


def test_channel_options_carry_the_server_name(pki: Pki) -> None:
    assert pki.tls(server_name="disc.example").channel_options() == [("grpc.ssl_target_name_override", "disc.example")]
    assert pki.tls().channel_options() == [] and TlsConfig(insecure=True).channel_options() == []


def test_the_config_takes_tls_from_its_environment(pki: Pki) -> None:
    env = {
        "DISCOVERY_REGION": "a",
        "DISCOVERY_SERVERS": "127.0.0.1:1",
        "DISCOVERY_TLS_CA": str(pki.ca),
        "DISCOVERY_TLS_CERT": str(pki.cert),
        "DISCOVERY_TLS_KEY": str(pki.key),
    }
    assert ClientConfig.from_env(env).tls == pki.tls()
    assert ClientConfig(region="a", servers=("127.0.0.1:1",)).tls.insecure  # this suite's DISCOVERY_INSECURE=1


# --- calls -------------------------------------------------------------------------------


async def test_a_call_over_mtls_presents_the_client_certificate(pki: Pki, secure: FakeServer) -> None:
    async with direct(secure.address, pki.tls()) as client:
        response = await client.resolve("web")
    assert response.revision == 7
    assert CLIENT_ID in secure.lookup.peers


async def test_the_async_client_resolves_over_mtls(pki: Pki, secure: FakeServer) -> None:
    config = ClientConfig(region="a", servers=(secure.address,), tls=pki.tls())
    async with DiscoveryClient(config) as client:
        resolution = await client.resolve("web", timeout=10)
    assert resolution.addresses == ["10.0.0.1:80"]


async def test_the_server_name_is_checked_instead_of_the_address(pki: Pki, named: FakeServer) -> None:
    async with direct(named.address, pki.tls(server_name="disc.example")) as client:
        assert (await client.resolve("web")).revision == 7
    async with direct(named.address, pki.tls()) as client:
        with pytest.raises(Unreachable) as info:
            await client.resolve("web")
    assert "DISCOVERY_TLS_SERVER_NAME" in info.value.hint


@pytest.mark.parametrize("who", ["foreign", "no certificate"])
async def test_a_refused_certificate_is_unreachable_with_a_hint(pki: Pki, secure: FakeServer, who: str) -> None:
    if who == "foreign":
        tls = TlsConfig(ca=str(pki.ca), cert=str(pki.foreign_cert), key=str(pki.foreign_key))
    else:
        tls = TlsConfig(ca=str(pki.ca))
    async with direct(secure.address, tls) as client:
        with pytest.raises(Unreachable) as info:
            await client.resolve("web")
    assert "refused this client's certificate" in info.value.hint
    assert "DISCOVERY_TLS_CERT" in str(info.value)
    assert secure.lookup.calls == []


async def test_plaintext_against_a_tls_server_hints_that_it_requires_tls(pki: Pki, secure: FakeServer) -> None:
    async with direct(secure.address, TlsConfig(insecure=True)) as client:
        with pytest.raises(Unreachable) as info:
            await client.resolve("web")
    assert "the server may require TLS" in info.value.hint


async def test_tls_against_a_plaintext_server_hints_that_it_does_not_speak_tls(pki: Pki, plain: FakeServer) -> None:
    async with direct(plain.address, pki.tls()) as client:
        with pytest.raises(Unreachable) as info:
            await client.resolve("web")
    assert "does not speak TLS" in info.value.hint


async def test_a_rotated_certificate_is_read_when_the_channel_is_rebuilt(
    pki: Pki, secure: FakeServer, tmp_path: Path
) -> None:
    cert, key = tmp_path / "me.pem", tmp_path / "me-key.pem"
    shutil.copy(pki.foreign_cert, cert)
    shutil.copy(pki.foreign_key, key)
    async with direct(secure.address, TlsConfig(ca=str(pki.ca), cert=str(cert), key=str(key))) as client:
        with pytest.raises(Unreachable):
            await client.resolve("web")
        shutil.copy(pki.cert, cert)  # rotated on disk: same paths, a certificate the server accepts
        shutil.copy(pki.key, key)
        assert (await client.resolve("web")).revision == 7


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "cls", "code"),
    [
        ("unauthenticated", Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
        ("denied", PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_refusals_of_the_identity_are_access_denied_and_not_retried(
    pki: Pki, secure: FakeServer, answer: str, cls: type[AccessDenied], code: grpc.StatusCode
) -> None:
    secure.lookup.answers = [answer]
    client = DirectClient(secure.address, retry=RetryPolicy(attempts=3, deadline=5), tls=pki.tls())
    async with client:
        with pytest.raises(cls) as info:
            await client.resolve("web")
    assert isinstance(info.value, AccessDenied) and info.value.code == code
    assert CLIENT_ID in info.value.details
    assert len(secure.lookup.calls) == 1


async def test_resource_exhausted_is_retried_after_the_servers_retry_after(pki: Pki, secure: FakeServer) -> None:
    secure.lookup.answers = ["exhausted", "ok"]
    policy = RetryPolicy(attempts=3, deadline=5, base_delay=0.01, max_delay=0.01)
    async with DirectClient(secure.address, retry=policy, tls=pki.tls()) as client:
        assert (await client.resolve("web")).revision == 7
    first, second = secure.lookup.calls
    assert 0.3 <= second - first < 2.0


async def test_resource_exhausted_beyond_the_deadline_is_raised_with_the_limit(pki: Pki, secure: FakeServer) -> None:
    secure.lookup.answers = ["exhausted", "ok"]
    secure.lookup.retry_after_ms = "60000"
    async with DirectClient(secure.address, retry=RetryPolicy(attempts=3, deadline=5), tls=pki.tls()) as client:
        with pytest.raises(ResourceExhausted) as info:
            await client.resolve("web")
    assert (info.value.limit, info.value.retry_after) == ("writes_per_second", 60.0)
    assert len(secure.lookup.calls) == 1


# --- the command line --------------------------------------------------------------------


async def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 30.0
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "discovery",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def tls_flags(pki: Pki) -> list[str]:
    return ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]


async def test_cli_flags_win_over_the_environments_insecure(pki: Pki, secure: FakeServer) -> None:
    # This suite's environment says DISCOVERY_INSECURE=1: the flags still make it mTLS.
    code, out, err = await cli("resolve", "web", "--server", secure.address, "--json", *tls_flags(pki))
    assert code == 0, err
    assert json.loads(out)["revision"] == 7


async def test_cli_exit_codes_for_refusals_and_limits(pki: Pki, secure: FakeServer) -> None:
    secure.lookup.answers = ["denied"]
    code, _, err = await cli("resolve", "web", "--server", secure.address, *tls_flags(pki))
    assert code == 5, err
    assert "permission_denied" in err and "may not read 'web'" in err
    secure.lookup.answers = ["unauthenticated"]
    code, _, err = await cli("resolve", "web", "--server", secure.address, *tls_flags(pki))
    assert code == 5, err
    secure.lookup.answers = ["exhausted"]
    code, _, err = await cli("resolve", "web", "--server", secure.address, *tls_flags(pki))
    assert code == 6, err
    assert "limit writes_per_second" in err and "retry after 0.3s" in err


async def test_cli_refused_handshake_exits_4_with_the_hint(pki: Pki, secure: FakeServer) -> None:
    flags = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.foreign_cert), "--tls-key", str(pki.foreign_key)]
    code, _, err = await cli("resolve", "web", "--server", secure.address, *flags)
    assert code == 4, err
    assert "refused this client's certificate" in err and len(err.strip().splitlines()) == 1
    code, _, err = await cli("status", "--server", secure.address, "--insecure")
    assert code == 4 and "the server may require TLS" in err, err


async def test_cli_without_tls_settings_exits_2_with_advice(pki: Pki) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCOVERY_INSECURE", "DISCOVERY_TLS_"))}
    code, _, err = await cli("resolve", "web", "--server", "127.0.0.1:1", env=env)
    assert code == 2 and NO_SETTINGS in err, err


async def test_xds_bootstrap_emits_tls_channel_creds(pki: Pki) -> None:
    # A relative path (from the command's directory) comes out absolute.
    flags = ["--tls-ca", "ca/ca.pem", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    code, out, err = await cli("xds-bootstrap", *flags, cwd=pki.dir)
    assert code == 0, err
    creds = json.loads(out)["xds_servers"][0]["channel_creds"]
    assert creds == [
        {
            "type": "tls",
            "config": {
                "ca_certificate_file": str(pki.ca.resolve()),
                "certificate_file": str(pki.cert.resolve()),
                "private_key_file": str(pki.key.resolve()),
                "refresh_interval": "60s",
            },
        }
    ]
    code, out, err = await cli("xds-bootstrap", "--insecure")
    assert code == 0, err
    assert json.loads(out)["xds_servers"][0]["channel_creds"] == [{"type": "insecure"}]
