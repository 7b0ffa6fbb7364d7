"""Server configuration: a frozen value object, read once at the entry point.

A TOML file may hold any field (``[server]`` table or top level); command-line flags win.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from discovery import etcd_endpoints
from discovery.errors import InvalidArgument
from discovery.keys import DEFAULT_PREFIX
from discovery.model import split_address, validate_region


@dataclass(frozen=True, slots=True)
class ServerConfig:
    region: str = ""
    listen: str = "127.0.0.1:7400"
    etcd: tuple[str, ...] = ("127.0.0.1:2379",)
    key_prefix: str = DEFAULT_PREFIX
    grace_seconds: float = 5.0  # in-flight calls get this long on SIGTERM
    etcd_timeout_seconds: float = 3.0  # every etcd operation, retries included
    etcd_keepalive_seconds: float = 1.0  # gRPC keep-alive towards etcd (hung member detection)
    watch_keepalive_seconds: float = 5.0  # Watch sends KEEPALIVE after this long idle
    max_wait_seconds: float = 30.0  # a min_revision wait without a deadline ends here
    history: int = 10_000  # changes kept for Watch resume
    history_bytes: int = 8 * 1024 * 1024  # ... and at most this many bytes of them
    # Other regions, nearest first: "REGION=HOST:PORT[,HOST:PORT...]". The order is the
    # proximity FAILOVER follows; the addresses are where this region's replicator pulls from.
    peers: tuple[str, ...] = ()
    advertise: str = ""  # how peers and Status name this server (default: the listen address)
    stale_after_seconds: float = 3.0  # a region not heard from for this long is served marked stale
    # An idle replication feed heartbeats this often. Receivers need stale-after >= 3 of these
    # periods; at a sixth of the default stale-after a healthy peer's age stays under a third.
    replication_heartbeat_seconds: float = 0.5
    max_staleness_seconds: float = 0.0  # stale replicas older than this are not served (0: always served)
    resume_grace_seconds: float = 10.0  # deletions from a region just back from silence wait this long
    election_ttl_seconds: int = 3  # a dead replicator leader is replaced after about this long
    # etcd writes in flight at once (registrations, sessions, heartbeats); beyond it, writes are
    # refused with RESOURCE_EXHAUSTED "overload" and a retry-after (0: no limit).
    max_pending_writes: int = 1024
    # Security (docs/security.md). Serving needs the three TLS files or an explicit insecure.
    insecure: bool = False  # plaintext, everyone may do everything: development only
    tls_cert: str = ""  # this server's certificate chain (PEM); reloaded when the file changes
    tls_key: str = ""  # its private key (PEM)
    tls_client_ca: str = ""  # CA bundle client and peer certificates must chain to
    trust_domain: str = "discovery.local"  # identities are spiffe://<trust_domain>/...
    policy_file: str = ""  # who may do what (TOML); required with TLS
    audit_log: str = ""  # one JSON line per write and denial: a file path, or "-" for stdout
    audit_fail_open: bool = False  # keep writing when the audit log cannot be written (loudly)
    reload_poll_seconds: float = 5.0  # certificates and the policy are checked this often (and on SIGHUP)
    health_listen: str = ""  # optional plaintext HOST:PORT serving only grpc.health.v1
    etcd_ca: str = ""  # etcd over TLS: the CA of etcd's server certificates
    etcd_cert: str = ""  # client certificate etcd maps to a user (its CN) under --client-cert-auth
    etcd_key: str = ""
    etcd_server_name: str = ""  # the name etcd's certificate is checked against (several members need it)
    event_loop: str = "auto"  # auto (uvloop where installed), asyncio or uvloop: discovery/eventloop.py
    # DNS (docs/dns.md): off unless dns_listen is set; UDP and TCP on that port.
    dns_listen: str = ""
    dns_domain: str = "discovery."  # names are <service>.service.<dns_domain>
    dns_ttl_seconds: int = 5  # on every record, and for negative caching (the SOA minimum)
    dns_rate_limit: float = 1000.0  # responses/s per source network (/24, /56), UDP and TCP each (0: no limit)
    # HTTP (docs/http.md): the JSON API, events, /metrics and the dashboard; off unless set.
    http_listen: str = ""  # HOST:PORT; HTTPS with client certificates unless insecure
    metrics_listen: str = ""  # optional plaintext HOST:PORT for /metrics, /healthz and /readyz alone
    http_max_streams: int = 1000  # open /v1/events streams on this server, everyone's together

    # Active health checks (docs/health-checks.md).
    health_checks: bool = True  # this server runs its share of the region's checks
    health_min_interval_seconds: float = 1.0  # the shortest interval a check may ask (tests: lower)
    health_mass_share: float = 0.5  # more than this share of a checker's targets failing at once...
    health_mass_min_targets: int = 10  # ...of at least this many: held, another server re-checks
    health_hold_intervals: int = 3  # alone in the region: held this many intervals, then applied

    def validate(self) -> ServerConfig:
        if not self.region:
            raise InvalidArgument("region", "required (--region or `region` in the config file)")
        validate_region(self.region)
        split_address(self.listen, "listen", allow_port_zero=True)
        if not self.etcd:
            raise InvalidArgument("etcd", "at least one HOST:PORT")
        # IPv4:PORT, [IPv6]:PORT or NAME:PORT; names are resolved by the store, not here
        # (a config is checked where the names of its deployment need not resolve).
        etcd_endpoints.parse(self.etcd, "etcd")
        if not self.key_prefix.startswith("/") or not self.key_prefix.endswith("/"):
            raise InvalidArgument("key_prefix", "must start and end with '/'")
        for name in (
            "grace_seconds",
            "etcd_timeout_seconds",
            "etcd_keepalive_seconds",
            "watch_keepalive_seconds",
            "max_wait_seconds",
            "stale_after_seconds",
            "replication_heartbeat_seconds",
            "election_ttl_seconds",
            "history",
            "history_bytes",
        ):
            if getattr(self, name) <= 0:
                raise InvalidArgument(name, "must be > 0")
        for name in ("max_staleness_seconds", "resume_grace_seconds", "max_pending_writes"):
            if getattr(self, name) < 0:
                raise InvalidArgument(name, "must be >= 0 (0 turns it off)")
        if not 0.05 <= self.replication_heartbeat_seconds <= 10:
            # Under 50 ms it is etcd write load at every receiver; over 10 s no stale-after fits.
            raise InvalidArgument("replication_heartbeat_seconds", "must be between 0.05 and 10")
        if self.advertise:
            split_address(self.advertise, "advertise")
        if self.health_listen:
            split_address(self.health_listen, "health_listen", allow_port_zero=True)
        self._validate_dns()
        self._validate_http()
        self._validate_listeners()
        self._validate_health_checks()
        self._validate_security()
        self._validate_runtime()
        self.peer_map()  # validates
        return self

    def _validate_dns(self) -> None:
        if self.dns_listen:
            split_address(self.dns_listen, "dns_listen", allow_port_zero=True)
        domain = self.dns_domain.lower().rstrip(".")
        if not _DNS_DOMAIN.fullmatch(domain) or len(domain) > 200:
            raise InvalidArgument(
                "dns_domain",
                f"{self.dns_domain[:80]!r} must be DNS labels (a-z, 0-9, '-') joined by dots, e.g. discovery.",
            )
        if not 0 <= self.dns_ttl_seconds <= 86400:
            raise InvalidArgument("dns_ttl_seconds", "must be from 0 to 86400")
        if self.dns_rate_limit < 0:
            raise InvalidArgument("dns_rate_limit", "must be >= 0 (0 turns it off)")

    def _validate_http(self) -> None:
        for name in ("http_listen", "metrics_listen"):
            if getattr(self, name):
                split_address(getattr(self, name), name, allow_port_zero=True)
        if self.http_max_streams <= 0:
            raise InvalidArgument("http_max_streams", "must be > 0")

    def _validate_listeners(self) -> None:
        """Two listeners on one port would stop the start ("in use"): named here already."""
        taken: dict[int, tuple[str, str]] = {}
        for name in ("listen", "health_listen", "http_listen", "metrics_listen", "dns_listen"):
            if not getattr(self, name):
                continue
            host, port = split_address(getattr(self, name), name, allow_port_zero=True)
            if port == 0:
                continue
            if port in taken:
                other, other_host = taken[port]
                if host == other_host or {host, other_host} & _ANY_HOST:
                    raise InvalidArgument(name, f"port {port} is {other}'s too: give each listener its own port")
            taken[port] = (name, host)

    def _validate_health_checks(self) -> None:
        if not 0.05 <= self.health_min_interval_seconds <= 3600:
            raise InvalidArgument("health_min_interval_seconds", "must be from 0.05 to 3600")
        if not 0 < self.health_mass_share < 1:
            raise InvalidArgument("health_mass_share", "must be between 0 and 1 (0.5: more than half)")
        for name in ("health_mass_min_targets", "health_hold_intervals"):
            if getattr(self, name) < 1:
                raise InvalidArgument(name, "must be >= 1")

    def _validate_security(self) -> None:
        tls = {"tls_cert": self.tls_cert, "tls_key": self.tls_key, "tls_client_ca": self.tls_client_ca}
        given = [name for name, value in tls.items() if value]
        if self.insecure and given:
            raise InvalidArgument("insecure", f"given together with {', '.join(given)}: choose one")
        if not self.insecure:
            if not given:
                raise InvalidArgument(
                    "tls_cert",
                    "no TLS settings: give --tls-cert, --tls-key and --tls-client-ca "
                    "(docs/security.md), or --insecure for a development server anyone can write to",
                )
            missing = [name for name, value in tls.items() if not value]
            if missing:
                raise InvalidArgument(missing[0], f"required with {', '.join(given)}")
            if not self.policy_file:
                raise InvalidArgument("policy_file", "required with TLS: without a policy every caller is denied")
        if not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise InvalidArgument("trust_domain", f"{self.trust_domain!r} is not a trust domain (e.g. example.org)")
        etcd_tls = {"etcd_cert": self.etcd_cert, "etcd_key": self.etcd_key}
        if bool(self.etcd_cert) != bool(self.etcd_key):
            missing = [name for name, value in etcd_tls.items() if not value]
            raise InvalidArgument(missing[0], "etcd_cert and etcd_key go together")
        if (self.etcd_cert or self.etcd_server_name) and not self.etcd_ca:
            raise InvalidArgument("etcd_ca", "required for etcd over TLS")
        if self.etcd_ca and len(self.etcd) > 1 and not self.etcd_server_name:
            # One channel balances over every member: one name to check their certificates against.
            raise InvalidArgument(
                "etcd_server_name",
                f"required with {len(self.etcd)} etcd endpoints over TLS: "
                "a DNS name every member's certificate carries",
            )
        if self.reload_poll_seconds <= 0:
            raise InvalidArgument("reload_poll_seconds", "must be > 0")

    def _validate_runtime(self) -> None:
        if self.event_loop not in ("auto", "asyncio", "uvloop"):  # discovery/eventloop.py CHOICES
            raise InvalidArgument("event_loop", f"{self.event_loop!r}: choose auto, asyncio or uvloop")

    @property
    def etcd_tls(self) -> bool:
        return bool(self.etcd_ca)

    def peer_map(self) -> dict[str, tuple[str, ...]]:
        """Peer regions in proximity order, each with its servers' addresses."""
        peers: dict[str, tuple[str, ...]] = {}
        for entry in self.peers:
            region, sep, addresses = entry.partition("=")
            region = region.strip()
            if not sep:
                raise InvalidArgument("peers", f"{entry!r}: expected REGION=HOST:PORT[,HOST:PORT...]")
            validate_region(region, "peers")
            if region == self.region:
                raise InvalidArgument("peers", f"{region!r} is this server's own region")
            if region in peers:
                raise InvalidArgument("peers", f"{region!r} is given twice")
            hosts = tuple(a.strip() for a in addresses.split(",") if a.strip())
            if not hosts:
                raise InvalidArgument("peers", f"{entry!r}: no HOST:PORT for {region}")
            for address in hosts:
                split_address(address, "peers")
            peers[region] = hosts
        return peers

    @property
    def proximity(self) -> tuple[str, ...]:
        return tuple(self.peer_map())


_ANY_HOST = {"0.0.0.0", "[::]", "::"}
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?")
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_DOMAIN = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


def load(path: str | None, overrides: dict[str, Any]) -> ServerConfig:
    """Read the optional TOML file, apply the non-None ``overrides`` (flags), validate."""
    values: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise InvalidArgument("config", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument("config", f"{path} is not valid TOML: {exc}") from None
        values.update(data.get("server", data))
    values.update({k: v for k, v in overrides.items() if v is not None})
    peers = values.get("peers")
    if isinstance(peers, list):
        if not all(isinstance(e, str) for e in peers):
            raise InvalidArgument("peers", 'a list of "REGION=HOST:PORT[,HOST:PORT...]" strings')
        values["peers"] = tuple(peers)
    etcd = values.get("etcd")
    if isinstance(etcd, str):
        values["etcd"] = tuple(e.strip() for e in etcd.split(",") if e.strip())
    elif isinstance(etcd, list):
        if not all(isinstance(e, str) for e in etcd):
            raise InvalidArgument("etcd", "a list of HOST:PORT strings")
        values["etcd"] = tuple(etcd)
    return _build(values)


_KINDS = {tuple: "a list of strings", float: "a number", int: "a whole number", str: "a string", bool: "true or false"}


def _build(values: dict[str, Any]) -> ServerConfig:
    defaults = ServerConfig()
    known = {f.name for f in fields(ServerConfig)}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise InvalidArgument("config", f"unknown settings: {', '.join(unknown)}")
    typed: dict[str, Any] = {}
    for name, value in values.items():
        expected = type(getattr(defaults, name))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # noqa: PLW2901  # TOML writes 5 for 5.0
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise InvalidArgument(name, f"expected {_KINDS.get(expected, expected.__name__)}, got {value!r}")
        typed[name] = value
    return replace(defaults, **typed).validate()
