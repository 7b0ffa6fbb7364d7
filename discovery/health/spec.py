"""What a check is: its rules (validated on Register), its settings with the defaults filled
in, and what survives a re-registration (docs/health-checks.md).

Pure: imports only the errors and the generated messages, so the registry can validate a
check without loading the checker."""

from __future__ import annotations

from dataclasses import dataclass

from discovery.errors import InvalidArgument
from discovery_pb.v1.types_pb2 import CheckResult, HealthCheck, Instance

DEFAULT_INTERVAL_MS = 10_000
DEFAULT_TIMEOUT_MS = 2_000
DEFAULT_FAILURES = 3
DEFAULT_SUCCESSES = 2
MIN_INTERVAL_MS = 1_000  # servers may lower it for tests (health_min_interval_seconds)
MAX_INTERVAL_MS = 3_600_000
MIN_TIMEOUT_MS = 10
MAX_TIMEOUT_MS = 60_000
MAX_THRESHOLD = 100
MAX_PATH = 1024
MAX_GRPC_SERVICE = 253
MAX_CA_PEM = 8 * 1024
MAX_SERVER_NAME = 253

KIND_NAMES: dict[int, str] = {HealthCheck.TCP: "tcp", HealthCheck.GRPC: "grpc", HealthCheck.HTTP: "http"}


@dataclass(frozen=True, slots=True)
class Spec:
    """A check with its defaults filled in: what the checker runs."""

    kind: int
    grpc_service: str
    http_path: str
    tls: bool
    tls_ca_pem: str
    tls_server_name: str
    interval: float  # seconds
    timeout: float
    failures: int
    successes: int

    @classmethod
    def of(cls, check: HealthCheck) -> Spec:
        return cls(
            kind=check.kind,
            grpc_service=check.grpc_service,
            http_path=check.http_path,
            tls=check.tls,
            tls_ca_pem=check.tls_ca_pem,
            tls_server_name=check.tls_server_name,
            interval=(check.interval_ms or DEFAULT_INTERVAL_MS) / 1000,
            timeout=(check.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000,
            failures=check.failures_before_critical or DEFAULT_FAILURES,
            successes=check.successes_before_passing or DEFAULT_SUCCESSES,
        )

    @property
    def name(self) -> str:
        """How logs and reasons name the probe: ``tcp``, ``grpc``, ``https``..."""
        base = KIND_NAMES.get(self.kind, "unknown")
        return f"{base}s" if self.tls and self.kind != HealthCheck.TCP else base


def validate_check(
    check: HealthCheck, *, min_interval_ms: int = MIN_INTERVAL_MS, field: str = "instance.check"
) -> None:
    """Raise ``InvalidArgument`` naming the field and the rule when ``check`` cannot run."""
    if check.kind not in KIND_NAMES:
        raise InvalidArgument(f"{field}.kind", "must be TCP, GRPC or HTTP")
    _validate_timing(check, min_interval_ms, field)
    _validate_target(check, field)
    _validate_tls(check, field)


def _validate_timing(check: HealthCheck, min_interval_ms: int, field: str) -> None:
    interval = check.interval_ms or DEFAULT_INTERVAL_MS
    timeout = check.timeout_ms or DEFAULT_TIMEOUT_MS
    if not min_interval_ms <= interval <= MAX_INTERVAL_MS:
        raise InvalidArgument(
            f"{field}.interval_ms",
            f"{interval} ms must be from {min_interval_ms} to {MAX_INTERVAL_MS} (0: {DEFAULT_INTERVAL_MS})",
        )
    if not MIN_TIMEOUT_MS <= timeout <= MAX_TIMEOUT_MS:
        raise InvalidArgument(
            f"{field}.timeout_ms",
            f"{timeout} ms must be from {MIN_TIMEOUT_MS} to {MAX_TIMEOUT_MS} (0: {DEFAULT_TIMEOUT_MS})",
        )
    if timeout >= interval:
        raise InvalidArgument(
            f"{field}.timeout_ms",
            f"{timeout} ms must be less than the interval ({interval} ms): probes must not overlap",
        )
    for name, value in (
        ("failures_before_critical", check.failures_before_critical),
        ("successes_before_passing", check.successes_before_passing),
    ):
        if value > MAX_THRESHOLD:
            raise InvalidArgument(f"{field}.{name}", f"{value} must be from 1 to {MAX_THRESHOLD} (0: the default)")


def _validate_target(check: HealthCheck, field: str) -> None:
    if check.kind == HealthCheck.HTTP:
        if not check.http_path.startswith("/"):
            raise InvalidArgument(f"{field}.http_path", f"{check.http_path[:80]!r} must start with '/'")
        if len(check.http_path) > MAX_PATH or any(c <= " " or c == "\x7f" for c in check.http_path):
            raise InvalidArgument(
                f"{field}.http_path", f"at most {MAX_PATH} characters, no spaces or control characters"
            )
    elif check.http_path:
        raise InvalidArgument(f"{field}.http_path", "only an HTTP check has a path")
    if check.kind == HealthCheck.GRPC:
        if len(check.grpc_service) > MAX_GRPC_SERVICE or any(c <= " " for c in check.grpc_service):
            raise InvalidArgument(f"{field}.grpc_service", f"at most {MAX_GRPC_SERVICE} characters, no spaces")
    elif check.grpc_service:
        raise InvalidArgument(f"{field}.grpc_service", "only a GRPC check names a service")


def _validate_tls(check: HealthCheck, field: str) -> None:
    if check.kind == HealthCheck.TCP and (check.tls or check.tls_ca_pem or check.tls_server_name):
        raise InvalidArgument(f"{field}.tls", "a TCP check only connects: use GRPC or HTTP for TLS")
    if check.tls and "-----BEGIN CERTIFICATE-----" not in check.tls_ca_pem:
        raise InvalidArgument(f"{field}.tls_ca_pem", "a TLS check needs the CA to trust, as PEM certificates")
    if not check.tls and (check.tls_ca_pem or check.tls_server_name):
        raise InvalidArgument(f"{field}.tls", "tls_ca_pem and tls_server_name need tls set")
    if len(check.tls_ca_pem) > MAX_CA_PEM:
        raise InvalidArgument(f"{field}.tls_ca_pem", f"at most {MAX_CA_PEM} bytes")
    if len(check.tls_server_name) > MAX_SERVER_NAME or any(c <= " " for c in check.tls_server_name):
        raise InvalidArgument(f"{field}.tls_server_name", f"at most {MAX_SERVER_NAME} characters, no spaces")


def validate_registration(record: Instance, *, min_interval_ms: int = MIN_INTERVAL_MS) -> None:
    """The check part of a registration: the check's rules, and no verdict from the owner
    (``check_result`` is the checker's: whatever the request says is dropped)."""
    record.ClearField("check_result")
    if record.HasField("check"):
        validate_check(record.check, min_interval_ms=min_interval_ms)


def keep_result(record: Instance, existing: Instance | None) -> None:
    """A re-registration keeps the checker's verdict while it still has a check, so that
    registering again never brings a failing endpoint back for a few intervals."""
    record.ClearField("check_result")
    if existing is not None and record.HasField("check") and existing.HasField("check_result"):
        record.check_result.CopyFrom(existing.check_result)


def is_critical(instance: Instance) -> bool:
    return instance.check_result.state == CheckResult.CRITICAL
