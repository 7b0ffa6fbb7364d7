"""The public surface, configuration, and the pure parts (selection, picking, the guard)."""

from __future__ import annotations

import collections
import inspect

import pytest

import discovery_client
from discovery_client import (
    ClientConfig,
    ConfigError,
    DiscoveryClientError,
    Endpoint,
    GuardPolicy,
    InvalidArgument,
    NoEndpoints,
    NotFound,
    RegionServers,
    Resolution,
    Scope,
    ServerError,
    Status,
    Unavailable,
    Unreachable,
)
from discovery_client.model import Query, select
from discovery_client.picker import Picker

PUBLIC = {
    "DEFAULT_WEIGHT",
    "AccessDenied",
    "AioServiceChannel",
    "CheckState",
    "ClientConfig",
    "ClientSession",
    "ConfigError",
    "DirectClient",
    "DiscoveryClient",
    "DiscoveryClientError",
    "Endpoint",
    "GuardPolicy",
    "InvalidArgument",
    "NoEndpoints",
    "NotFound",
    "PermissionDenied",
    "RegionServers",
    "Registration",
    "Resolution",
    "ResourceExhausted",
    "RetryPolicy",
    "Scope",
    "ServerError",
    "Status",
    "Strategy",
    "SyncDiscoveryClient",
    "SyncRegistration",
    "SyncServiceChannel",
    "TlsConfig",
    "Unauthenticated",
    "Unavailable",
    "Unreachable",
    "check",
    "from_rpc_error",
    "instance_message",
}

CONSTANTS = {"DEFAULT_WEIGHT"}  # values, not classes or functions: they have no module


def test_public_names() -> None:
    assert set(discovery_client.__all__) == PUBLIC
    # In ruff's order (RUF022): constants, then classes, then functions, each alphabetical.
    assert discovery_client.__all__ == sorted(PUBLIC, key=lambda n: (not n.isupper(), not n[0].isupper(), n))
    for name in PUBLIC - CONSTANTS:
        assert getattr(discovery_client, name).__module__.startswith("discovery_client.")
    assert discovery_client.DEFAULT_WEIGHT == 100


def test_sync_face_has_the_same_methods() -> None:
    for name in ("resolve", "pick", "register", "grpc_channel", "close"):
        async_params = inspect.signature(getattr(discovery_client.DiscoveryClient, name)).parameters
        sync_params = inspect.signature(getattr(discovery_client.SyncDiscoveryClient, name)).parameters
        assert list(async_params) == list(sync_params), name


def test_exception_tree() -> None:
    for cls in (ConfigError, Unavailable, InvalidArgument, NotFound, ServerError):
        assert issubclass(cls, DiscoveryClientError)
    assert issubclass(NoEndpoints, NotFound)
    assert issubclass(Unreachable, Unavailable)
    assert issubclass(ConfigError, ValueError)


def test_config_from_environment() -> None:
    env = {
        "DISCOVERY_REGION": "us-east",
        "DISCOVERY_SERVERS": "10.0.0.1:7400, 10.0.0.2:7400",
        "DISCOVERY_FAILOVER": "eu-west=10.1.0.1:7400,10.1.0.2:7400; ap-south=10.2.0.1:7400",
        "DISCOVERY_ZONE": "us-east-1a",
        "DISCOVERY_CACHE_FILE": "/tmp/x.json",
        "DISCOVERY_TIMEOUT": "2.5",
        "DISCOVERY_INSECURE": "1",
    }
    cfg = ClientConfig.from_env(env)
    assert cfg.servers == ("10.0.0.1:7400", "10.0.0.2:7400")
    assert cfg.failover == (
        RegionServers("eu-west", ("10.1.0.1:7400", "10.1.0.2:7400")),
        RegionServers("ap-south", ("10.2.0.1:7400",)),
    )
    assert cfg.regions == ("us-east", "eu-west", "ap-south")
    assert (cfg.zone, cfg.cache_file, cfg.call_timeout) == ("us-east-1a", "/tmp/x.json", 2.5)
    assert cfg.tls.insecure and not cfg.tls.enabled
    assert ClientConfig.from_env(env, zone="b").zone == "b"  # arguments win


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"DISCOVERY_REGION": "us-east"},
        {"DISCOVERY_REGION": "us-east", "DISCOVERY_SERVERS": "nohost"},
        {"DISCOVERY_REGION": "us-east", "DISCOVERY_SERVERS": "a:1", "DISCOVERY_FAILOVER": "eu-west"},
        {"DISCOVERY_REGION": "us-east", "DISCOVERY_SERVERS": "a:1", "DISCOVERY_FAILOVER": "us-east=b:2"},
        {"DISCOVERY_REGION": "us-east", "DISCOVERY_SERVERS": "a:1", "DISCOVERY_TIMEOUT": "soon"},
        {"DISCOVERY_REGION": "us-east", "DISCOVERY_SERVERS": "a:1"},  # neither TLS nor insecure
        {"DISCOVERY_REGION": "us-east", "DISCOVERY_SERVERS": "a:1", "DISCOVERY_INSECURE": "maybe"},
    ],
)
def test_bad_configuration(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        ClientConfig.from_env(env)


def ep(instance_id: str, region: str = "r1", zone: str = "", weight: int = 100, status: Status = Status.SERVING):
    return Endpoint("web", instance_id, region, zone, f"10.0.0.{len(instance_id)}:80", weight, status)


def test_select_scopes() -> None:
    endpoints = [ep("a", "r1"), ep("b", "r2"), ep("c", "r3"), ep("d", "r1", status=Status.DRAINING)]
    ids = lambda q: [e.instance_id for e in select(endpoints, q, "r1", ("r3", "r2"))]  # noqa: E731
    assert ids(Query(scope=Scope.LOCAL)) == ["a"]
    assert ids(Query(scope=Scope.FAILOVER)) == ["a"]
    assert ids(Query(scope=Scope.FAILOVER, min_healthy=2)) == ["a", "c"]  # nearest (configured order) first
    assert ids(Query(scope=Scope.ALL)) == ["a", "c", "b"]
    assert ids(Query(scope=Scope.LOCAL, statuses=frozenset({Status.DRAINING}))) == ["d"]


def resolution(*endpoints: Endpoint) -> Resolution:
    return Resolution("web", endpoints, 1, False, "test")


def test_pick_round_robin_local_zone_first_and_weighted() -> None:
    r = resolution(ep("a", zone="z1"), ep("bb", zone="z2"), ep("ccc", zone="z2"))
    assert [Picker("").pick(r).instance_id for _ in range(1)] == ["a"]
    rr = Picker("")
    assert [rr.pick(r).instance_id for _ in range(6)] == ["a", "bb", "ccc", "a", "bb", "ccc"]
    local = Picker("z2")
    assert {local.pick(r).instance_id for _ in range(10)} == {"bb", "ccc"}

    w = resolution(ep("a", weight=100), ep("bb", weight=300))
    weighted = Picker("")
    counts = collections.Counter(weighted.pick(w, "weighted").instance_id for _ in range(4000))
    assert abs(counts["bb"] / 4000 - 0.75) < 0.01
    with pytest.raises(NoEndpoints):
        Picker("").pick(resolution())
    with pytest.raises(InvalidArgument):
        Picker("").pick(w, "random")


def test_guard_policy() -> None:
    guard = GuardPolicy(max_removal_share=0.5)
    assert guard.is_destructive({1}, set())
    assert guard.is_destructive({1, 2, 3}, {1})
    assert not guard.is_destructive({1, 2}, {1})  # half is not more than half
    assert not guard.is_destructive({1, 2}, {1, 2, 3})
    assert not guard.is_destructive(set(), set())
    assert not GuardPolicy(enabled=False).is_destructive({1}, set())
    with pytest.raises(ConfigError):
        GuardPolicy(max_removal_share=2).validate()
