"""Active health checks as the client states them: ``check("tcp")``, ``check("grpc:NAME")``,
``check("http:/healthz")`` (``https:`` and ``grpcs`` over TLS, with the CA to trust), and the
check's verdict on a resolved endpoint (``CheckState``). The servers of the instance's region
run the check (docs/health-checks.md in the server's repository)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from discovery_client.errors import InvalidArgument
from discovery_pb.v1 import types_pb2

KINDS = "tcp, grpc[:SERVICE], grpcs[:SERVICE], http:PATH or https:PATH"


def check(
    spec: str,
    *,
    interval: float | None = None,
    timeout: float | None = None,
    failures: int = 0,
    successes: int = 0,
    ca_pem: str = "",
    server_name: str = "",
) -> types_pb2.HealthCheck:
    """The ``HealthCheck`` of ``spec`` (see KINDS); ``interval`` and ``timeout`` in seconds
    (None: the server's defaults, 10 s and 2 s); ``failures``/``successes``: the thresholds
    (0: 3 and 2). The server validates the rest."""
    kind, _, target = spec.partition(":")
    message = types_pb2.HealthCheck(
        interval_ms=_ms(interval, "interval"),
        timeout_ms=_ms(timeout, "timeout"),
        failures_before_critical=failures,
        successes_before_passing=successes,
        tls_ca_pem=ca_pem,
        tls_server_name=server_name,
    )
    if kind == "tcp" and not target:
        message.kind = types_pb2.HealthCheck.TCP
    elif kind in ("grpc", "grpcs"):
        message.kind = types_pb2.HealthCheck.GRPC
        message.grpc_service = target
        message.tls = kind == "grpcs"
    elif kind in ("http", "https") and target:
        message.kind = types_pb2.HealthCheck.HTTP
        message.http_path = target
        message.tls = kind == "https"
    else:
        raise InvalidArgument(f"check {spec!r}: use {KINDS}")
    return message


def _ms(seconds: float | None, what: str) -> int:
    if seconds is None:
        return 0
    if not 0 < seconds <= 3600:
        raise InvalidArgument(f"check {what} {seconds!r}: seconds, more than 0 and at most 3600")
    return round(seconds * 1000)


@dataclass(frozen=True, slots=True)
class CheckState:
    """A check's last verdict: ``passing`` or ``critical``, since when (Unix ms), why, and
    the server that decided it."""

    state: str
    since_ms: int
    reason: str
    checker: str

    @classmethod
    def from_proto(cls, inst: Any) -> CheckState | None:
        if not inst.HasField("check_result"):
            return None
        result = inst.check_result
        name = types_pb2.CheckResult.State.Name(result.state).lower()
        return cls(state=name, since_ms=result.since_ms, reason=result.reason, checker=result.checker)
