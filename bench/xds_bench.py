"""xDS: how fast a change reaches stock gRPC clients through the server's ADS.

Two measurements, printed as one JSON object:

traffic   ``--samples`` times: start a new backend, Register it, and time from sending the
          Register (``register``: its round trip, etcd commit included) to the first call a
          stock gRPC client (``xds:///bench``, its own process, calling in a loop) makes to
          it. Measured in the same run, per sample:
          ``watch``, Register -> the change in the server's own Watch (the view every read
          is served from: the floor), and ``ads``, Register -> a raw ADS stream receiving the
          ClusterLoadAssignment that holds the new endpoint. traffic - ads is the client's own
          share (apply the update, connect, pick).
fanout    For each of ``--streams`` (100, 1000): that many ADS streams subscribed to one
          service; ``--changes`` registrations one after another; per change, the time until
          each stream has the new assignment (p50 over all stream-changes, and ``all``: until
          the last stream has it), from sending the Register. Baseline: a single stream.

The server runs in its own process (bench/_servers.py, its own etcd in a temp dir), the stock
client in another; backends, raw ADS streams and the timing run here.

    .venv/bin/python bench/xds_bench.py                              # 30 samples; 100 and 1,000 streams
    .venv/bin/python bench/xds_bench.py --samples 10 --changes 5     # quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from envoy.config.core.v3.base_pb2 import Node
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from discovery.devtools.etcd import EtcdProcess
from discovery.devtools.process import ServerProcess, free_port
from discovery.xds import CLUSTER, ENDPOINTS, LISTENER, bootstrap
from discovery_pb.v1 import lookup_pb2, lookup_pb2_grpc, registry_pb2, registry_pb2_grpc, types_pb2

HERE = Path(__file__).parent
SERVICE = "bench"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2) if ordered else float("nan")


def _summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_ms": _pct(values, 0.5), "p99_ms": _pct(values, 0.99), "max_ms": _pct(values, 1.0)}


# --- the stock client (a subprocess of its own) ---------------------------------------------


def stock_client(target: str) -> None:
    """Nothing of ours: a channel to ``xds:///...`` calling as fast as it can."""
    import threading

    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    call = grpc.insecure_channel(target).unary_unary("/bench.Echo/Who")
    print("started", flush=True)
    while True:
        with contextlib.suppress(grpc.RpcError):
            call(b"", timeout=1.0)
        time.sleep(0.0005)


# --- backends that note when their first call arrives ----------------------------------------


class Backend(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.first_call: float | None = None
        self.called = asyncio.Event()
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self._handler = grpc.unary_unary_rpc_method_handler(self._who)

    async def _who(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self.first_call is None:
            self.first_call = time.monotonic()
            self.called.set()
        return b"ok"

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._handler


# --- raw ADS streams ---------------------------------------------------------------------------


class Stream:
    """One ADS stream subscribed to ``service``, ACKing like gRPC; records when each endpoint
    count first arrives."""

    def __init__(self, channel: grpc.aio.Channel, index: int, service: str = SERVICE) -> None:
        self.service = service
        self.arrived: dict[int, float] = {}  # endpoint count -> when first seen
        self.changed = asyncio.Event()
        self._out: asyncio.Queue[DiscoveryRequest] = asyncio.Queue()
        node = Node(id=f"bench-{index}")
        for n, type_url in enumerate((LISTENER, CLUSTER, ENDPOINTS)):
            request = DiscoveryRequest(type_url=type_url, resource_names=[service])
            if n == 0:
                request.node.CopyFrom(node)
            self._out.put_nowait(request)
        self._call = AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(self._requests())
        self._task = asyncio.create_task(self._read())

    async def _requests(self) -> Any:
        while True:
            yield await self._out.get()

    async def _read(self) -> None:
        async for response in self._call:
            now = time.monotonic()
            if response.type_url == ENDPOINTS:
                for packed in response.resources:
                    cla = ClusterLoadAssignment()
                    packed.Unpack(cla)
                    count = sum(len(loc.lb_endpoints) for loc in cla.endpoints)
                    self.arrived.setdefault(count, now)
                    self.changed.set()
            self._out.put_nowait(
                DiscoveryRequest(
                    type_url=response.type_url,
                    resource_names=[self.service],
                    response_nonce=response.nonce,
                    version_info=response.version_info,
                )
            )

    async def until(self, count: int, timeout: float = 30.0) -> float:
        async with asyncio.timeout(timeout):
            while count not in self.arrived:
                self.changed.clear()
                await self.changed.wait()
        return self.arrived[count]

    async def close(self) -> None:
        self._call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Watched:
    """The server's own Watch on SERVICE: when each address first appears in the view."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.at: dict[str, float] = {}
        self.changed = asyncio.Event()
        self._call = lookup_pb2_grpc.LookupStub(channel).Watch(lookup_pb2.WatchRequest(service=SERVICE))
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._call:
            now = time.monotonic()
            for inst in message.instances:
                self.at.setdefault(inst.address, now)
            for change in message.changes:
                if change.kind == types_pb2.Change.PUT:
                    self.at.setdefault(change.instance.address, now)
            self.changed.set()

    async def until(self, address: str, timeout: float = 30.0) -> float:
        async with asyncio.timeout(timeout):
            while address not in self.at:
                self.changed.clear()
                await self.changed.wait()
        return self.at[address]

    async def close(self) -> None:
        self._call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# --- the measurements --------------------------------------------------------------------------


async def register(registry: Any, address: str, instance_id: str, service: str = SERVICE) -> tuple[float, float]:
    """(sent, acknowledged). Times below count from ``sent``: here, in the process that also
    reads the streams, a push can be read before the Register answer that preceded it."""
    request = registry_pb2.RegisterRequest(
        instance=types_pb2.Instance(service=service, address=address, instance_id=instance_id)
    )
    sent = time.monotonic()
    await registry.Register(request, timeout=10)
    return sent, time.monotonic()


async def measure_traffic(server: str, samples: int, tmp: Path) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(server)
    registry = registry_pb2_grpc.RegistryStub(channel)
    base = Backend()
    await base.server.start()
    await register(registry, f"127.0.0.1:{base.port}", "base")
    path = tmp / "bootstrap.json"
    path.write_text(json.dumps(bootstrap(server, node_id="bench-stock-client")))
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "stock-client",
        f"xds:///{SERVICE}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(path), "GRPC_VERBOSITY": "ERROR"},
    )
    watched, stream = Watched(channel), Stream(channel, 0)
    backends = [base]
    results: dict[str, list[float]] = {"register": [], "watch": [], "ads": [], "traffic": []}
    try:
        async with asyncio.timeout(30):
            await base.called.wait()
        for i in range(samples):
            backend = Backend()
            await backend.server.start()
            backends.append(backend)
            address = f"127.0.0.1:{backend.port}"
            sent, acked = await register(registry, address, f"b{i}")
            results["register"].append(acked - sent)
            results["watch"].append(await watched.until(address) - sent)
            results["ads"].append(await stream.until(i + 2) - sent)
            async with asyncio.timeout(30):
                await backend.called.wait()
            assert backend.first_call is not None
            results["traffic"].append(backend.first_call - sent)
    finally:
        assert client.stdin is not None
        client.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await client.wait()
        if client.returncode is None:
            client.kill()
            await client.wait()
        await watched.close()
        await stream.close()
        for backend in backends:
            await backend.server.stop(0)
        await channel.close()
    return {name: _summary(values) for name, values in results.items()}


async def measure_fanout(server: str, streams: int, changes: int) -> dict[str, Any]:
    """A service of its own per run, registered from empty, so every run sends the same sizes."""
    service = f"fan-{streams}"
    channels = [grpc.aio.insecure_channel(server) for _ in range(max(1, streams // 50))]
    registry = registry_pb2_grpc.RegistryStub(channels[0])
    await register(registry, "127.0.0.2:1", "seed", service)
    opened = [Stream(channels[i % len(channels)], i, service) for i in range(streams)]
    each: list[float] = []
    last: list[float] = []
    try:
        count = await _count(opened[0])
        started = time.monotonic()  # counted from the first stream's answer: a lower bound
        await asyncio.gather(*(s.until(count) for s in opened))
        connect = time.monotonic() - started
        for n in range(changes):
            sent, _ = await register(registry, f"127.0.0.2:{n + 2}", f"fan-{n}", service)
            count += 1
            arrivals = await asyncio.gather(*(s.until(count) for s in opened))
            each.extend(t - sent for t in arrivals)
            last.append(max(arrivals) - sent)
    finally:
        for s in opened:
            await s.close()
        for channel in channels:
            await channel.close()
    return {"streams": streams, "subscribe_all_s": round(connect, 3), "each": _summary(each), "all": _summary(last)}


async def _count(stream: Stream) -> int:
    """The endpoint count of the first assignment ``stream`` receives."""
    async with asyncio.timeout(30):
        while not stream.arrived:
            stream.changed.clear()
            await stream.changed.wait()
    return max(stream.arrived)


async def start_server(etcd: EtcdProcess, log_dir: Path) -> ServerProcess:
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, str(HERE / "_servers.py"), "discovery", "--listen", address]
    command += ["--etcd", etcd.endpoint, "--region", "us-east"]
    server = ServerProcess(command, address, log_dir / "server.log", name="the discovery server")
    return await asyncio.to_thread(server.start, 60)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=30, help="register -> traffic samples (30)")
    parser.add_argument("--streams", default="100,1000", help="ADS stream counts for the fan-out (100,1000)")
    parser.add_argument("--changes", type=int, default=20, help="registrations per fan-out run (20)")
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="xds-bench-") as tmp:
        etcd = await asyncio.to_thread(EtcdProcess(Path(tmp) / "etcd").start)
        server = await start_server(etcd, Path(tmp))
        address = server.address
        try:
            print(f"server on {address}; traffic, {args.samples} samples", file=sys.stderr)
            result: dict[str, Any] = {"traffic": await measure_traffic(address, args.samples, Path(tmp))}
            fanout = []
            for n in [1, *counts]:
                print(f"fan-out to {n} streams", file=sys.stderr)
                fanout.append(await measure_fanout(address, n, args.changes))
            result["fanout"] = fanout
        finally:
            await asyncio.to_thread(server.stop, 30.0)
            await asyncio.to_thread(etcd.stop)
    result["machine"] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    result["parameters"] = vars(args)
    print(json.dumps(result, indent=2))
    t = result["traffic"]
    print(
        f"register -> traffic p50 {t['traffic']['p50_ms']} ms "
        f"(ads push {t['ads']['p50_ms']}, view {t['watch']['p50_ms']})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "stock-client":
        stock_client(sys.argv[2])
    else:
        asyncio.run(main())
