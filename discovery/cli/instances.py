"""``discovery register`` and ``discovery deregister``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from discovery.cli._common import OK, UINT32, CommandError, add_client_flags, add_verb, channel, print_json, rpc_error
from discovery.retry import RetryPolicy
from discovery_pb.v1 import registry_pb2 as pb
from discovery_pb.v1.registry_pb2_grpc import RegistryStub
from discovery_pb.v1.types_pb2 import Instance

REGISTER_EXAMPLES = """examples:
  discovery register web 10.0.0.5:8080 --id web-1 --zone us-east-1a --tag canary --meta version=1.4
      static: stays until `discovery deregister web web-1`
  discovery register web 10.0.0.5:8080 --ttl 10
      leased: stays in the foreground sending heartbeats; Ctrl-C or SIGTERM deregisters
  discovery register web 10.0.0.5:8080 --ttl 10 --json
      prints {"service", "instance_id", "revision"} once registered"""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_verb(
        sub,
        "register",
        help="register an endpoint (static, or leased and kept alive in the foreground)",
        description="Register SERVICE at HOST:PORT in the server's region. Registering the same "
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


def _instance(args: argparse.Namespace) -> Instance:
    metadata = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"--meta {item!r}: expected KEY=VALUE", 2)
        metadata[key] = value
    if args.ttl < 0 or args.weight < 0:
        raise CommandError("--ttl and --weight must not be negative", 2)
    return Instance(
        service=args.service,
        instance_id=args.id,
        address=args.address,
        zone=args.zone,
        tags=args.tag,
        metadata=metadata,
        weight=args.weight,
        ttl_seconds=args.ttl,
        version=args.version,
    )


async def register(args: argparse.Namespace) -> int:
    instance = _instance(args)
    async with channel(args) as ch:
        stub = RegistryStub(ch)
        try:
            resp = await stub.Register(pb.RegisterRequest(instance=instance), timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, args.server) from None
        if args.json:
            print_json({"service": args.service, "instance_id": resp.instance_id, "revision": resp.revision})
        else:
            kind = f"leased, ttl {resp.ttl_seconds}s" if resp.lease_id else "static"
            print(f"registered {args.service}/{resp.instance_id} at revision {resp.revision} ({kind})", flush=True)
        if not resp.lease_id:
            return OK
        instance.instance_id = resp.instance_id
        await _keep_alive(stub, instance, resp, args)
    return OK


async def _keep_alive(
    stub: RegistryStub, instance: Instance, first: pb.RegisterResponse, args: argparse.Namespace
) -> None:
    """Heartbeat until Ctrl-C/SIGTERM, re-registering if the lease was lost; then deregister."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(_heartbeat_loop(stub, instance, first, args, stop))
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    try:
        await stub.Deregister(
            pb.DeregisterRequest(service=instance.service, instance_id=instance.instance_id), timeout=args.timeout
        )
        if not args.json:
            print(f"deregistered {instance.service}/{instance.instance_id}", flush=True)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise rpc_error(exc, args.server) from None


async def _heartbeat_loop(
    stub: RegistryStub, instance: Instance, reg: pb.RegisterResponse, args: argparse.Namespace, stop: asyncio.Event
) -> None:
    interval = max(0.5, reg.ttl_seconds / 3)
    retry, attempt = RetryPolicy(base_delay=0.5, max_delay=interval), 0
    lease_id = reg.lease_id
    while not stop.is_set():
        try:
            async for _ in _heartbeats(stub, lease_id, interval):
                attempt = 0
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                print(f"lease lost ({exc.details()}); registering again", file=sys.stderr, flush=True)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    again = await stub.Register(pb.RegisterRequest(instance=instance), timeout=args.timeout)
                    lease_id = again.lease_id
                    continue
            else:
                print(f"heartbeat failed ({exc.code().name.lower()}); retrying", file=sys.stderr, flush=True)
        await asyncio.sleep(retry.delay(attempt))
        attempt += 1


async def _heartbeats(stub: RegistryStub, lease_id: int, interval: float) -> AsyncIterator[pb.HeartbeatResponse]:
    async def requests() -> AsyncIterator[pb.HeartbeatRequest]:
        while True:
            yield pb.HeartbeatRequest(lease_id=lease_id)
            await asyncio.sleep(interval)

    call = stub.Heartbeat(requests())
    try:
        while True:
            # A response must come back within an interval, or the stream is dead.
            async with asyncio.timeout(interval * 2):
                response = await call.read()
            if response is grpc.aio.EOF:
                return
            yield response
    except TimeoutError:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "heartbeat not answered"
        ) from None
    finally:
        call.cancel()


async def deregister(args: argparse.Namespace) -> int:
    async with channel(args) as ch:
        try:
            resp = await RegistryStub(ch).Deregister(
                pb.DeregisterRequest(service=args.service, instance_id=args.instance_id), timeout=args.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, args.server) from None
    if args.json:
        print_json({"service": args.service, "instance_id": args.instance_id, "revision": resp.revision})
    else:
        print(f"deregistered {args.service}/{args.instance_id} at revision {resp.revision}")
    return OK
