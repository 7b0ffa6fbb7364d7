"""``discovery dev``: a local cluster in the foreground until Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

from discovery.cli._common import OK, USAGE, CommandError, add_verb, bounded_int
from discovery.devtools.cluster import (
    ADMIN_P12,
    ADMIN_P12_PASSWORD,
    DEFAULT_REGIONS,
    DEFAULT_TRUST_DOMAIN,
    DevCluster,
    EarlierCluster,
)
from discovery.devtools.process import StartAborted

DEV_DESCRIPTION = """Run a whole local cluster in the foreground, like `consul agent -dev`.

Each region gets its own etcd (1 or 3 members) and its discovery servers, all
on 127.0.0.1. Every region is peered with all the others, nearest first in the
order of --regions: that order is what FAILOVER follows. For trying and
testing, never production.

Every port serves mTLS from a development CA made in STATE_DIR/tls/ (a CA
already there, left by a run with --keep, is used again, so certificates
issued from it keep working). A region's servers present
spiffe://TRUST_DOMAIN/discovery/server/REGION; clients, a certificate of the
CA. STATE_DIR/env.sh exports the admin's certificate
(spiffe://TRUST_DOMAIN/admin) and the first server for the CLI and the client
library: `source STATE_DIR/env.sh`. STATE_DIR/policy.toml lets the admin do
everything, spiffe://TRUST_DOMAIN/svc/NAME register NAME and NAME.* and read
everything, and the servers replicate; the servers reload it when you edit it.
Each server also serves plaintext gRPC health alone on a port of its own (role
`health` in the table), for probes without a certificate. --insecure serves
plaintext with no identities instead. Each server serves DNS too (role `dns`;
dig @127.0.0.1 -p PORT web.service.discovery.), every service visible
(docs/dns.md).

Each server also serves HTTP (role `http`): the JSON API, events, /metrics and
the dashboard at /ui/ (docs/http.md), HTTPS needing a client certificate under
mTLS. For a browser, STATE_DIR/admin.p12 holds the admin's identity as PKCS#12
(password: discovery): import it, then open https://ADDRESS/ui/. --metrics
adds a plaintext /metrics, /healthz, /readyz port per server (role `metrics`).

Servers reach the other regions through a userspace fault proxy, and a control
endpoint takes faults from `discovery drill` (pause a region, kill a server or
etcd member, partition or slow a link between regions), without root."""

DEV_EXAMPLES = """examples:
  # us-east, eu-west, ap-south; servers on 7400, 7401, 7402
  discovery dev
  # (in another terminal) the admin's certificate...
  source STATE_DIR/env.sh
  # ...then ask eu-west
  discovery resolve web --server 127.0.0.1:7401
  # plaintext, no certificates (env.sh: DISCOVERY_INSECURE=1)
  discovery dev --insecure
  # identities spiffe://example.test/...
  discovery dev --trust-domain example.test
  discovery dev --regions us-east,eu-west --servers-per-region 2 \\
      --etcd-members 3
  # free ports, to run beside another cluster
  discovery dev --base-port 0
  # keep data, logs and cluster.json after exit
  discovery dev --state-dir /tmp/dc --keep
  # servers dial the other regions directly
  discovery dev --no-fault-proxy
  # take over from a cluster still running there
  discovery dev --state-dir /tmp/dc --replace

It prints a line per process it starts, then `state dir: PATH`, a table of
every endpoint (region, role, address, pid, log file in the state dir), the
lines `mtls: ...` (or `insecure: ...`), `clients: source STATE_DIR/env.sh` and
`control: ADDRESS` (the control endpoint), then the line `ready`: from then on
every server answers and every etcd is healthy. The same endpoints, as JSON,
are in STATE_DIR/cluster.json (the line `cluster.json: PATH` just before
`ready` says where):
  {"regions": {"us-east": {
       "servers": [{"address": "127.0.0.1:7400", "pid": 4242,
                    "health": "127.0.0.1:40215",
                    "dns": "127.0.0.1:40216",
                    "http": "127.0.0.1:40217"}],
       "etcd": [{"address": "127.0.0.1:40213", "pid": 4240}]}, ...},
   "state_dir": "...",
   "tls": {"ca": ".../tls/ca.pem", "cert": ".../tls/admin.pem",
           "key": ".../tls/admin-key.pem",
           "trust_domain": "discovery.local"},
   "control": "127.0.0.1:39145",
   "routes": {"us-east": {"eu-west": ["127.0.0.1:41877"], ...}, ...}}
Every pid is the process itself (etcd, the server's Python): a signal sent to
it reaches it. `tls` holds the admin's files (what `discovery drill` presents)
and `health` each server's plaintext health port; both are absent with
--insecure. `http` is each server's HTTP address (https under mTLS, http with
--insecure); `metrics` its plaintext metrics port, with --metrics only.
`routes` gives, per region and peer region, the proxy address its servers
dial for each of that peer's servers (absent with --no-fault-proxy).

Ctrl-C, SIGTERM or SIGHUP (the terminal closed), also during startup, stops
everything it started and exits 0. However it ends, even by SIGKILL, no etcd
or server outlives it: the kernel kills them with it. If a process fails to
start, the rest is stopped and the error names that process and its log file.

It will not start over an earlier cluster, and exits 2 naming what is in the
way (pid and what it is, each checked in /proc to be that very etcd or
server): a `discovery dev` still running with the same --state-dir; processes
of an earlier one still running (left by a version without this protection);
its files in --state-dir; or, with a fixed --base-port, a cluster of a default
state dir whose servers hold the ports. --replace stops those processes
(SIGTERM, then SIGKILL if they have not exited in time; an earlier
`discovery dev` stops its own cluster), removes the earlier cluster's files
from --state-dir, then starts."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_verb(
        sub,
        "dev",
        help="run a local multi-region cluster (etcd and servers per region) in the foreground",
        description=DEV_DESCRIPTION,
        epilog=DEV_EXAMPLES,
    )
    p.add_argument(
        "--regions",
        default=",".join(DEFAULT_REGIONS),
        metavar="A,B,C",
        help="comma-separated, nearest first (default: %(default)s)",
    )
    p.add_argument(
        "--servers-per-region",
        type=bounded_int(1, 16),
        default=1,
        metavar="N",
        help="discovery servers in each region (default: %(default)s)",
    )
    p.add_argument(
        "--etcd-members",
        type=int,
        default=1,
        choices=[1, 3],
        help="members of each region's etcd cluster (default: %(default)s)",
    )
    p.add_argument(
        "--base-port",
        type=bounded_int(0, 65535),
        default=7400,
        metavar="PORT",
        help="first server port, the next servers follow in region order; 0 picks free ports (default: %(default)s)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="data, logs and cluster.json (default: a new temp dir); what it creates there is removed on exit",
    )
    p.add_argument("--keep", action="store_true", help="keep what was created in the state dir on exit")
    p.add_argument(
        "--replace",
        action="store_true",
        help="if an earlier cluster is in the way (running with the same --state-dir, its processes or files left "
        "there, or its servers on the ports of a fixed --base-port), stop it and remove its files from --state-dir, "
        "then start; without this flag such a start is refused",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext with no identities (anyone who can reach a port may do anything), as before mTLS",
    )
    p.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        metavar="DOMAIN",
        help="identities are spiffe://DOMAIN/... (default: %(default)s)",
    )
    p.add_argument(
        "--no-fault-proxy",
        dest="fault_proxy",
        action="store_false",
        help="inter-region traffic goes through a userspace fault proxy so `discovery drill` can partition or "
        "slow links without root; this flag connects regions directly",
    )
    p.add_argument(
        "--metrics",
        action="store_true",
        help="also give each server a plaintext /metrics, /healthz, /readyz port (role `metrics`)",
    )
    p.set_defaults(func=dev)


async def dev(args: argparse.Namespace) -> int:
    cluster = DevCluster(
        regions=[r.strip() for r in args.regions.split(",") if r.strip()],
        servers_per_region=args.servers_per_region,
        etcd_members=args.etcd_members,
        base_port=args.base_port,
        state_dir=args.state_dir,
        keep=args.keep,
        fault_proxy=args.fault_proxy,
        control=True,
        replace=args.replace,
        mtls=not args.insecure,
        trust_domain=args.trust_domain,
        dns=True,
        http=True,
        metrics=args.metrics,
    )
    try:
        cluster.validate()
    except ValueError as exc:
        raise CommandError(str(exc), USAGE) from None
    stop = threading.Event()

    def on_signal() -> None:
        stop.set()
        cluster.abort()  # a start still waiting gives up and stops what it started

    loop = asyncio.get_running_loop()
    # SIGHUP: the terminal was closed. Its default action would end this process without the
    # cleanup (the children would die with it, see discovery.devtools.lifeline, but drain nothing and
    # leave the state dir behind).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal)
    refused = False
    try:
        await asyncio.to_thread(cluster.start, _say)
        _say(f"state dir: {cluster.state_dir}")
        _say(cluster.table())
        for line in _security_lines(cluster):
            _say(line)
        _say(f"control: {cluster.control_address}")
        _say(f"cluster.json: {cluster.state_file}")
        _say("ready")
        reported: set[str] = set()
        while not await asyncio.to_thread(stop.wait, 1.0):
            for line in set(cluster.dead()) - reported:
                _say(f"warning: {line}", sys.stderr)
                reported.add(line)
    except StartAborted:
        pass  # asked to stop during startup: not a failure
    except EarlierCluster as exc:
        refused = True  # before anything started: nothing to report stopping
        raise CommandError(str(exc), USAGE) from None  # to be settled by the user, or by --replace
    except (RuntimeError, OSError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        if not refused:
            _say("stopping")
        await asyncio.to_thread(cluster.stop)
    return OK


def _security_lines(cluster: DevCluster) -> list[str]:
    """How clients get in: the CA and identities (or that there are none), and env.sh."""
    env = f"clients: source {cluster.env_file}"
    tls = cluster.tls
    if tls is None:
        return ["insecure: plaintext, no identities: anyone who can reach a port may do anything", env]
    assert cluster.state_dir is not None
    # Each line within 80 columns but for the paths, which are as long as the state dir's.
    lines = [
        f"mtls: CA tls/ca.pem ({'kept from an earlier run' if tls.ca_reused else 'new'}), policy {tls.policy.name}",
        f"admin: {tls.admin} (tls/admin.pem)",
        env,
    ]
    password = ADMIN_P12_PASSWORD.decode()
    lines.append(f"browser: import {ADMIN_P12} (password {password}), open https://HTTP/ui/")
    if importlib.util.find_spec("discovery.cli.certs") is not None:
        lines += [
            "a service's certificate (in the state dir):",
            "  discovery certs issue --ca-dir tls --out NAME \\",
            f"      --id spiffe://{tls.trust_domain}/svc/NAME",
        ]
    return lines


def _say(line: str, stream: TextIO | None = None) -> None:
    """Print a line, unless the terminal is gone. After SIGHUP a write to the closed terminal
    fails (EIO; EPIPE for a pipe whose reader left): the stop must go on regardless, so the
    stream is pointed at /dev/null, for this line, what is still buffered and what follows."""
    stream = stream or sys.stdout
    try:
        print(line, file=stream, flush=True)
    except OSError:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
