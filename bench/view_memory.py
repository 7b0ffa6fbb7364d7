"""The view's memory per instance and its first load, in-process and repeatable.

Builds synthetic etcd key-values of realistic records (IPv4 address, zone, two tags, two
metadata entries, owner ``spiffe://discovery.local/svc/<name>``, spread over 1000 services),
and, for each N, in a fresh child process:

* ``load_s``: the time of the view's first listing over them, a page at a time as the server
  takes it (``View._paged``; all at once, ``View._listed``, where the view cannot), including
  making the records (about 0.35 s of it at 100k);
* ``tracemalloc_bytes_per_instance``: Python allocations the view keeps, per instance
  (measured in a second pass with tracemalloc on; the listing itself is freed first);
* ``rss_bytes_per_instance``: the process's RSS growth over the load, per instance
  (the key-values as listed are freed, so what is left is what the view keeps, fragmentation
  included);
* ``history_bytes`` / ``churn_rss_bytes_per_instance``: the same after ``--churn`` changes
  (default 20,000) went through the view's change history.

Also, with ``--etcd``, the cold start of a real server: start etcd, load N instances straight
into it (as bench/resolve_bench.py does) and time a discovery server from its start until it
answers gRPC health, and its RSS then.

    python bench/view_memory.py                         # N = 10000, 100000
    python bench/view_memory.py --sizes 100000 --etcd   # plus the real server's cold start
    python bench/view_memory.py --profile /tmp/load.prof --sizes 100000   # cProfile the load
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.keys import KeySchema
from discovery.store import Event, KeyValue, WatchBatch
from discovery.view import View
from discovery_pb.v1.types_pb2 import Instance, Status

KEYS = KeySchema()
REGION = "bench"
SERVICES = 1000
_PAGE = os.sysconf("SC_PAGE_SIZE")


def record(i: int, services: int = SERVICES, region: str = REGION, build: int = 0) -> tuple[bytes, bytes]:
    service = f"svc-{i % services:04d}.bench"
    instance = Instance(
        service=service,
        instance_id=f"i-{i:06d}",
        region=region,
        zone=f"{region}-{'abc'[i % 3]}",
        address=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:8080",
        metadata={"team": "payments", "build": f"b{(i + build) % 97}"},
        tags=["http", f"shard-{i % 8}"],
        weight=100,
        status=Status.SERVING,
        version="2.4.1",
        registered_at_ms=1_700_000_000_000 + i,
        ttl_seconds=10,
        owner=f"spiffe://discovery.local/svc/{service}",
        session_id=1_000 + i // 100,
    )
    return KEYS.instance(region, service, instance.instance_id), instance.SerializeToString()


def key_values(n: int, start: int = 0) -> list[KeyValue]:
    return [KeyValue(*record(i), 2 + i, 7_000_000 + i // 100) for i in range(start, n)]


PAGE = 7000  # about what Store.list_pages reads per page of such records


def load(view: View, n: int) -> None:
    """The first listing as the server takes it: a page at a time when the view can (each
    page made only when it is read, as from etcd), else all at once."""
    paged = getattr(view, "_paged", None)
    listing = paged() if paged is not None else None
    if listing is None:
        view._listed(n + 2, key_values(n))
        return
    for start in range(0, n, PAGE):
        listing.page(n + 2, key_values(min(n, start + PAGE), start))
    listing.done(n + 2)


class _Store:
    """What the view needs of the store, without etcd: the listing is handed in directly."""

    cluster_id = 1
    raft_term = 1

    async def list_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        raise NotImplementedError

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncGenerator[WatchBatch, None]:
        raise NotImplementedError
        yield  # an async generator

    async def unchanged_since(self, prefix: bytes, revision: int, count: int, at: int) -> bool:
        return True

    def request_progress(self) -> None:
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def measure(n: int, churn: int, profile: str | None) -> dict[str, Any]:
    """One N, in this process (run it in a fresh one)."""

    async def body() -> dict[str, Any]:
        out: dict[str, Any] = {"instances": n}
        # Pass 1: time and RSS (from before the listing exists: its values are kept).
        gc.collect()
        rss0 = _rss()
        view = View(_Store(), KEYS)  # type: ignore[arg-type]
        profiler = cProfile.Profile() if profile else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        load(view, n)
        if profiler:
            profiler.disable()
        out["load_s"] = round(time.perf_counter() - start, 3)  # including making the records
        gc.collect()
        out["rss_bytes_per_instance"] = round((_rss() - rss0) / n)
        if profiler and profile:
            profiler.dump_stats(profile)
            stats = pstats.Stats(profile)
            stats.sort_stats("cumulative").print_stats(25)
        # Churn: changes through the history (what a busy region leaves in it).
        start = time.perf_counter()
        rss1 = _rss()
        for j in range(churn):
            i = j % n
            key, value = record(i, build=1 + j // n)
            view._apply([Event(False, KeyValue(key, value, n + 3 + j, 7_000_000 + i // 100))], n + 3 + j)
        gc.collect()
        out["churn"] = churn
        out["churn_s"] = round(time.perf_counter() - start, 3)
        out["churn_rss_bytes"] = _rss() - rss1
        out["history_bytes"] = getattr(view._history, "bytes", None)  # None: not counted (entries only)
        out["rss_after_churn_bytes_per_instance"] = round((_rss() - rss0) / n)
        del view
        gc.collect()
        # Pass 2: what Python allocations the view keeps (tracemalloc is slow: not timed).
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        view = View(_Store(), KEYS)  # type: ignore[arg-type]
        load(view, n)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - base
        out["tracemalloc_bytes_per_instance"] = round(kept / n)
        snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
        out["top_allocations"] = [
            f"{s.traceback[0].filename.rsplit('/', 2)[-1]}:{s.traceback[0].lineno} {round(s.size / n)} B/inst"
            for s in snapshot.statistics("lineno")[:6]
        ]
        del view
        return out

    return asyncio.run(body())


def cold_start(n: int, spy: str | None = None) -> dict[str, Any]:
    """A real server over N instances in etcd: seconds from its start until it serves, and
    its RSS then, less that of a server over an empty prefix of the same etcd."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from resolve_bench import load_instances, service_names

    from discovery.devtools.etcd import EtcdProcess

    with tempfile.TemporaryDirectory(prefix="view-memory-") as tmp, contextlib.ExitStack() as stack:
        etcd = EtcdProcess(Path(tmp) / "etcd").start()
        stack.callback(etcd.stop)
        loaded = asyncio.run(load_instances(etcd.endpoint, KEYS, REGION, service_names(SERVICES), n))
        empty_s, empty_rss = _serve(etcd.endpoint, "/empty/", Path(tmp) / "empty.log", None)
        seconds, rss = _serve(etcd.endpoint, KEYS.prefix, Path(tmp) / "server.log", spy)
        return {
            "instances": n,
            "etcd_load_s": round(loaded, 1),
            "cold_start_s": round(seconds, 2),
            "empty_start_s": round(empty_s, 2),
            "server_rss_mb": round(rss / 2**20, 1),
            "empty_server_rss_mb": round(empty_rss / 2**20, 1),
            "rss_bytes_per_instance": round((rss - empty_rss) / max(n, 1)),
        }


def _serve(etcd: str, prefix: str, log: Path, spy: str | None) -> tuple[float, int]:
    """Start a server, time it until it serves, read its RSS, stop it."""
    from discovery.devtools.process import ServerProcess, free_port

    address = f"127.0.0.1:{free_port()}"
    runner = Path(__file__).with_name("_servers.py")
    command = [sys.executable, str(runner), "discovery", "--listen", address, "--etcd", etcd]
    command += ["--region", REGION, "--prefix", prefix]
    if spy:
        exe = str(Path(sys.executable).with_name("py-spy"))
        command = [exe, "record", "--rate", "250", "--format", "raw", "--output", spy, "--", *command]
    server = ServerProcess(command, address, log, name="discovery server")
    start = time.perf_counter()
    server.start(timeout=120)
    try:
        seconds = time.perf_counter() - start
        time.sleep(0.5)  # let startup's garbage go
        rss = _proc_rss(server.proc.pid) if server.proc and not spy else 0
    finally:
        server.stop()
    return seconds, rss


def _proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="instance counts (default 10000,100000)")
    parser.add_argument("--churn", type=int, default=20_000, help="changes applied after the load (default 20000)")
    parser.add_argument("--etcd", action="store_true", help="also the cold start of a real server over etcd")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the load (one size) and print the top")
    parser.add_argument("--spy", metavar="FILE", help="with --etcd: py-spy the server's cold start (raw stacks)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.churn, args.profile)))
        return 0
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        command = [sys.executable, __file__, "--child", str(n), "--churn", str(args.churn)]
        if args.profile:
            command += ["--profile", args.profile]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        if args.profile:
            print(done.stdout.rsplit("\n", 2)[0], file=sys.stderr)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if args.etcd:
            result["server"] = cold_start(n, args.spy)
        results.append(result)
    print(json.dumps({"view_memory": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
