"""``discovery health``: the standard gRPC health check (grpc.health.v1 Check), for compose
healthchecks and scripts: exit 0 when the server answers SERVING, 4 with a one-line reason
otherwise (NOT_SERVING while it shuts down, unreachable, no answer in time, unknown service)."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery.cli._common import (
    OK,
    UNAVAILABLE,
    CommandError,
    add_client_flags,
    add_verb,
    channel,
    describe,
    print_json,
    rpc_error,
)

EXAMPLES = """examples:
  discovery health --server 127.0.0.1:7400       # mTLS: $DISCOVERY_TLS_*
  discovery health --server 127.0.0.1:7401 --insecure  # --health-listen port
  discovery health --service discovery.v1.Lookup --timeout 2

exit 0: SERVING; 4: anything else, with the reason on stderr (NOT_SERVING,
e.g. while the server shuts down; unreachable; no answer within --timeout;
an unknown --service); 2: bad flags or TLS settings."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    h = add_verb(
        sub,
        "health",
        help="ask a server's gRPC health service (grpc.health.v1): exit 0 if SERVING",
        description="Ask a server's standard gRPC health service (grpc.health.v1 Check).",
        epilog=EXAMPLES,
    )
    h.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help="a service's health, e.g. discovery.v1.Registry (default: the server's)",
    )
    add_client_flags(h)
    h.set_defaults(func=health)


async def health(args: argparse.Namespace) -> int:
    what = f"service {args.service!r}" if args.service else "the server"
    async with channel(args) as ch:
        try:
            # The call's deadline bounds the connection too; the outer one is a backstop.
            async with asyncio.timeout(args.timeout + 1):
                resp = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
                )
        except TimeoutError:
            raise CommandError(f"{args.server}: no answer within {args.timeout:g}s", UNAVAILABLE) from None
        except grpc.aio.AioRpcError as exc:
            raise CommandError(_reason(exc, args, what), UNAVAILABLE) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    if args.json:
        print_json({"server": args.server, "service": args.service, "status": status})
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise CommandError(f"{args.server} answers {status} for {what}", UNAVAILABLE)
    if not args.json:
        print(status)
    return OK


def _reason(exc: grpc.aio.AioRpcError, args: argparse.Namespace, what: str) -> str:
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{args.server}: no answer within {args.timeout:g}s (--timeout)"
    if code == grpc.StatusCode.NOT_FOUND:
        return f"{args.server} knows no {what} (--service: e.g. discovery.v1.Registry, or none for the server)"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{args.server} has no gRPC health service: is it a discovery server?"
    return describe(rpc_error(exc, args.server))
