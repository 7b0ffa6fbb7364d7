"""Bad input gets INVALID_ARGUMENT naming the field and the rule, and nothing is written.

Every row registers one bad instance against a fresh server; then a good "sentinel" write
and a read at its revision prove the bad one never reached etcd (etcd's revisions are
totally ordered, so a write that had happened would be visible by then).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import grpc
import grpc.aio
import pytest

from discovery_pb.v1 import admin_pb2, lookup_pb2, registry_pb2
from tests.support.helpers import ALL_STATUSES, CALL_TIMEOUT, instance, register, resolve

REGION = "us-east"


class Bad(NamedTuple):
    fields: dict[str, Any]  # of the request (for Register: of the instance, over web at 10.0.0.1:80)
    field: str  # the field the error must name...
    rule: str  # ...and words of the rule it must state


def bad(field: str, rule: str, **fields: Any) -> Any:
    """One table row."""
    return pytest.param(Bad(fields, field, rule), id=f"{field}:{rule}")


LABEL_64 = "x" * 64
NAME_255 = ".".join(["a" * 63] * 4)  # valid labels, 255 characters

REGISTER_RULES = [
    # service names
    bad("instance.service", "required", service=""),
    bad("instance.service", "lowercase DNS labels", service="Web"),
    bad("instance.service", "lowercase DNS labels", service="my_service"),
    bad("instance.service", "lowercase DNS labels", service="web..api"),
    bad("instance.service", "at most 253 characters", service=NAME_255),
    bad("instance.service", "lowercase DNS labels", service=LABEL_64),
    # instance ids
    bad("instance.instance_id", "letters, digits", instance_id="web/1"),
    bad("instance.instance_id", "1-128 characters", instance_id="x" * 129),
    bad("instance.instance_id", "starting with a letter or digit", instance_id="-web"),
    # addresses
    bad("instance.address", "required", address=""),
    bad("instance.address", "HOST:PORT", address="10.0.0.1"),
    bad("instance.address", "from 1 to 65535", address="10.0.0.1:0"),
    bad("instance.address", "from 1 to 65535", address="10.0.0.1:65536"),
    bad("instance.address", "from 1 to 65535", address="10.0.0.1:١٢"),
    bad("instance.address", "not a valid IPv4 address", address="999.1.1.1:80"),
    bad("instance.address", "[ADDR]:PORT", address="2001:db8::1:80"),
    bad("instance.address", "not a valid IPv6 address", address="[2001:db8::g]:80"),
    bad("instance.address", "not a valid hostname", address="bad_host.example:80"),
    # metadata
    bad("instance.metadata", "at most 64", metadata={f"k{i}": "v" for i in range(65)}),
    bad("instance.metadata", "key 'a b'", metadata={"a b": "v"}),
    bad("instance.metadata", "key ''", metadata={"": "v"}),
    bad("instance.metadata", "1-128 characters", metadata={"k" * 129: "v"}),
    bad("instance.metadata[k]", "at most 1024", metadata={"k": "v" * 1025}),
    # tags
    bad("instance.tags", "at most 32", tags=[f"t{i}" for i in range(33)]),
    bad("instance.tags", "'a b' must be", tags=["a b"]),
    bad("instance.tags", "'' must be", tags=[""]),
    bad("instance.tags", "1-64 characters", tags=["t" * 65]),
    bad("instance.tags", "duplicate tag", tags=["canary", "canary"]),
    # the rest of the record
    bad("instance.weight", "from 1 to 10000", weight=10_001),
    bad("instance.ttl_seconds", "from 1 to 3600", ttl_seconds=3601),
    bad("instance.region", "this server's region 'us-east'", region="eu-west"),
    bad("instance.zone", "a-z, 0-9", zone="Zone_A"),
    bad("instance.version", "at most 64", version="v" * 65),
    bad("instance.status", "unknown status", status=7),
    # request size: each entry is within its limits, the record is not
    bad("instance", "exceeds 16384", metadata={f"k{i}": "v" * 1000 for i in range(20)}),
]


async def assert_nothing_written(stubs: Any) -> None:
    sentinel = await register(stubs, "sentinel", "10.9.9.9:1")
    assert (await resolve(stubs, "web", min_revision=sentinel.revision, statuses=ALL_STATUSES)).endpoints == []
    status = await stubs.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)
    assert status.revision >= sentinel.revision
    assert status.instance_count == 1, "the bad registration was written"


def assert_invalid(err: pytest.ExceptionInfo[grpc.aio.AioRpcError], case: Bad) -> None:
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert details.startswith(f"{case.field}: "), details
    assert case.rule in details, details


@pytest.mark.parametrize("case", REGISTER_RULES)
async def test_register_rejects(etcd, servers, connect, case) -> None:
    stubs = connect(await servers.start(etcd, region=REGION))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await register(stubs, **case.fields)
    assert_invalid(err, case)
    await assert_nothing_written(stubs)


async def test_register_without_an_instance(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.registry.Register(registry_pb2.RegisterRequest(), timeout=CALL_TIMEOUT)
    assert_invalid(err, Bad({}, "instance.service", "required"))
    await assert_nothing_written(stubs)


async def test_a_bad_registration_leaves_an_existing_one_alone(etcd, servers, connect) -> None:
    stubs = connect(await servers.start(etcd))
    good = await register(stubs, instance_id="web-1", weight=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await register(stubs, instance_id="web-1", weight=10_001)
    assert_invalid(err, Bad({}, "instance.weight", "from 1 to 10000"))
    later = await register(stubs, "sentinel", "10.9.9.9:1")
    [endpoint] = (await resolve(stubs, min_revision=later.revision)).endpoints
    assert endpoint.mod_revision == good.revision and endpoint.instance.weight == 10


DEREGISTER_RULES = [
    bad("service", "required", service="", instance_id="web-1"),
    bad("service", "lowercase DNS labels", service="Web", instance_id="web-1"),
    bad("service", "at most 253 characters", service=NAME_255, instance_id="web-1"),
    bad("instance_id", "required", service="web", instance_id=""),
    bad("instance_id", "letters, digits", service="web", instance_id="../web-1"),
    bad("instance_id", "1-128 characters", service="web", instance_id="x" * 129),
]


@pytest.mark.parametrize("case", DEREGISTER_RULES)
async def test_deregister_rejects(etcd, servers, connect, case) -> None:
    stubs = connect(await servers.start(etcd))
    kept = await register(stubs, instance_id="web-1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.registry.Deregister(registry_pb2.DeregisterRequest(**case.fields), timeout=CALL_TIMEOUT)
    assert_invalid(err, case)
    later = await register(stubs, "sentinel", "10.9.9.9:1")
    [endpoint] = (await resolve(stubs, min_revision=later.revision)).endpoints
    assert endpoint.mod_revision == kept.revision


RESOLVE_RULES = [
    bad("service", "required", service=""),
    bad("service", "lowercase DNS labels", service="Web"),
    bad("service", "lowercase DNS labels", service="my_service"),
    bad("service", "lowercase DNS labels", service="a..b"),
    bad("service", "lowercase DNS labels", service=LABEL_64),
    bad("service", "at most 253 characters", service=NAME_255),
    bad("scope", "unknown scope", service="web", scope=9),
    bad("statuses", "unknown status", service="web", statuses=[0]),
    bad("statuses", "unknown status", service="web", statuses=[9]),
]


@pytest.mark.parametrize("case", RESOLVE_RULES)
async def test_resolve_rejects(etcd, servers, connect, case) -> None:
    stubs = connect(await servers.start(etcd))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.lookup.Resolve(lookup_pb2.ResolveRequest(**case.fields), timeout=CALL_TIMEOUT)
    assert_invalid(err, case)


def test_instance_helper_builds_a_valid_base() -> None:
    """The rows above change one field of this instance; it must be valid as it is."""
    from discovery.model import normalize_registration

    assert normalize_registration(instance(), REGION).instance_id == "10.0.0.1-80"
