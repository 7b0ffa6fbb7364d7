"""Server processes for the benchmarks and tests, run apart from the load generator (their own GIL).

    python bench/_servers.py discovery --listen 127.0.0.1:PORT --etcd HOST:PORT --region R [--prefix P]
                                       [--settings JSON]
    python bench/_servers.py empty --listen 127.0.0.1:PORT

Start them with ``discovery.devtools.process.ServerProcess``, which waits for gRPC health to
say SERVING and stops them with SIGTERM (they never outlive the process that started them).
Once listening, prints one JSON line ``{"port": N, "pid": N}`` on stdout, then serves until
SIGTERM or SIGINT.

``--settings`` is a JSON object of further ``ServerConfig`` keys, e.g. the TLS files, policy and
audit log of a secure server (``{"insecure": false, "tls_cert": ..., "health_listen": ...}``);
without it the server is plaintext (``insecure``), as before.

``empty`` is the ceiling: a grpc.aio server whose Lookup/Resolve handler returns a prebuilt
empty response, so a client measures the same method path with no work behind it (and gRPC
health, SERVING, so it is started like any other).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from discovery_pb.v1 import lookup_pb2, lookup_pb2_grpc

_EMPTY = lookup_pb2.ResolveResponse()


class EmptyLookup(lookup_pb2_grpc.LookupServicer):
    async def Resolve(
        self, request: lookup_pb2.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> lookup_pb2.ResolveResponse:
        return _EMPTY

    async def Watch(
        self, request: lookup_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[lookup_pb2.WatchResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the empty server only answers Resolve")
        yield lookup_pb2.WatchResponse()  # never reached; makes this an async generator


def _announce(port: int) -> None:
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)


def _stop_event() -> asyncio.Event:
    """Set on SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def serve_empty(listen: str) -> None:
    server = grpc.aio.server()
    lookup_pb2_grpc.add_LookupServicer_to_server(EmptyLookup(), server)
    serving = health.aio.HealthServicer()
    await serving.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(serving, server)
    port = server.add_insecure_port(listen)
    await server.start()
    stop = _stop_event()
    _announce(port)
    await stop.wait()
    await server.stop(0.5)


async def serve_discovery(
    listen: str, etcd: str, region: str, prefix: str, settings: dict[str, Any] | None = None
) -> None:
    from discovery import telemetry
    from discovery.config import ServerConfig
    from discovery.server import Server

    fields: dict[str, Any] = {"insecure": True} | (settings or {})
    config = ServerConfig(region=region, listen=listen, etcd=(etcd,), key_prefix=prefix, grace_seconds=0.5, **fields)
    tracing = telemetry.setup("discovery", region)  # as `discovery serve` would: no-op unless OTEL_* asks
    async with Server(config.validate(), startup_timeout=60, tracing=tracing) as server:
        stop = _stop_event()
        _announce(server.port)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    disc = sub.add_parser("discovery", help="the discovery server (discovery.server.Server)")
    disc.add_argument("--listen", default="127.0.0.1:0")
    disc.add_argument("--etcd", required=True)
    disc.add_argument("--region", required=True)
    disc.add_argument("--prefix", default="/discovery/v1/")
    disc.add_argument("--settings", type=json.loads, default=None, help="JSON object of further ServerConfig keys")
    empty = sub.add_parser("empty", help="an empty grpc.aio unary handler (the ceiling)")
    empty.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args(argv)
    if args.kind == "empty":
        asyncio.run(serve_empty(args.listen))
    else:
        from discovery import eventloop

        # The loop `discovery serve` would run (auto: uvloop where installed), unless the settings say.
        loop = (args.settings or {}).get("event_loop", "auto")
        eventloop.run(lambda: serve_discovery(args.listen, args.etcd, args.region, args.prefix, args.settings), loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
