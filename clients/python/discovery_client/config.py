"""Client configuration: a frozen value object, read from the environment only on request."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from discovery_client.errors import ConfigError
from discovery_client.guard import GuardPolicy
from discovery_client.retry import RetryPolicy
from discovery_client.tls import TlsConfig

ENV_REGION = "DISCOVERY_REGION"
ENV_ZONE = "DISCOVERY_ZONE"
ENV_SERVERS = "DISCOVERY_SERVERS"
ENV_FAILOVER = "DISCOVERY_FAILOVER"
ENV_CACHE_FILE = "DISCOVERY_CACHE_FILE"
ENV_TIMEOUT = "DISCOVERY_TIMEOUT"


@dataclass(frozen=True, slots=True)
class RegionServers:
    """The discovery servers of one region, in the order they are tried."""

    region: str
    servers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Everything a ``DiscoveryClient`` needs.

    Args:
        region: the region this process runs in; LOCAL answers are this region's instances,
            and registrations go to this region's servers only.
        servers: ``host:port`` of this region's discovery servers, tried in turn.
        failover: other regions' servers, nearest first; tried when none of ``servers``
            answers, and the order in which FAILOVER answers add regions.
        zone: this process's zone: ``pick()`` prefers endpoints in it, ``register()`` uses it.
        call_timeout: deadline of each unary call to one server (seconds).
        retry: backoff, jitter and the overall deadline shared by every call and stream.
        keepalive_seconds: gRPC keep-alive ping interval and timeout; a hung server is found
            in about twice this. Servers permit pings every second, so keep it >= 1.
        watch_idle_timeout: a Watch stream with no message (the server sends a KEEPALIVE
            every 5 s by default) for this long is treated as dead; about twice the server's
            ``watch_keepalive_seconds``.
        stream_max_seconds: deadline of each Watch and Heartbeat stream; it is then resumed.
        home_retry_seconds: while following another region's server, how often to check
            whether a server of this region answers again, to move back.
        cache_file: where to persist the views of resolved services, so a process that starts
            while every server is unreachable still resolves (stale). None: no file.
        cache_file_interval: the file is rewritten at most this often (seconds).
        channel_drain_seconds: how long a replaced ``grpc_channel`` keeps serving in-flight calls.
        guard: the destructive-update guard.
        sessions: leased registrations share one session (one lease, one Heartbeat stream,
            one RegisterBatch to come back after losing it); False: a lease per instance.
            A server without sessions (UNIMPLEMENTED) gets a lease per instance anyway.
        session_ttl: the session's TTL in seconds; 0: the TTL of the first leased
            registration (10 by default).
        tls: how channels to the servers are secured; by default from the
            ``DISCOVERY_TLS_*`` / ``DISCOVERY_INSECURE`` environment (``TlsConfig.from_env``).
            One of mTLS files or an explicit insecure switch is required.
    """

    region: str
    servers: tuple[str, ...]
    failover: tuple[RegionServers, ...] = ()
    zone: str = ""
    call_timeout: float = 3.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    keepalive_seconds: float = 2.0
    watch_idle_timeout: float = 11.0
    stream_max_seconds: float = 600.0
    home_retry_seconds: float = 10.0
    cache_file: str | None = None
    cache_file_interval: float = 1.0
    channel_drain_seconds: float = 5.0
    guard: GuardPolicy = field(default_factory=GuardPolicy)
    sessions: bool = True
    session_ttl: int = 0
    tls: TlsConfig = field(default_factory=TlsConfig.from_env)

    def validate(self) -> ClientConfig:
        """Check every field; returns self so ``ClientConfig(...).validate()`` chains."""
        if not self.region:
            raise ConfigError(f"region is required (or set {ENV_REGION})")
        if not self.servers:
            raise ConfigError(f"at least one server of region {self.region!r} is required (or set {ENV_SERVERS})")
        seen = {self.region}
        for other in self.failover:
            if other.region in seen:
                raise ConfigError(f"failover: region {other.region!r} is listed twice (or is the own region)")
            if not other.servers:
                raise ConfigError(f"failover: region {other.region!r} has no servers")
            seen.add(other.region)
        for address in self.servers + tuple(s for r in self.failover for s in r.servers):
            _check_address(address)
        check_settings(self)
        return self

    @property
    def regions(self) -> tuple[str, ...]:
        """This region, then the failover regions in order."""
        return (self.region, *(r.region for r in self.failover))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ClientConfig:
        """A validated config from ``DISCOVERY_*`` variables; keyword arguments win over them.

        ``DISCOVERY_REGION=us-east``, ``DISCOVERY_SERVERS=10.0.0.1:7400,10.0.0.2:7400``,
        ``DISCOVERY_FAILOVER="eu-west=10.1.0.1:7400,10.1.0.2:7400;ap-south=10.2.0.1:7400"``,
        ``DISCOVERY_ZONE=us-east-1a``, ``DISCOVERY_CACHE_FILE=/var/cache/app/discovery.json``,
        ``DISCOVERY_TIMEOUT=3`` (the per-call deadline, seconds); TLS from
        ``DISCOVERY_TLS_CA``, ``DISCOVERY_TLS_CERT``, ``DISCOVERY_TLS_KEY``,
        ``DISCOVERY_TLS_SERVER_NAME``, or ``DISCOVERY_INSECURE=1`` (see ``TlsConfig``).
        """
        env = os.environ if environ is None else environ
        settings: dict[str, Any] = {
            "region": env.get(ENV_REGION, "").strip(),
            "servers": parse_servers(env.get(ENV_SERVERS, "")),
            "failover": parse_failover(env.get(ENV_FAILOVER, "")),
            "zone": env.get(ENV_ZONE, "").strip(),
            "cache_file": env.get(ENV_CACHE_FILE, "").strip() or None,
            "tls": TlsConfig.from_env(env),
        }
        if env.get(ENV_TIMEOUT, "").strip():
            try:
                settings["call_timeout"] = float(env[ENV_TIMEOUT])
            except ValueError:
                raise ConfigError(f"{ENV_TIMEOUT}={env[ENV_TIMEOUT]!r} is not a number of seconds") from None
        return cls(**(settings | overrides)).validate()

    def with_(self, **changes: Any) -> ClientConfig:
        """A copy with ``changes`` applied, validated."""
        return replace(self, **changes).validate()


def check_settings(config: ClientConfig) -> None:
    """Check the timings and policies; apart from ``validate`` for DirectClient, whose config
    has no region and whose servers are gRPC targets of any form."""
    positive = ("call_timeout", "watch_idle_timeout", "stream_max_seconds", "home_retry_seconds")
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be > 0")
    if config.keepalive_seconds < 1:
        raise ConfigError("keepalive_seconds must be >= 1 (servers refuse more frequent pings)")
    if config.cache_file_interval < 0 or config.channel_drain_seconds < 0:
        raise ConfigError("cache_file_interval and channel_drain_seconds must be >= 0")
    if not 0 <= config.session_ttl <= 3600:
        raise ConfigError("session_ttl must be 0 (the first registration's ttl) or 1..3600 seconds")
    config.retry.validate()
    config.guard.validate()
    config.tls.validate()


def parse_servers(text: str) -> tuple[str, ...]:
    """``"a:1, b:2"`` -> ``("a:1", "b:2")``."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parse_failover(text: str) -> tuple[RegionServers, ...]:
    """``"eu-west=a:1,b:2;ap-south=c:3"`` -> regions in the order written."""
    out = []
    for part in text.split(";"):
        if not part.strip():
            continue
        region, sep, servers = part.partition("=")
        if not sep or not region.strip():
            raise ConfigError(f"{ENV_FAILOVER}: {part.strip()!r} is not REGION=HOST:PORT[,HOST:PORT...]")
        out.append(RegionServers(region.strip(), parse_servers(servers)))
    return tuple(out)


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"server {address!r} is not HOST:PORT")
