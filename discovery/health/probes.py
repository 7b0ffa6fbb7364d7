"""One probe of one endpoint: TCP connect, gRPC health, or HTTP GET, with its timeout.

Every probe goes to the registered address and port only: HTTP sends the request there and
reads the status line (a redirect is a passing answer, never followed), gRPC dials that
address with a fresh channel (as Kubernetes' gRPC probe does: no reconnect backoff carried
from one probe to the next). TLS verifies against the CA the check carries, for the name it
gives (the address's host by default). Nothing here blocks the loop: contexts are built once
per CA and cached."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import ssl
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery.health.spec import Spec
from discovery_pb.v1.types_pb2 import HealthCheck

_USER_AGENT = "discovery-health-check"
_MAX_STATUS_LINE = 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    healthy: bool
    reason: str  # "tcp connect ok", "http 503", "grpc NOT_SERVING", "tcp connect refused"...


def split_host(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@functools.lru_cache(maxsize=256)
def _tls_context(ca_pem: str, alpn: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem)
    context.set_alpn_protocols([alpn])
    return context


async def probe(spec: Spec, address: str) -> Outcome:
    """Probe ``address`` as ``spec`` says; never raises (a failure is an unhealthy outcome)."""
    name = spec.name
    try:
        async with asyncio.timeout(spec.timeout):
            if spec.kind == HealthCheck.TCP:
                return await _tcp(address)
            if spec.kind == HealthCheck.HTTP:
                return await _http(spec, address)
            if spec.kind == HealthCheck.GRPC:
                return await _grpc(spec, address)
            return Outcome(False, f"unknown check kind {spec.kind}")
    except TimeoutError:
        return Outcome(False, f"{name} timed out after {spec.timeout:g}s")
    except ConnectionRefusedError:
        return Outcome(False, f"{name} connect refused")
    except ssl.SSLError as exc:
        return Outcome(False, f"{name} TLS failed: {exc.reason or exc}")
    except (OSError, ValueError) as exc:
        return Outcome(False, f"{name} failed: {exc.strerror or exc}" if isinstance(exc, OSError) else f"{name}: {exc}")


async def _tcp(address: str) -> Outcome:
    host, port = split_host(address)
    _, writer = await asyncio.open_connection(host, port)
    writer.transport.abort()  # the connection was the answer; no goodbye to wait for
    return Outcome(True, "tcp connect ok")


async def _http(spec: Spec, address: str) -> Outcome:
    host, port = split_host(address)
    context = _tls_context(spec.tls_ca_pem, "http/1.1") if spec.tls else None
    server_name = (spec.tls_server_name or host) if context is not None else None
    reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=server_name)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        writer.write(
            f"GET {spec.http_path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {_USER_AGENT}\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        await writer.drain()
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return Outcome(False, f"{spec.name} closed before answering")
    except asyncio.LimitOverrunError:
        return Outcome(False, f"{spec.name} answered no status line")
    finally:
        # Aborted, not closed: only the status line was wanted, and a graceful TLS close waits
        # for the server's close_notify (up to 30 s, far past the check's timeout, holding a
        # probe slot) from a server that may have stalled.
        writer.transport.abort()
    parts = line[:_MAX_STATUS_LINE].decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return Outcome(False, f"{spec.name} answered no status line")
    code = int(parts[1])
    return Outcome(200 <= code < 400, f"{spec.name} {code}")


async def _grpc(spec: Spec, address: str) -> Outcome:
    host, _ = split_host(address)
    # No proxy from the environment (grpc_proxy, https_proxy): a probe goes to the registered
    # address only, as seen from this server.
    options: list[tuple[str, str | int]] = [
        ("grpc.enable_retries", 0),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_http_proxy", 0),
    ]
    if spec.tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=spec.tls_ca_pem.encode())
        if spec.tls_server_name or not _is_ip(host):
            options.append(("grpc.ssl_target_name_override", spec.tls_server_name or host))
        channel = grpc.aio.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.aio.insecure_channel(address, options=options)
    async with channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=spec.grpc_service), wait_for_ready=False
            )
        except grpc.aio.AioRpcError as exc:
            return Outcome(False, f"{spec.name} {exc.code().name}: {(exc.details() or '')[:120]}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return Outcome(response.status == health_pb2.HealthCheckResponse.SERVING, f"{spec.name} {status}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
