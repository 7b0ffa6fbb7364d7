"""Client configurations for the client library's tests: fast failure detection against the
real servers of tests/support/servers.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from discovery.server import Server
from discovery_client import ClientConfig, GuardPolicy, RegionServers, RetryPolicy

# The test servers send a Watch KEEPALIVE every 0.5 s; a stream quiet for 2 s is dead.
FAST: dict[str, Any] = {
    "call_timeout": 1.0,
    "keepalive_seconds": 1.0,
    "watch_idle_timeout": 2.0,
    "home_retry_seconds": 0.5,
    "cache_file_interval": 0.05,
    "channel_drain_seconds": 0.2,
    "retry": RetryPolicy(attempts=2, deadline=5.0, base_delay=0.05, max_delay=0.3),
    "guard": GuardPolicy(grace_seconds=2.0),
}


def addresses(servers: Sequence[Server | str]) -> tuple[str, ...]:
    return tuple(s if isinstance(s, str) else f"127.0.0.1:{s.port}" for s in servers)


def config(
    servers: Sequence[Server | str],
    region: str = "us-east",
    failover: dict[str, Sequence[Server | str]] | None = None,
    **overrides: Any,
) -> ClientConfig:
    """A fast-failing ClientConfig for ``servers`` (this region) and ``failover`` (in order)."""
    others = tuple(RegionServers(r, addresses(s)) for r, s in (failover or {}).items())
    return ClientConfig(region=region, servers=addresses(servers), failover=others, **(FAST | overrides)).validate()
