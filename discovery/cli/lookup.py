"""``discovery resolve`` and ``discovery watch``."""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
import grpc.aio

from discovery.cli._common import (
    OK,
    REVISION,
    UNAVAILABLE,
    CommandError,
    add_client_flags,
    add_verb,
    bounded_int,
    channel,
    print_json,
    print_table,
    rpc_error,
)
from discovery.cli._render import (
    INSTANCE_HEADER,
    endpoint_dict,
    instance_row,
    region_dict,
    region_line,
    watch_dict,
    watch_lines,
)
from discovery.retry import RetryPolicy
from discovery_pb.v1 import lookup_pb2 as pb
from discovery_pb.v1.lookup_pb2_grpc import LookupStub
from discovery_pb.v1.types_pb2 import Status

SCOPES = {"local": pb.LOCAL, "failover": pb.FAILOVER, "all": pb.ALL}
STATUSES = {"serving": Status.SERVING, "draining": Status.DRAINING, "not_serving": Status.NOT_SERVING}

RESOLVE_EXAMPLES = """examples:
  discovery resolve web
  discovery resolve web --scope failover --json
  discovery resolve web --scope failover --min-healthy 3   # add nearer regions until 3 serving
  discovery resolve web --scope all         # every region, replicas marked stale when out of contact
  discovery resolve web --tag canary --zone us-east-1a --status serving --status draining
  discovery resolve web --min-revision 1234     # wait until the server has seen revision 1234"""

WATCH_EXAMPLES = """examples:
  discovery watch web            # '=' snapshot lines, then '+' put and '-' delete lines
  discovery watch web --json     # one JSON object a line
  discovery watch web --since 1234   # resume after revision 1234
The watch reconnects by itself (resuming from the last revision) until Ctrl-C."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = add_verb(
        sub,
        "resolve",
        help="list the endpoints of a service",
        epilog=RESOLVE_EXAMPLES,
    )
    r.add_argument("service")
    r.add_argument("--scope", choices=sorted(SCOPES), default="local", help="regions to include (default: local)")
    r.add_argument(
        "--min-healthy",
        type=bounded_int(1, 10_000),
        default=1,
        metavar="N",
        help="failover: add regions, nearest first, until N serving endpoints (default 1)",
    )
    r.add_argument("--min-revision", type=REVISION, default=0, metavar="N", help="wait until the view has reached N")
    r.add_argument("--status", action="append", choices=sorted(STATUSES), default=[], help="default: serving")
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
    request = pb.ResolveRequest(
        service=args.service,
        scope=SCOPES[args.scope],
        min_revision=args.min_revision,
        statuses=[STATUSES[s] for s in args.status],
        tags=args.tag,
        zone=args.zone,
        min_healthy=args.min_healthy,
    )
    async with channel(args) as ch:
        try:
            resp = await LookupStub(ch).Resolve(request, timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, args.server) from None
    if args.json:
        print_json(
            {
                "service": resp.service,
                "revision": resp.revision,
                "stale": resp.stale,
                "endpoints": [endpoint_dict(ep) for ep in resp.endpoints],
                "regions": [region_dict(r) for r in resp.regions],
            }
        )
        return OK
    print_table(INSTANCE_HEADER, [instance_row(ep.instance, ep.stale) for ep in resp.endpoints])
    note = f", stale for {resp.stale_seconds:.1f}s" if resp.stale else ""
    print(f"# {len(resp.endpoints)} endpoints of {resp.service} at revision {resp.revision}{note}")
    for r in resp.regions:
        print(f"# {region_line(r)}")
    return OK


async def watch(args: argparse.Namespace) -> int:
    """Stream changes; on a broken stream, resume from the last revision with backoff."""
    since, attempt, retry = args.since, 0, RetryPolicy(base_delay=0.2, max_delay=5.0)
    async with channel(args) as ch:
        stub = LookupStub(ch)
        while True:
            try:
                async for msg in stub.Watch(pb.WatchRequest(service=args.service, since_revision=since)):
                    attempt = 0
                    if msg.kind != pb.WatchResponse.SNAPSHOT or not msg.more:
                        since = msg.revision
                    if msg.kind == pb.WatchResponse.KEEPALIVE and not args.keepalives:
                        continue
                    if args.json:
                        print_json(watch_dict(msg))
                    else:
                        for line in watch_lines(msg) or [f"# alive at revision {msg.revision}"]:
                            print(line, flush=True)
                return OK
            except grpc.aio.AioRpcError as exc:
                error = rpc_error(exc, args.server)
                if error.code != UNAVAILABLE:
                    raise error from None
                if attempt == 0:
                    print(f"watch interrupted ({error}); reconnecting", file=sys.stderr, flush=True)
                await asyncio.sleep(retry.delay(attempt))
                attempt += 1
                if attempt > 30:
                    raise CommandError(f"gave up reconnecting: {error}", UNAVAILABLE) from None
