"""``discovery serve``: run one regional server until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tomllib
from pathlib import Path

from discovery import config_check, eventloop, telemetry
from discovery.cli._common import OK, add_verb
from discovery.config import load
from discovery.server import Server

SERVE_EXAMPLES = """examples:
  # mTLS on every port, who may do what in policy.toml (docs/security.md):
  discovery serve --region us-east --listen 127.0.0.1:7400 \\
      --etcd 127.0.0.1:2379 --tls-cert server.pem --tls-key server-key.pem \\
      --tls-client-ca ca.pem --policy policy.toml
  # development only: plaintext, no identities, everyone may do everything:
  discovery serve --region us-east --etcd 127.0.0.1:2379 --insecure
  # a config file; flags win over it:
  discovery serve --config /etc/discovery/server.toml --listen 0.0.0.0:7400
  # check it (files too; no etcd, no listening); exit 2 names the setting:
  discovery serve --config /etc/discovery/server.toml --check-config
  # other regions, nearest first:
  discovery serve --region us-east --etcd 127.0.0.1:2379 \\
      --peer eu-west=10.1.0.1:7400,10.1.0.2:7400 --peer ap-south=10.2.0.1:7400

config file (TOML, top level or a [server] table; only region is required):
  region = "us-east"
  listen = "0.0.0.0:7400"
  etcd = ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"]
  # or names, resolved at start and again (every A/AAAA record is used):
  # etcd = ["etcd-0.etcd.us-east.svc:2379", "etcd-1.etcd.us-east.svc:2379"]
  # nearest first; FAILOVER follows this order:
  peers = ["eu-west=10.1.0.1:7400,10.1.0.2:7400", "ap-south=10.2.0.1:7400"]
  advertise = "10.0.0.5:7400"   # how Status and peers name this server
  grace_seconds = 5.0           # in-flight calls get this long on SIGTERM
  etcd_timeout_seconds = 3.0    # writes fail UNAVAILABLE after this (etcd down)
  stale_after_seconds = 3.0     # a silent peer region's replicas: marked stale
  replication_heartbeat_seconds = 0.5  # peers' stale-after: >= 3 of these
  max_staleness_seconds = 0     # drop stale replicas after this (0: never)
  resume_grace_seconds = 10.0   # a returning peer's deletions wait this long
  election_ttl_seconds = 3      # a dead replicator leader is replaced after it
  max_pending_writes = 1024     # etcd writes in flight before "overload"
  history_bytes = 8388608       # changes kept for Watch resume, in bytes
  tls_cert = "/etc/discovery/tls/server.pem"   # mTLS on every port
  tls_key = "/etc/discovery/tls/server-key.pem"
  tls_client_ca = "/etc/discovery/tls/ca.pem"  # clients and peers chain to it
  trust_domain = "discovery.local"   # identities are spiffe://DOMAIN/...
  policy_file = "/etc/discovery/policy.toml"   # who may do what; default deny
  audit_log = "/var/log/discovery/audit.jsonl" # a JSON line per write, denial
  audit_fail_open = false       # true: keep writing when the audit log fails
  health_listen = "0.0.0.0:7401"   # plaintext, gRPC health only (probes)
  http_listen = "0.0.0.0:8400"     # JSON API, events, dashboard (docs/http.md)
  metrics_listen = "0.0.0.0:9400"  # plaintext /metrics, /healthz, /readyz
  etcd_ca = "/etc/discovery/etcd/ca.pem"   # etcd over TLS, client-cert auth
  etcd_cert = "/etc/discovery/etcd/us-east.pem"
  etcd_key = "/etc/discovery/etcd/us-east-key.pem"
  etcd_server_name = "etcd.us-east.svc"  # on every member's certificate
  dns_listen = "127.0.0.1:8600"  # DNS, UDP and TCP (docs/dns.md); off if unset
  dns_domain = "discovery."     # names are SERVICE.service.discovery.
  dns_ttl_seconds = 5           # TTL of every answer, and of NXDOMAIN/NODATA
  dns_rate_limit = 1000         # responses/s per /24 or /56 (0: off)

Certificates, the CA bundle and the policy are read again when they change
(checked every reload_poll_seconds, 5 by default) and on SIGHUP, which also
reopens the audit log. A bad new file keeps the old one in use and says why.

telemetry: OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER = otlp | console | none
(default none); OTEL_EXPORTER_OTLP_ENDPOINT alone turns on OTLP for both.
On SIGTERM: health turns NOT_SERVING, the port stops accepting, streams end,
etcd closes, exit 0."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_verb(
        sub,
        "serve",
        help="run a regional discovery server",
        epilog=SERVE_EXAMPLES,
    )
    p.add_argument("--region", help="this server's region, e.g. us-east")
    p.add_argument("--listen", metavar="HOST:PORT", help="gRPC address (default 127.0.0.1:7400)")
    p.add_argument("--etcd", metavar="HOST:PORT[,HOST:PORT...]", help="the region's etcd members")
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="check the settings and the files they name as serve would, without etcd or listening; "
        "print the effective config (TOML) and exit 0, or exit 2 naming the setting",
    )
    p.add_argument("--grace", type=float, dest="grace_seconds", metavar="SECONDS", help="shutdown grace period")
    p.add_argument(
        "--peer",
        action="append",
        dest="peers",
        metavar="REGION=HOST:PORT[,HOST:PORT...]",
        help="another region's servers; repeat, nearest region first (FAILOVER follows this order)",
    )
    p.add_argument("--advertise", metavar="HOST:PORT", help="how Status and peers name this server")
    p.add_argument(
        "--stale-after",
        type=float,
        dest="stale_after_seconds",
        metavar="SECONDS",
        help="serve a peer region's replicas marked stale once it is silent this long (default 3)",
    )
    p.add_argument(
        "--replication-heartbeat",
        type=float,
        dest="replication_heartbeat_seconds",
        metavar="SECONDS",
        help="how often this region's feed tells idle peers it is alive (default 0.5); "
        "every peer's --stale-after must be at least 3 times this, or it warns",
    )
    p.add_argument(
        "--max-staleness",
        type=float,
        dest="max_staleness_seconds",
        metavar="SECONDS",
        help="stop serving a peer region's replicas once stale this long (default: serve stale rather than nothing)",
    )
    p.add_argument(
        "--resume-grace",
        type=float,
        dest="resume_grace_seconds",
        metavar="SECONDS",
        help="hold deletions from a region that just came back this long (default 10)",
    )
    p.add_argument(
        "--max-pending-writes",
        type=int,
        metavar="N",
        help="etcd writes in flight at once before writes are refused as overload, with a retry-after "
        "(default 1024; 0: no limit)",
    )
    p.add_argument(
        "--event-loop",
        choices=eventloop.CHOICES,
        help="auto (default): uvloop where installed (6-14%% less CPU per Register); or asyncio",
    )
    web = p.add_argument_group("HTTP (docs/http.md)")
    web.add_argument(
        "--http",
        dest="http_listen",
        metavar="HOST:PORT",
        help="serve the JSON API, events, metrics and the dashboard (/ui/) here; HTTPS with --tls-cert",
    )
    web.add_argument(
        "--metrics",
        dest="metrics_listen",
        metavar="HOST:PORT",
        help="serve /metrics, /healthz and /readyz alone, plaintext, here (for scrapers and probes)",
    )
    tls = p.add_argument_group("security (docs/security.md)")
    tls.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve plaintext with no identities: anyone who can reach the port may do anything (development)",
    )
    tls.add_argument("--tls-cert", metavar="FILE", help="this server's certificate chain (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    tls.add_argument(
        "--tls-client-ca", metavar="FILE", help="CA bundle that client and peer certificates must chain to"
    )
    tls.add_argument(
        "--trust-domain", metavar="DOMAIN", help="identities are spiffe://DOMAIN/... (default discovery.local)"
    )
    tls.add_argument("--policy", dest="policy_file", metavar="FILE", help="who may do what (TOML); default deny")
    tls.add_argument("--audit-log", metavar="FILE", help="one JSON line per write and denial; - for stdout")
    tls.add_argument(
        "--audit-fail-open",
        action="store_true",
        default=None,
        help="keep accepting writes when the audit log cannot be written (logged loudly); default: refuse them",
    )
    tls.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        help="also serve the gRPC health service alone, plaintext, here (for probes without a certificate)",
    )
    tls.add_argument("--etcd-ca", metavar="FILE", help="etcd over TLS: the CA of etcd's certificates")
    tls.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd (its CN is the etcd user)")
    tls.add_argument("--etcd-key", metavar="FILE", help="its private key")
    tls.add_argument("--etcd-server-name", metavar="NAME", help="the name etcd's certificate is checked against")
    dns = p.add_argument_group("DNS (docs/dns.md; off unless --dns is given)")
    dns.add_argument("--dns", dest="dns_listen", metavar="HOST:PORT", help="serve DNS here, UDP and TCP")
    dns.add_argument("--dns-domain", metavar="DOMAIN", help="the domain answered (default discovery.)")
    dns.add_argument("--dns-ttl", type=int, dest="dns_ttl_seconds", metavar="SECONDS", help="answer TTL (default 5)")
    dns.add_argument(
        "--dns-rate-limit",
        type=float,
        metavar="N",
        help="responses per second per source /24 or /56 network (default 1000; 0: no limit)",
    )
    p.set_defaults(func=serve, event_loop_of=_event_loop_of)


def _event_loop_of(args: argparse.Namespace) -> str:
    """The loop to start before the configuration is read on it: the flag, else the file's
    ``event_loop`` (anything wrong with the file is reported by ``load`` once running)."""
    if args.event_loop:
        return str(args.event_loop)
    if args.config:
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError, AttributeError):
            data = tomllib.loads(Path(args.config).read_text())
            value = data.get("server", data).get("event_loop", "auto")
            if value in eventloop.CHOICES:
                return str(value)
    return "auto"


async def serve(args: argparse.Namespace) -> int:
    config = load(
        args.config,
        {
            "region": args.region,
            "listen": args.listen,
            "etcd": args.etcd,
            "grace_seconds": args.grace_seconds,
            "peers": tuple(args.peers) if args.peers else None,
            "advertise": args.advertise,
            "max_staleness_seconds": args.max_staleness_seconds,
            "stale_after_seconds": args.stale_after_seconds,
            "replication_heartbeat_seconds": args.replication_heartbeat_seconds,
            "resume_grace_seconds": args.resume_grace_seconds,
            "max_pending_writes": args.max_pending_writes,
            "event_loop": args.event_loop,
            **{name: getattr(args, name) for name in _DNS_FLAGS},
            "http_listen": args.http_listen,
            "metrics_listen": args.metrics_listen,
            **{name: getattr(args, name) for name in _SECURITY_FLAGS},
        },
    )
    if args.check_config:
        sys.stdout.write(config_check.render(config, config_check.check(config)))
        return OK
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reload = asyncio.Event()  # SIGHUP before the server is up is kept for when it is
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    logging.getLogger("discovery").info("event loop: %s", type(loop).__module__.partition(".")[0])
    tracing = telemetry.setup("discovery", config.region)
    try:
        server = Server(config, tracing=tracing)
        # A signal while the server waits for etcd at startup stops it too, cleanly.
        starting = asyncio.create_task(server.__aenter__())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await server.stop()
            return OK

        starting.result()  # raises what startup raised
        reloader = asyncio.create_task(_reload_on_signal(server, reload))
        try:
            await stop.wait()
        finally:
            reloader.cancel()
            await server.stop()
    finally:
        telemetry.shutdown()
    return OK


_SECURITY_FLAGS = (
    "insecure",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "trust_domain",
    "policy_file",
    "audit_log",
    "audit_fail_open",
    "health_listen",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "etcd_server_name",
)


_DNS_FLAGS = ("dns_listen", "dns_domain", "dns_ttl_seconds", "dns_rate_limit")


async def _reload_on_signal(server: Server, reload: asyncio.Event) -> None:
    while True:
        await reload.wait()
        reload.clear()
        logging.getLogger("discovery").info("SIGHUP: re-reading certificates and policy, reopening the audit log")
        server.reload()
