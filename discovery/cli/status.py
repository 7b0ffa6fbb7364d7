"""``discovery status``."""

from __future__ import annotations

import argparse
import textwrap

from discovery.answers import status_dict
from discovery.cli._common import OK, add_client_flags, add_verb, client, print_json, print_table
from discovery.cli._render import ORIGIN_HEADER, ORIGIN_PATH_HEADER, checks_line, origin_path_row, origin_row
from discovery_pb.v1.admin_pb2 import StatusResponse


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = add_verb(
        sub,
        "status",
        help="the server's region, revision, instances, etcd health and replication from each peer region",
        description="The server's region, revision, instances, etcd health and replication\nfrom each peer region.",
        epilog="examples:\n  discovery status\n  discovery status --server 127.0.0.1:7401 --json",
    )
    add_client_flags(s)
    s.set_defaults(func=status)


async def status(args: argparse.Namespace) -> int:
    async with client(args) as api:
        resp = await api.status()
    if args.json:
        print_json(status_dict(resp))
        return OK
    print_status(resp)
    return OK


def print_status(resp: StatusResponse) -> None:
    print(f"region     {resp.region}")
    print(f"revision   {resp.revision}{'  (stale)' if resp.stale else ''}")
    print(f"instances  {resp.instance_count} in {resp.service_count} services")
    health = "healthy" if resp.etcd.healthy else f"UNHEALTHY: {resp.etcd.error}"
    print(f"etcd       {','.join(resp.etcd.endpoints)}  {health}")
    print(f"server     {resp.server_version}, up {resp.uptime_seconds:.0f}s")
    if resp.HasField("health_checks"):
        print(textwrap.fill(f"checks     {checks_line(resp.health_checks)}", width=80, subsequent_indent="           "))
    if resp.origins:
        print()
        print_table(ORIGIN_HEADER, [origin_row(o) for o in resp.origins])
        print()
        print_table(ORIGIN_PATH_HEADER, [origin_path_row(o) for o in resp.origins])
        for o in resp.origins:
            if o.warning:
                print(textwrap.fill(f"warning: {o.origin}: {o.warning}", width=80, subsequent_indent="  "))
