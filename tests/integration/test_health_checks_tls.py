"""Health checks with TLS: probes of https and gRPC-over-TLS backends verified against the
CA the check carries, and the Recheck door under mTLS (only this region's servers)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from discovery.health.protection import PeerCredentials, PeerRecheck
from discovery.keys import InstanceKey
from discovery.security.tls import TlsFiles
from discovery_pb.v1 import health_checks_pb2 as hpb
from discovery_pb.v1 import registry_pb2, types_pb2
from discovery_pb.v1.health_checks_pb2_grpc import HealthChecksStub
from discovery_pb.v1.types_pb2 import CheckResult, HealthCheck
from tests.support.health import DETECT, HEALTH, INTERVAL_MS, TIMEOUT_MS
from tests.support.helpers import CALL_TIMEOUT, eventually
from tests.support.secure import ADMIN, Pki, server_id, svc


async def _https_backend(pki: Pki) -> tuple[asyncio.Server, int]:
    issued = pki.client(svc("db"), dns=("localhost",), ips=("127.0.0.1",))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(issued.cert_path), str(issued.key_path))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except Exception:  # a client that gave up (the wrong CA): nothing to answer
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    return server, server.sockets[0].getsockname()[1]


async def _grpcs_backend(pki: Pki) -> tuple[grpc.aio.Server, int]:
    issued = pki.client(svc("db"), dns=("localhost",), ips=("127.0.0.1",))
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(issued.key, issued.cert)]))
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


async def _states(stubs: Any) -> dict[str, int]:
    from discovery_pb.v1 import lookup_pb2

    resp = await stubs.Resolve(lookup_pb2.ResolveRequest(service="db", statuses=[1, 2, 3]), timeout=CALL_TIMEOUT)
    return {e.instance.instance_id: e.instance.check_result.state for e in resp.endpoints}


async def test_tls_backends_are_verified_against_the_check_s_ca(servers, etcd, tmp_path: Path) -> None:
    pki, stranger = Pki(tmp_path / "pki"), Pki(tmp_path / "other")
    server = await servers.start(etcd, **HEALTH, **pki.settings("us-east"))
    https, https_port = await _https_backend(pki)
    grpcs, grpcs_port = await _grpcs_backend(pki)
    ca, wrong = pki.ca_path.read_text(), stranger.ca_path.read_text()
    timing = {"interval_ms": INTERVAL_MS * 3, "timeout_ms": TIMEOUT_MS * 3}  # TLS handshakes take longer
    checks = {
        "https-ok": (https_port, HealthCheck(kind=HealthCheck.HTTP, http_path="/", tls=True, tls_ca_pem=ca, **timing)),
        "grpcs-ok": (grpcs_port, HealthCheck(kind=HealthCheck.GRPC, tls=True, tls_ca_pem=ca, **timing)),
        "https-wrong-ca": (
            https_port,
            HealthCheck(kind=HealthCheck.HTTP, http_path="/", tls=True, tls_ca_pem=wrong, **timing),
        ),
    }
    async with pki.channel(server.address, pki.client(ADMIN)) as channel:
        from discovery_pb.v1.lookup_pb2_grpc import LookupStub
        from discovery_pb.v1.registry_pb2_grpc import RegistryStub

        registry, lookup = RegistryStub(channel), LookupStub(channel)
        for name, (port, spec) in checks.items():
            await registry.Register(
                registry_pb2.RegisterRequest(
                    instance=types_pb2.Instance(service="db", instance_id=name, address=f"127.0.0.1:{port}", check=spec)
                ),
                timeout=CALL_TIMEOUT,
            )

        async def decided() -> dict[str, int]:
            states = await _states(lookup)
            return states if states.get("https-wrong-ca") == CheckResult.CRITICAL else {}

        states = await eventually(decided, timeout=DETECT * 6)
        assert states["https-ok"] == CheckResult.PASSING and states["grpcs-ok"] == CheckResult.PASSING
    https.close()
    await https.wait_closed()
    await grpcs.stop(0)


async def test_recheck_only_for_this_region_s_servers(servers, etcd, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    a = await servers.start(etcd, **HEALTH, **pki.settings("us-east"))
    b = await servers.start(etcd, **HEALTH, **pki.settings("us-east"))
    request = hpb.RecheckRequest(region="us-east", targets=[hpb.CheckTarget(service="db", instance_id="x")])
    for identity in (svc("db"), server_id("test.local", "eu-west")):
        async with pki.channel(a.address, pki.client(identity)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await HealthChecksStub(channel).Recheck(request, timeout=CALL_TIMEOUT)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "only servers of region us-east" in (err.value.details() or "")
    # What self-protection uses: server b asks server a over mTLS, as a server of the region.
    settings = pki.settings("us-east")
    files = TlsFiles(settings["tls_cert"], settings["tls_key"], settings["tls_client_ca"])
    recheck = PeerRecheck("us-east", PeerCredentials(files, "test.local", "us-east"))
    seen = await recheck(a.address, [InstanceKey("us-east", "db", "x")], 5.0)
    assert seen == {}  # answered (not refused); the instance is unknown there
    assert b.health is not None
