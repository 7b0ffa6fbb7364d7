"""How a server behaves when its etcd is hung (SIGSTOP) or stopped, and when it returns.

Prints JSON, per mode and trial: seconds until the view marks itself stale, seconds until a
Register fails (and its status code), Resolve latency while etcd is away (served stale from
memory), seconds until the view is fresh again after etcd returns, and the first write after.

    .venv/bin/python bench/etcd_outage.py [--trials 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from discovery.config import ServerConfig
from discovery.devtools.etcd import EtcdProcess
from discovery.server import Server
from discovery_pb.v1 import lookup_pb2, lookup_pb2_grpc, registry_pb2, registry_pb2_grpc, types_pb2


def _instance(address: str) -> registry_pb2.RegisterRequest:
    return registry_pb2.RegisterRequest(instance=types_pb2.Instance(service="web", address=address))


async def _until(predicate: Any, timeout: float = 30.0) -> float:
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110  # polling every 5 ms is the measurement's resolution
            await asyncio.sleep(0.005)
    return round(time.monotonic() - started, 3)


async def trial(mode: str, workdir: Path) -> dict[str, Any]:
    etcd = EtcdProcess(workdir / "etcd").start()
    out: dict[str, Any] = {}
    try:
        config = ServerConfig(region="us-east", listen="127.0.0.1:0", etcd=(etcd.endpoint,), insecure=True).validate()
        async with Server(config) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            registry = registry_pb2_grpc.RegistryStub(channel)
            lookup = lookup_pb2_grpc.LookupStub(channel)
            await registry.Register(_instance("10.0.0.1:80"), timeout=5)
            etcd.pause() if mode == "hung" else etcd.stop()
            out["stale_after_s"] = await _until(lambda: server.view.stale)
            started = time.monotonic()
            try:
                await registry.Register(_instance("10.0.0.2:80"), timeout=10)
                out["write_failed_after_s"] = None
            except grpc.aio.AioRpcError as exc:
                out["write_failed_after_s"] = round(time.monotonic() - started, 3)
                out["write_code"] = exc.code().name
            started = time.monotonic()
            resp = await lookup.Resolve(lookup_pb2.ResolveRequest(service="web"), timeout=5)
            out["resolve_ms_while_away"] = round((time.monotonic() - started) * 1000, 2)
            out["resolve_stale_with_endpoints"] = resp.stale and len(resp.endpoints) == 1
            etcd.resume() if mode == "hung" else etcd.start()
            out["fresh_after_return_s"] = await _until(lambda: not server.view.stale)
            started = time.monotonic()
            await registry.Register(_instance("10.0.0.3:80"), timeout=10)
            out["first_write_after_ms"] = round((time.monotonic() - started) * 1000, 2)
    finally:
        etcd.stop()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("hung", "stopped"):
            results[mode] = [await trial(mode, Path(tmp) / f"{mode}-{i}") for i in range(args.trials)]
    print(json.dumps({"benchmark": "etcd_outage", "etcd_timeout_s": 3.0, "keepalive_s": 1.0, **results}))


if __name__ == "__main__":
    asyncio.run(main())
