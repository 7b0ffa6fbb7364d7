"""``discovery serve``: run one regional server until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from discovery import telemetry
from discovery.cli._common import OK, add_verb
from discovery.config import load
from discovery.server import Server

SERVE_EXAMPLES = """examples:
  discovery serve --region us-east --listen 127.0.0.1:7400 --etcd 127.0.0.1:2379
  discovery serve --config /etc/discovery/server.toml --listen 0.0.0.0:7400   # flags win over the file
  discovery serve --region us-east --etcd 127.0.0.1:2379 \\
      --peer eu-west=10.1.0.1:7400,10.1.0.2:7400 --peer ap-south=10.2.0.1:7400   # nearest first

config file (TOML, top level or a [server] table):
  region = "us-east"
  listen = "0.0.0.0:7400"
  etcd = ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"]
  grace_seconds = 5.0            # in-flight calls get this long on SIGTERM
  etcd_timeout_seconds = 3.0     # writes fail with UNAVAILABLE after this when etcd is down or hung
  peers = ["eu-west=10.1.0.1:7400,10.1.0.2:7400", "ap-south=10.2.0.1:7400"]  # nearest first
  advertise = "10.0.0.5:7400"    # how Status and peers name this server
  stale_after_seconds = 3.0      # a peer region not heard from for this long is served marked stale
  replication_heartbeat_seconds = 0.5  # our feed's heartbeat; peers' stale-after must be >= 3 of these
  max_staleness_seconds = 0      # drop a peer's replicas once stale this long (0: serve stale forever)
  resume_grace_seconds = 10.0    # deletions from a peer just back from silence wait this long
  election_ttl_seconds = 3       # a dead replicator leader is replaced after about this long

telemetry: OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER = otlp | console | none (default none);
OTEL_EXPORTER_OTLP_ENDPOINT alone turns on OTLP for both.
On SIGTERM: health turns NOT_SERVING, the port stops accepting, streams end, etcd closes, exit 0."""


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
    p.set_defaults(func=serve)


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
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
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
        try:
            await stop.wait()
        finally:
            await server.stop()
    finally:
        telemetry.shutdown()
    return OK
