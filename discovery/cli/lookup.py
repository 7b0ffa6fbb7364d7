"""``discovery resolve`` and ``discovery watch``."""

from __future__ import annotations

import argparse
import contextlib
import sys

from discovery.answers import resolve_dict
from discovery.cli._common import (
    OK,
    REVISION,
    CommandError,
    add_client_flags,
    add_verb,
    bounded_int,
    client,
    describe,
    exit_code,
    print_json,
    print_table,
)
from discovery.cli._render import (
    INSTANCE_HEADER,
    check_line,
    instance_row,
    region_line,
    watch_dict,
    watch_lines,
)
from discovery_client import DiscoveryClientError, RetryPolicy, Scope, Status, Unavailable
from discovery_pb.v1.lookup_pb2 import WatchResponse

SCOPES = sorted(s.name.lower() for s in Scope)
STATUSES = sorted(s.name.lower() for s in Status)
# Reconnecting: 0.2 s doubling to 5 s between attempts; after 31 in a row, about two
# minutes, the command gives up.
WATCH_RETRY = RetryPolicy(attempts=31, deadline=24 * 3600.0, base_delay=0.2, max_delay=5.0)

RESOLVE_EXAMPLES = """examples:
  discovery resolve web
  discovery resolve web --scope failover --json
  # add nearer regions until 3 serving
  discovery resolve web --scope failover --min-healthy 3
  # every region, replicas marked stale when out of contact
  discovery resolve web --scope all
  discovery resolve web --tag canary --zone us-east-1a \\
      --status serving --status draining
  # wait until the server has seen revision 1234
  discovery resolve web --min-revision 1234"""

WATCH_EXAMPLES = """examples:
  # '=' snapshot lines, then '+' put and '-' delete lines
  discovery watch web
  discovery watch web --json        # one JSON object a line
  discovery watch web --since 1234  # resume after revision 1234
The watch reconnects by itself (resuming from the last revision) until Ctrl-C."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = add_verb(
        sub,
        "resolve",
        help="list the endpoints of a service",
        epilog=RESOLVE_EXAMPLES,
    )
    r.add_argument("service")
    r.add_argument("--scope", choices=SCOPES, default="local", help="regions to include (default: local)")
    r.add_argument(
        "--min-healthy",
        type=bounded_int(1, 10_000),
        default=1,
        metavar="N",
        help="failover: add regions, nearest first, until N serving endpoints (default 1)",
    )
    r.add_argument("--min-revision", type=REVISION, default=0, metavar="N", help="wait until the view has reached N")
    r.add_argument("--status", action="append", choices=STATUSES, default=[], help="default: serving")
    r.add_argument("--tag", action="append", default=[], help="require this tag; repeatable")
    r.add_argument("--zone", default="", help="only this zone")
    add_client_flags(r)
    r.set_defaults(func=resolve)

    w = add_verb(
        sub,
        "watch",
        help="follow a service's endpoints as they change",
        epilog=WATCH_EXAMPLES,
    )
    w.add_argument("service", nargs="?", default="", help="default: every service")
    w.add_argument("--since", type=REVISION, default=0, metavar="REVISION", help="resume after this revision")
    w.add_argument("--keepalives", action="store_true", help="also print keep-alive messages")
    add_client_flags(w)
    w.set_defaults(func=watch)


async def resolve(args: argparse.Namespace) -> int:
    async with client(args) as api:
        resp = await api.resolve(
            args.service,
            scope=args.scope,
            statuses=args.status,
            tags=args.tag,
            zone=args.zone,
            min_healthy=args.min_healthy,
            min_revision=args.min_revision,
        )
    if args.json:
        print_json(resolve_dict(resp))
        return OK
    print_table(INSTANCE_HEADER, [instance_row(ep.instance, ep.stale) for ep in resp.endpoints])
    note = f", stale for {resp.stale_seconds:.1f}s" if resp.stale else ""
    print(f"# {len(resp.endpoints)} endpoints of {resp.service} at revision {resp.revision}{note}")
    for r in resp.regions:
        print(f"# {region_line(r)}")
    for ep in resp.endpoints:
        if ep.instance.HasField("check_result"):
            print(f"# {check_line(ep.instance)}")
    return OK


async def watch(args: argparse.Namespace) -> int:
    """Print every message of the client's resumable Watch until Ctrl-C."""

    def interrupted(error: DiscoveryClientError) -> None:
        print(f"watch interrupted ({describe(error)}); reconnecting", file=sys.stderr, flush=True)

    async with client(args) as api:
        messages = api.watch(args.service, since_revision=args.since, retry=WATCH_RETRY, on_interrupt=interrupted)
        try:
            async with contextlib.aclosing(messages):
                async for msg in messages:
                    if msg.kind == WatchResponse.KEEPALIVE and not args.keepalives:
                        continue
                    if args.json:
                        print_json(watch_dict(msg))
                    else:
                        for line in watch_lines(msg) or [f"# alive at revision {msg.revision}"]:
                            print(line, flush=True)
        except Unavailable as exc:
            raise CommandError(f"gave up reconnecting: {describe(exc)}", exit_code(exc)) from None
    return OK
