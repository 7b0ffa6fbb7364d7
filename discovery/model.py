"""The instance record and the rules a registration must satisfy.

The record is the protobuf ``Instance`` itself (stored as protobuf bytes, docs/architecture.md), so
the view keeps decoded messages and Resolve copies them out without a second model. This
module owns every rule about what a valid record is; validation raises ``InvalidArgument``
naming the field and the rule, before anything is written.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import time

from discovery.errors import InvalidArgument
from discovery_client import DEFAULT_WEIGHT
from discovery_pb.v1.types_pb2 import CheckResult, Instance, Status

MAX_SERVICE_LEN = 253
MAX_INSTANCE_ID_LEN = 128
MAX_ZONE_LEN = 64
MAX_VERSION_LEN = 64
MAX_TAGS = 32
MAX_TAG_LEN = 64
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_LEN = 128
MAX_METADATA_VALUE_LEN = 1024
MAX_RECORD_BYTES = 16 * 1024
MIN_TTL, MAX_TTL = 1, 3600
MAX_WEIGHT = 10_000
# What a Resolve or Watch returns when it names no status.
SERVING_STATUSES: frozenset[int] = frozenset({Status.SERVING})


def serving_status(status: int, check_state: int) -> int:
    """The one rule of what an endpoint is served as (docs/health-checks.md): its owner's
    status, except that SERVING with a CRITICAL check is NOT_SERVING. DRAINING and
    NOT_SERVING from the owner win over any check; no verdict yet counts as passing."""
    if status == Status.SERVING and check_state == CheckResult.CRITICAL:
        return Status.NOT_SERVING
    return status


def served(instance: Instance) -> Instance:
    """``instance`` (changed in place, and returned) with the status it is served as: what
    answers (Resolve, Watch, xDS) show, so that clients that know nothing of checks stop
    using a failing endpoint. The stored record keeps the owner's status."""
    instance.status = serving_status(instance.status, instance.check_result.state)  # type: ignore[assignment]
    return instance


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SERVICE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_ZONE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=-]*")
_META_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII only: str.isdigit() also takes superscripts and non-Latin digits
_DOTTED_DIGITS = re.compile(r"[0-9.]+")
_REGION = _ZONE

SERVICE_RULE = "lowercase DNS labels (a-z, 0-9, '-') joined by dots, at most 253 characters"


def validate_service(name: str, field: str = "service") -> str:
    if not name:
        raise InvalidArgument(field, "required")
    if len(name) > MAX_SERVICE_LEN or not _SERVICE.fullmatch(name):
        raise InvalidArgument(field, f"{name[:80]!r} is not {SERVICE_RULE}")
    return name


def validate_instance_id(value: str, field: str = "instance_id") -> str:
    if not value:
        raise InvalidArgument(field, "required")
    if len(value) > MAX_INSTANCE_ID_LEN or not _INSTANCE_ID.fullmatch(value):
        raise InvalidArgument(
            field,
            f"{value[:80]!r} must be 1-{MAX_INSTANCE_ID_LEN} characters of letters, digits, "
            "'.', '_', ':', '-', starting with a letter or digit",
        )
    return value


def validate_region(value: str, field: str = "region") -> str:
    if not value or len(value) > MAX_ZONE_LEN or not _REGION.fullmatch(value):
        raise InvalidArgument(field, f"{value!r} must be 1-64 characters of a-z, 0-9 and '-'")
    return value


def split_address(address: str, field: str = "address", *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port`` (IPv4, ``[IPv6]`` or hostname); the rule names the field.
    ``allow_port_zero`` is for listen addresses, where 0 asks for any free port."""
    if not address:
        raise InvalidArgument(field, "required (HOST:PORT)")
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise InvalidArgument(field, f"{address[:80]!r} must be HOST:PORT")
    if not _PORT.fullmatch(port_text) or not (0 if allow_port_zero else 1) <= int(port_text) <= 65535:
        raise InvalidArgument(field, f"port {port_text[:10]!r} must be a number from 1 to 65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise InvalidArgument(field, f"{address[:80]!r}: an IPv6 address must be in brackets")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidArgument(field, f"{host[:80]!r} is not a valid IPv6 address") from None
    elif ":" in host:
        raise InvalidArgument(field, f"{address[:80]!r}: write an IPv6 address as [ADDR]:PORT")
    elif _DOTTED_DIGITS.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise InvalidArgument(field, f"{host!r} is not a valid IPv4 address") from None
    elif len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise InvalidArgument(field, f"{host[:80]!r} is not a valid hostname")
    return host, int(port_text)


def default_instance_id(address: str) -> str:
    """An id derived from the address, so registering the same address twice is idempotent.

    ``10.0.0.1:80`` gives ``10.0.0.1-80``; a hostname is lowercased (DNS ignores case); an
    IPv6 address is written out in full with ``-`` for ``:`` so that the id starts with a
    digit and every spelling of one address gives one id. An id that would be longer than
    the limit keeps its start and ends with a hash of the whole.
    """
    host, port = split_address(address)
    host = ipaddress.IPv6Address(host[1:-1]).exploded if host.startswith("[") else host.lower().rstrip(".")
    ident = re.sub(r"[^A-Za-z0-9._-]", "-", f"{host}-{port}")
    if len(ident) > MAX_INSTANCE_ID_LEN:
        digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
        ident = f"{ident[: MAX_INSTANCE_ID_LEN - len(digest) - 1]}-{digest}"
    return ident


def _validate_tags(tags: list[str]) -> None:
    if len(tags) > MAX_TAGS:
        raise InvalidArgument("instance.tags", f"{len(tags)} tags; at most {MAX_TAGS}")
    for tag in tags:
        if len(tag) > MAX_TAG_LEN or not _TAG.fullmatch(tag):
            raise InvalidArgument(
                "instance.tags",
                f"{tag[:80]!r} must be 1-{MAX_TAG_LEN} characters of letters, digits, '.', '_', ':', '=', '-'",
            )
    if len(set(tags)) != len(tags):
        raise InvalidArgument("instance.tags", "duplicate tag")


def _validate_metadata(metadata: dict[str, str]) -> None:
    field = "instance.metadata"
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(field, f"{len(metadata)} entries; at most {MAX_METADATA_ENTRIES}")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_LEN or not _META_KEY.fullmatch(key):
            raise InvalidArgument(
                field,
                f"key {key[:80]!r} must be 1-{MAX_METADATA_KEY_LEN} characters of letters, digits, '.', '_', '/', '-'",
            )
        if len(value.encode()) > MAX_METADATA_VALUE_LEN:
            raise InvalidArgument(
                f"{field}[{key}]", f"value is {len(value.encode())} bytes; at most {MAX_METADATA_VALUE_LEN}"
            )


def normalize_registration(request: Instance, region: str, now_ms: int | None = None, *, owner: str = "") -> Instance:
    """Validate a registration and return the record to store (a new message).

    Fills in what the server owns: the origin region, the registration time, the default
    weight and status, an instance id derived from the address when none is given, and the
    owner (the caller's identity; whatever the request said is overwritten).
    """
    validate_service(request.service, "instance.service")
    split_address(request.address, "instance.address")
    record = Instance()
    record.CopyFrom(request)
    if not record.instance_id:
        record.instance_id = default_instance_id(record.address)
    validate_instance_id(record.instance_id, "instance.instance_id")
    if record.region and record.region != region:
        raise InvalidArgument(
            "instance.region",
            f"{record.region!r} is not this server's region {region!r}: register in the origin region",
        )
    record.region = region
    record.owner = owner
    if record.zone and (len(record.zone) > MAX_ZONE_LEN or not _ZONE.fullmatch(record.zone)):
        raise InvalidArgument(
            "instance.zone", f"{record.zone[:80]!r} must be at most 64 characters of a-z, 0-9 and '-'"
        )
    if len(record.version) > MAX_VERSION_LEN:
        raise InvalidArgument("instance.version", f"at most {MAX_VERSION_LEN} characters")
    _validate_tags(list(record.tags))
    _validate_metadata(dict(record.metadata))
    if record.weight == 0:
        record.weight = DEFAULT_WEIGHT
    elif record.weight > MAX_WEIGHT:
        raise InvalidArgument(
            "instance.weight", f"{record.weight} must be from 1 to {MAX_WEIGHT} (0 means {DEFAULT_WEIGHT})"
        )
    if record.ttl_seconds and not MIN_TTL <= record.ttl_seconds <= MAX_TTL:
        raise InvalidArgument(
            "instance.ttl_seconds", f"{record.ttl_seconds} must be 0 (static) or from {MIN_TTL} to {MAX_TTL} seconds"
        )
    if record.status not in Status.values():
        raise InvalidArgument("instance.status", f"unknown status {record.status}")
    if record.status == Status.STATUS_UNSPECIFIED:
        record.status = Status.SERVING
    record.registered_at_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    size = record.ByteSize()
    if size > MAX_RECORD_BYTES:
        raise InvalidArgument("instance", f"encoded size {size} bytes exceeds {MAX_RECORD_BYTES}")
    return record
