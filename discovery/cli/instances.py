"""``discovery register`` and ``discovery deregister``."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from discovery.cli._common import OK, UINT32, CommandError, add_client_flags, add_verb, client, print_json
from discovery_client import InvalidArgument, check

DRAIN_SECONDS = 5.0  # the client library's default drain

REGISTER_EXAMPLES = """examples:
  discovery register web 10.0.0.5:8080 --id web-1 --zone us-east-1a \\
      --tag canary --meta version=1.4
      static: stays until `discovery deregister web web-1`
  discovery register web 10.0.0.5:8080 --ttl 10
      leased: stays in the foreground sending heartbeats (on a session of
      TTL 10 s, or a lease of its own with --no-session or on a server
      without sessions); Ctrl-C or SIGTERM marks it DRAINING, waits --drain
      seconds (clients stop picking it), then deregisters
  discovery register web 10.0.0.5:8080 --ttl 10 --json
      prints {"service", "instance_id", "revision"} once registered
  discovery register db 10.0.0.7:5432 --check tcp --check-interval 5
      static, and the region's servers connect to it every 5 s: after 3
      failures in a row it is NOT_SERVING until it passes twice again
  discovery register api 10.0.0.8:443 --check https:/healthz \\
      --check-ca ca.pem"""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_verb(
        sub,
        "register",
        help="register an endpoint (static, or leased and kept alive in the foreground)",
        description="Register SERVICE at HOST:PORT in the server's region. Registering the same\n"
        "(service, id) again updates it.",
        epilog=REGISTER_EXAMPLES,
    )
    p.add_argument("service", help="service name: lowercase DNS labels joined by dots")
    p.add_argument("address", metavar="HOST:PORT", help="IPv4, [IPv6] or hostname, and a port")
    p.add_argument("--id", default="", help="instance id (default: derived from the address)")
    p.add_argument("--ttl", type=UINT32, default=0, metavar="SECONDS", help="lease TTL 1..3600; 0 = static (default)")
    p.add_argument("--zone", default="")
    p.add_argument("--tag", action="append", default=[], metavar="TAG", help="repeatable")
    p.add_argument("--meta", action="append", default=[], metavar="K=V", help="metadata entry; repeatable")
    p.add_argument("--weight", type=UINT32, default=0, metavar="N", help="1..10000 (default 100)")
    p.add_argument("--version", default="", help="the instance's software version")
    p.add_argument(
        "--drain",
        type=float,
        default=DRAIN_SECONDS,
        metavar="SECONDS",
        help="leased: on Ctrl-C or SIGTERM, stay DRAINING this long before deregistering (default: %(default)s)",
    )
    p.add_argument(
        "--no-session",
        dest="session",
        action="store_false",
        help="leased: a lease of its own instead of a session (what servers without sessions get anyway)",
    )
    c = p.add_argument_group("health check (run by the region's servers; docs/health-checks.md)")
    c.add_argument("--check", default="", metavar="KIND", help="tcp, grpc[:NAME], http:PATH (grpcs, https: TLS)")
    c.add_argument("--check-interval", type=float, metavar="S", help="seconds between probes (default 10)")
    c.add_argument("--check-timeout", type=float, metavar="S", help="seconds a probe may take (default 2)")
    c.add_argument("--check-ca", default="", metavar="FILE", help="grpcs, https: the CA to trust (PEM)")
    add_client_flags(p)
    p.set_defaults(func=register)

    d = add_verb(
        sub,
        "deregister",
        help="remove an endpoint now",
        epilog="example:\n  discovery deregister web web-1",
    )
    d.add_argument("service")
    d.add_argument("instance_id", metavar="ID")
    add_client_flags(d)
    d.set_defaults(func=deregister)


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    metadata = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"--meta {item!r}: expected KEY=VALUE", 2)
        metadata[key] = value
    if args.ttl < 0 or args.weight < 0:
        raise CommandError("--ttl and --weight must not be negative", 2)
    if args.drain < 0:
        raise CommandError("--drain must not be negative", 2)
    return {
        **_check(args),
        "instance_id": args.id,
        "zone": args.zone,
        "tags": args.tag,
        "metadata": metadata,
        "weight": args.weight,
        "version": args.version,
        "ttl": args.ttl,
    }


def _check(args: argparse.Namespace) -> dict[str, Any]:
    if not args.check:
        if args.check_interval is not None or args.check_timeout is not None or args.check_ca:
            raise CommandError("--check-interval, --check-timeout and --check-ca need --check KIND", 2)
        return {}
    ca = ""
    if args.check_ca:
        try:
            ca = Path(args.check_ca).read_text()
        except OSError as exc:
            raise CommandError(f"--check-ca {args.check_ca}: {exc.strerror}", 2) from None
    try:
        spec = check(args.check, interval=args.check_interval, timeout=args.check_timeout, ca_pem=ca)
    except InvalidArgument as exc:
        raise CommandError(f"--{exc}", 2) from None
    return {"check": spec}


def _registered(args: argparse.Namespace, instance_id: str, revision: int, kind: str) -> None:
    if args.json:
        print_json({"service": args.service, "instance_id": instance_id, "revision": revision})
    else:
        print(f"registered {args.service}/{instance_id} at revision {revision} ({kind})", flush=True)


async def register(args: argparse.Namespace) -> int:
    fields = _fields(args)
    async with client(args) as api:
        if not args.ttl:
            resp = await api.register(args.service, args.address, **fields)
            _registered(args, resp.instance_id, resp.revision, "static")
            return OK
        # Listening before anything is printed: whoever reads the first line may signal at once.
        stop = _stop_on_signals()
        # The library's registration: on a session (opened here, closed on the way out; a lease
        # of its own on a server without sessions), heartbeats (on another stream when one
        # breaks), registered again when the lease is lost, and on the way out DRAINING, then
        # deregister.
        async with api.registration(
            args.service, args.address, **fields, drain_seconds=args.drain, session=args.session
        ) as registration:
            kind = f"leased, ttl {registration.ttl_seconds}s"
            if registration.session_id:
                kind += f", session {registration.session_id:x}"
            _registered(args, registration.instance_id, registration.revision, kind)
            await stop.wait()
            if args.drain and not args.json:
                print(f"draining {args.service}/{registration.instance_id} for {args.drain:g}s", flush=True)
        if registration.deregister_error is not None:
            raise registration.deregister_error
        if not args.json:
            print(f"deregistered {args.service}/{registration.instance_id}", flush=True)
    return OK


def _stop_on_signals() -> asyncio.Event:
    """An event Ctrl-C or SIGTERM sets. The handlers stay on, so another signal during the
    drain does not end the process before it has deregistered."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def deregister(args: argparse.Namespace) -> int:
    async with client(args) as api:
        resp = await api.deregister(args.service, args.instance_id)
    if args.json:
        print_json({"service": args.service, "instance_id": args.instance_id, "revision": resp.revision})
    else:
        print(f"deregistered {args.service}/{args.instance_id} at revision {resp.revision}")
    return OK
