"""The validation rules and defaults of discovery.model (no etcd needed)."""

from __future__ import annotations

import pytest

from discovery.errors import InvalidArgument
from discovery.model import (
    DEFAULT_WEIGHT,
    MAX_INSTANCE_ID_LEN,
    default_instance_id,
    normalize_registration,
    split_address,
    validate_instance_id,
    validate_service,
)
from discovery_pb.v1.types_pb2 import Instance, Status

# --- split_address ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("255.255.255.255:65535", ("255.255.255.255", 65535)),
        ("[::1]:8080", ("[::1]", 8080)),
        ("[2001:db8::1]:443", ("[2001:db8::1]", 443)),
        ("[::ffff:10.0.0.1]:80", ("[::ffff:10.0.0.1]", 80)),
        ("localhost:9000", ("localhost", 9000)),
        ("api-1.eu.example.com:443", ("api-1.eu.example.com", 443)),
        ("Web.Example.COM.:80", ("Web.Example.COM.", 80)),
        ("1e100.net:80", ("1e100.net", 80)),
    ],
)
def test_split_address_accepts(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize(
    ("address", "rule"),
    [
        ("", "required"),
        ("10.0.0.1", "must be HOST:PORT"),
        (":80", "must be HOST:PORT"),
        ("10.0.0.1:", "from 1 to 65535"),
        ("10.0.0.1:0", "from 1 to 65535"),
        ("10.0.0.1:65536", "from 1 to 65535"),
        ("10.0.0.1:-1", "from 1 to 65535"),
        ("10.0.0.1:http", "from 1 to 65535"),
        ("10.0.0.1:²", "from 1 to 65535"),  # str.isdigit() says yes; int() says no
        ("10.0.0.1:١٢", "from 1 to 65535"),  # Arabic-Indic digits: int() would take them
        ("999.1.1.1:80", "not a valid IPv4 address"),
        ("1.2.3:80", "not a valid IPv4 address"),
        ("::1:80", "write an IPv6 address as [ADDR]:PORT"),
        ("[::1:80", "must be in brackets"),
        ("[::g]:80", "not a valid IPv6 address"),
        ("[10.0.0.1]:80", "not a valid IPv6 address"),
        ("bad_host:80", "not a valid hostname"),
        ("-bad.example:80", "not a valid hostname"),
        ("a..b:80", "not a valid hostname"),
        (f"{'a' * 64}.example:80", "not a valid hostname"),
        (".".join(["a" * 63] * 4) + ":80", "not a valid hostname"),  # 255 characters
    ],
)
def test_split_address_rejects(address: str, rule: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        split_address(address, "instance.address")
    assert err.value.field == "instance.address"
    assert rule in err.value.rule


def test_split_address_port_zero_only_when_allowed() -> None:
    assert split_address("127.0.0.1:0", "listen", allow_port_zero=True) == ("127.0.0.1", 0)


# --- service names and instance ids -----------------------------------------------------


@pytest.mark.parametrize("name", ["web", "a", "payments.eu", "a-b.c-d.e0", "0svc", "x" * 63, ".".join(["a" * 63] * 3)])
def test_validate_service_accepts(name: str) -> None:
    assert validate_service(name) == name


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "required"),
        ("Web", "lowercase DNS labels"),
        ("my_service", "lowercase DNS labels"),
        ("a..b", "lowercase DNS labels"),
        (".web", "lowercase DNS labels"),
        ("web.", "lowercase DNS labels"),
        ("-web", "lowercase DNS labels"),
        ("web-", "lowercase DNS labels"),
        ("web/x", "lowercase DNS labels"),
        ("x" * 64, "lowercase DNS labels"),
        (".".join(["a" * 63] * 4), "at most 253 characters"),  # 255 characters of valid labels
    ],
)
def test_validate_service_rejects(name: str, rule: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_service(name, "instance.service")
    assert err.value.field == "instance.service"
    assert rule in err.value.rule


@pytest.mark.parametrize("value", ["", "a/b", "-a", "a b", "é", "x" * (MAX_INSTANCE_ID_LEN + 1)])
def test_validate_instance_id_rejects(value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_instance_id(value)
    assert err.value.field == "instance_id"


@pytest.mark.parametrize("value", ["a", "web-1", "10.0.0.1-80", "host:80", "A_b.c", "x" * MAX_INSTANCE_ID_LEN])
def test_validate_instance_id_accepts(value: str) -> None:
    assert validate_instance_id(value) == value


# --- derived instance ids ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.1:80", "10.0.0.1-80"),
        ("Web.Example.com:443", "web.example.com-443"),
        ("web.example.com.:443", "web.example.com-443"),
        ("[::1]:80", "0000-0000-0000-0000-0000-0000-0000-0001-80"),
        ("[2001:db8::1]:80", "2001-0db8-0000-0000-0000-0000-0000-0001-80"),
    ],
)
def test_default_instance_id(address: str, expected: str) -> None:
    assert default_instance_id(address) == expected
    assert validate_instance_id(default_instance_id(address))


def test_default_instance_id_is_one_per_address() -> None:
    assert default_instance_id("[2001:db8::1]:80") == default_instance_id("[2001:0db8:0:0::1]:80")
    assert default_instance_id("10.0.0.1:80") == default_instance_id("10.0.0.1:080")
    assert default_instance_id("10.0.0.1:80") != default_instance_id("10.0.0.1:81")


def test_default_instance_id_of_a_long_hostname_fits() -> None:
    long_a = ".".join(["a" * 60] * 4) + ":80"
    long_b = ".".join(["a" * 60] * 3 + ["b" * 60]) + ":80"
    ids = {default_instance_id(long_a), default_instance_id(long_b)}
    assert len(ids) == 2
    for ident in ids:
        assert len(ident) == MAX_INSTANCE_ID_LEN
        assert validate_instance_id(ident)
    assert default_instance_id(long_a) == default_instance_id(long_a)


# --- normalize_registration -------------------------------------------------------------


def test_normalize_fills_in_what_the_server_owns() -> None:
    request = Instance(service="web", address="10.0.0.1:80")
    record = normalize_registration(request, "us-east", now_ms=1234)
    assert record.instance_id == "10.0.0.1-80"
    assert record.region == "us-east"
    assert record.weight == DEFAULT_WEIGHT
    assert record.status == Status.SERVING
    assert record.registered_at_ms == 1234
    assert record.ttl_seconds == 0
    assert request.instance_id == "" and request.region == ""  # the request is not modified


def test_normalize_keeps_what_the_caller_gave() -> None:
    request = Instance(
        service="web",
        instance_id="web-1",
        region="us-east",
        zone="us-east-1a",
        address="[::1]:80",
        metadata={"build": "42", "team/owner": "core"},
        tags=["canary", "v=2"],
        weight=7,
        status=Status.DRAINING,
        version="1.2.3",
        ttl_seconds=30,
    )
    record = normalize_registration(request, "us-east", now_ms=1)
    expected = Instance()
    expected.CopyFrom(request)
    expected.registered_at_ms = 1
    assert record == expected


def test_normalize_ipv6_without_id_gets_a_valid_id() -> None:
    record = normalize_registration(Instance(service="web", address="[::1]:80"), "us-east")
    assert validate_instance_id(record.instance_id)


def _with(**fields: object) -> Instance:
    base: dict[str, object] = {"service": "web", "address": "10.0.0.1:80"}
    base.update(fields)
    return Instance(**base)


@pytest.mark.parametrize(
    ("instance", "field"),
    [
        (_with(service=""), "instance.service"),
        (_with(address=""), "instance.address"),
        (_with(instance_id="a/b"), "instance.instance_id"),
        (_with(region="eu-west"), "instance.region"),
        (_with(zone="Zone_A"), "instance.zone"),
        (_with(version="v" * 65), "instance.version"),
        (_with(tags=["a"] * 2), "instance.tags"),
        (_with(metadata={"k": "v" * 1025}), "instance.metadata[k]"),
        (_with(weight=10_001), "instance.weight"),
        (_with(ttl_seconds=3601), "instance.ttl_seconds"),
        (_with(status=7), "instance.status"),
        (_with(metadata={f"k{i}": "v" * 1000 for i in range(20)}), "instance"),
    ],
)
def test_normalize_rejects(instance: Instance, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        normalize_registration(instance, "us-east")
    assert err.value.field == field


@pytest.mark.parametrize(("ttl", "ok"), [(0, True), (1, True), (3600, True), (3601, False)])
def test_normalize_ttl_bounds(ttl: int, ok: bool) -> None:
    if ok:
        assert normalize_registration(_with(ttl_seconds=ttl), "r").ttl_seconds == ttl
    else:
        with pytest.raises(InvalidArgument):
            normalize_registration(_with(ttl_seconds=ttl), "r")
