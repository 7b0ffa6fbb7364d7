"""``discovery dev``: a local cluster in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from pathlib import Path

from discovery.cli._common import OK, USAGE, CommandError, add_verb, bounded_int
from discovery.dev import DevCluster

DEV_EXAMPLES = """examples:
  discovery dev                                  # region us-east: one etcd, one server on 127.0.0.1:7400
  discovery dev --regions us-east,eu-west --servers-per-region 2
  discovery dev --state-dir /tmp/dc --keep       # keep data and logs after exit

Prints a table of endpoints, then `ready`, and writes the same as JSON to STATE_DIR/cluster.json.
Ctrl-C or SIGTERM stops everything it started."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_verb(
        sub,
        "dev",
        help="run a local cluster (etcd and servers per region) in the foreground",
        epilog=DEV_EXAMPLES,
    )
    p.add_argument("--regions", default="us-east", help="comma-separated, nearest first (default: %(default)s)")
    p.add_argument("--servers-per-region", type=int, default=1, metavar="N")
    p.add_argument("--etcd-members", type=int, default=1, choices=[1, 3], help="members per region's etcd")
    p.add_argument(
        "--base-port", type=bounded_int(1, 65535), default=7400, help="first server port; the next ones follow"
    )
    p.add_argument("--state-dir", type=Path, help="data and logs (default: a temp dir, removed on exit)")
    p.add_argument("--keep", action="store_true", help="keep the state dir on exit")
    p.set_defaults(func=dev)


async def dev(args: argparse.Namespace) -> int:
    cluster = DevCluster(
        regions=[r.strip() for r in args.regions.split(",") if r.strip()],
        servers_per_region=args.servers_per_region,
        etcd_members=args.etcd_members,
        base_port=args.base_port,
        state_dir=args.state_dir,
        keep=args.keep,
    )
    try:
        cluster.validate()
    except ValueError as exc:
        raise CommandError(str(exc), USAGE) from None
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.to_thread(cluster.start, lambda line: print(line, flush=True))
        print(cluster.table())
        print(f"state: {cluster.state_dir}/cluster.json")
        print("ready", flush=True)
        reported: set[str] = set()
        while not await asyncio.to_thread(stop.wait, 1.0):
            for line in set(cluster.dead()) - reported:
                print(f"warning: {line}", file=sys.stderr, flush=True)
                reported.add(line)
    except (RuntimeError, OSError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        print("stopping", flush=True)
        await asyncio.to_thread(cluster.stop)
    return OK
