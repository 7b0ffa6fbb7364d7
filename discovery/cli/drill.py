"""``discovery drill SCENARIO``: a region-failure drill against a running cluster."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import TextIO

from discovery.cli._common import FAILED, OK, UNAVAILABLE, USAGE, CommandError, add_verb, bounded_int
from discovery.drill import (
    SCENARIOS,
    Bounds,
    ClusterFile,
    ClusterFileError,
    DrillError,
    DrillSettings,
    LinkSettings,
    LoadSettings,
    Progress,
    run_drill,
)
from discovery.drill.analysis import FAILED as VERDICT_FAILED
from discovery.drill.analysis import PASSED as VERDICT_PASSED
from discovery.drill.saturation import Thresholds

INCONCLUSIVE = 7  # exit code: no guarantee broke, but latency (or availability) could not be judged

DESCRIPTION = """Prove, before a real outage, that one region's failure never blocks another.

Drives a steady load in every region (registrations, deregistrations,
resolves, leased instances with heartbeats, a watch per region), takes a
baseline, injects the fault, holds it, heals it, keeps the load going, then
reads every region's view and checks:
  - the other regions kept their availability (--min-success) and latency
    (--max-slowdown);
  - nothing acknowledged was lost, nothing deleted came back;
  - every region converged within --converge-within seconds of the heal.
Every call is recorded as ok, failed or unknown (a timeout is unknown: it may
have happened).

The verdict is passed, failed or inconclusive. Latency is judged at the
percentile the number of calls supports (at least 5 calls above it: p92 of 66,
p95 of 100, p99 from 500), on the calls made while the machine had CPU to
spare: a slowdown seen only while this machine (or the drill itself) was
saturated, or a baseline taken on a saturated machine, makes the latency
verdict inconclusive, never failed. Lost, resurrected, availability and
convergence are judged whatever the machine's load.

scenarios:
""" + "\n".join(
    textwrap.fill(
        f"{s.summary} (default hold {s.hold:g}s)",
        80,
        initial_indent=f"  {name:<25} ",
        subsequent_indent=" " * 28,
        break_on_hyphens=False,
    )
    for name, s in SCENARIOS.items()
)

EPILOG = """examples:
  # in one terminal (cluster.json goes there)
  discovery dev --state-dir /tmp/dc
  discovery drill region-hang --cluster /tmp/dc/cluster.json
  discovery drill region-partition --cluster /tmp/dc/cluster.json \\
      --region eu-west --duration 30
  discovery drill slow-link --cluster /tmp/dc/cluster.json \\
      --delay-ms 150 --jitter-ms 50 --loss 0.05
  discovery drill server-kill --cluster /tmp/dc/cluster.json \\
      --json > report.json
  # a real deployment
  discovery drill region-partition --cluster prod.json --region ap-south \\
      --inject './cut.sh ap-south' --heal './uncut.sh ap-south'

Against `discovery dev` the faults go through its control endpoint and fault
proxy (no root needed); etcd-leader-kill needs
`discovery dev --etcd-members 3`. Against any other cluster, write
cluster.json by hand (docs/drills.md) and give the fault as --inject/--heal
commands.

exit codes:
  0  passed: every guarantee held
  1  failed: a guarantee broke (the report says which)
  2  bad usage, or the scenario cannot run on this cluster
  4  the cluster did not answer, or the fault could not be injected or healed
  7  inconclusive: no guarantee broke, but something could not be judged
     (the report says why: this machine was saturated, or too few calls)"""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_verb(
        sub,
        "drill",
        help="run a region-failure drill against a running cluster and report what held",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument("scenario", choices=list(SCENARIOS), metavar="SCENARIO", help="one of: " + ", ".join(SCENARIOS))
    p.add_argument("--cluster", required=True, type=Path, metavar="FILE", help="cluster.json of the cluster")
    p.add_argument("--region", metavar="REGION", help="the region to fault (default: the last in the file)")
    p.add_argument("--duration", type=_seconds, metavar="SECONDS", help="how long the fault is held")
    p.add_argument("--baseline", type=_seconds, default=5.0, metavar="SECONDS", help="default: %(default)s")
    p.add_argument(
        "--after", type=_seconds, default=10.0, metavar="SECONDS", help="load after the heal; default: %(default)s"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON (progress still goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    load = p.add_argument_group("load, per region")
    load.add_argument(
        "--register-rate", type=_positive, default=10.0, metavar="PER_SECOND", help="default: %(default)s"
    )
    load.add_argument("--resolve-rate", type=_positive, default=20.0, metavar="PER_SECOND", help="default: %(default)s")
    load.add_argument(
        "--deregister-every", type=bounded_int(1, 1000), default=3, metavar="N", help="default: %(default)s"
    )
    load.add_argument("--leased", type=bounded_int(0, 100), default=4, metavar="N", help="default: %(default)s")
    load.add_argument(
        "--lease-ttl", type=bounded_int(1, 3600), default=5, metavar="SECONDS", help="default: %(default)s"
    )
    load.add_argument(
        "--op-timeout", type=_positive, default=1.0, metavar="SECONDS",
        help="a call unanswered this long is recorded unknown (default: %(default)s)",
    )  # fmt: skip
    bounds = p.add_argument_group("what counts as broken")
    bounds.add_argument("--min-success", type=float, default=0.99, metavar="SHARE", help="default: %(default)s")
    bounds.add_argument(
        "--max-slowdown", type=float, default=3.0, metavar="RATIO", help="p99 vs baseline; default: %(default)s"
    )
    bounds.add_argument("--slowdown-floor-ms", type=float, default=25.0, metavar="MS", help="default: %(default)s")
    bounds.add_argument(
        "--converge-within",
        type=_positive,
        default=15.0,
        metavar="SECONDS",
        help="after the heal; leave room for the servers' --resume-grace, 10 s (default: %(default)s)",
    )
    sat = p.add_argument_group(
        "when this machine counts as saturated",
        "Calls that met it are left out of the latency judgement.",
    )
    sat.add_argument(
        "--saturated-busy", type=_share, default=Thresholds.busy, metavar="SHARE",
        help="every CPU's busy share over half a second, from /proc/stat (default: %(default)s)",
    )  # fmt: skip
    sat.add_argument(
        "--saturated-cpu-wait", type=_share, default=Thresholds.cpu_wait, metavar="SHARE",
        help="share of the time runnable tasks waited for a CPU, from /proc/pressure/cpu (default: %(default)s)",
    )  # fmt: skip
    sat.add_argument(
        "--saturated-late-ms", type=float, default=Thresholds.tick_late * 1000, metavar="MS",
        help="the drill's own load ticks running this late (default: %(default)s)",
    )  # fmt: skip
    link = p.add_argument_group("slow-link")
    link.add_argument("--delay-ms", type=float, default=150.0, metavar="MS", help="default: %(default)s")
    link.add_argument("--jitter-ms", type=float, default=50.0, metavar="MS", help="default: %(default)s")
    link.add_argument("--loss", type=float, default=0.05, metavar="SHARE", help="default: %(default)s")
    hooks = p.add_argument_group("faults by your own commands (for clusters without a control endpoint)")
    hooks.add_argument("--inject", metavar="COMMAND", help="shell command that injects the fault")
    hooks.add_argument("--heal", metavar="COMMAND", help="shell command that heals it")
    p.set_defaults(func=drill)


def _seconds(text: str) -> float:
    value = _positive(text)
    if value > 24 * 3600:
        raise argparse.ArgumentTypeError(f"{value:g} s is more than a day")
    return value


def _share(text: str) -> float:
    """0..1; above 1 never matches (turns that test off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is below 0")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not > 0")
    return value


class _Terminal(Progress):
    """Events as lines; on a terminal the live line rewrites itself, elsewhere one in five is
    printed so a log shows progress without a line a second."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.count = 0
        self.width = 0

    def event(self, line: str) -> None:
        self._clear()
        print(line, file=self.out, flush=True)

    def live(self, line: str) -> None:
        self.count += 1
        if self.tty:
            self._clear()
            self.out.write(line[:200])
            self.width = len(line[:200])
            self.out.flush()
        elif self.count % 5 == 0:
            print(line, file=self.out, flush=True)

    def _clear(self) -> None:
        if self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.width = 0


async def drill(args: argparse.Namespace) -> int:
    try:
        cluster = ClusterFile.load(args.cluster)
    except ClusterFileError as exc:
        raise CommandError(str(exc), USAGE) from None
    settings = DrillSettings(
        scenario=args.scenario,
        target=args.region,
        hold=args.duration,
        baseline=args.baseline,
        after=args.after,
        load=LoadSettings(
            register_rate=args.register_rate,
            deregister_every=args.deregister_every,
            resolve_rate=args.resolve_rate,
            leased=args.leased,
            lease_ttl=args.lease_ttl,
            op_timeout=args.op_timeout,
        ),
        bounds=Bounds(
            min_success=args.min_success,
            max_slowdown=args.max_slowdown,
            slowdown_floor_ms=args.slowdown_floor_ms,
            converge_within=args.converge_within,
        ),
        link=LinkSettings(delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, loss=args.loss),
        saturation=Thresholds(
            busy=args.saturated_busy, cpu_wait=args.saturated_cpu_wait, tick_late=args.saturated_late_ms / 1000
        ),
        inject_command=args.inject,
        heal_command=args.heal,
    )
    if args.log_level == "info":
        # The report is the output: the client library's notes on every failover and lease
        # lost would bury it (and stdout must stay JSON with --json). --log-level debug shows them.
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("discovery_client").setLevel(logging.ERROR)
    progress = Progress() if args.quiet else _Terminal(sys.stderr)
    try:
        report = await run_drill(cluster, settings, progress)
    except DrillError as exc:
        raise CommandError(str(exc), USAGE if exc.usage else UNAVAILABLE) from None
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.table())
    if report.outcome == VERDICT_PASSED:
        return OK
    return FAILED if report.outcome == VERDICT_FAILED else INCONCLUSIVE
