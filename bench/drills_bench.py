"""Every drill scenario at full length against a fresh local cluster: the figures in
docs/drills.md.

    .venv/bin/python bench/drills_bench.py [--scenarios a,b] [--servers-per-region 2] [--etcd-members 3]

Starts a `discovery dev` cluster (three regions, fault proxy, control endpoint) in this
process, runs each scenario with the drill's defaults one after the other, prints each
report's table to stderr and one JSON object to stdout: per scenario the verdict (passed,
failed or inconclusive, with the reasons), the machine's CPU per phase, and the figures that
matter, each region's own baseline (the phase before the fault) beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from discovery.devtools.cluster import DevCluster
from discovery.drill import SCENARIOS, ClusterFile, DrillSettings, Report, run_drill


def summary(report: Report) -> dict[str, Any]:
    """What docs/drills.md shows: per region and phase, success and p99; lag; the checks."""
    regions = {}
    for name in report.regions:
        phases = {}
        for phase, fig in report.figures[name].items():
            phases[phase] = {
                "writes_ok": _share(fig.writes.success),
                "writes_p99_ms": _ms(fig.writes.p99_ms),
                "resolve_ok": _share(fig.resolve.success),
                "resolve_p99_ms": _ms(fig.resolve.p99_ms),
                "lag_in_p99_ms": _ms(fig.lag_p99_ms),
            }
        regions[name] = {"judged": name in report.judged, **phases}
    v = report.verdict
    return {
        "verdict": report.outcome,
        "passed": report.passed,
        "broken": report.broken,
        "inconclusive": report.inconclusive,
        "host": {phase: dict(figures) for phase, figures in report.host.items()},
        "target": report.target,
        "hold_s": report.hold,
        "heal_s": round(report.heal_took or 0.0, 2),
        "convergence_s": None if v.convergence_s is None else round(v.convergence_s, 2),
        "acknowledged": v.acknowledged,
        "deleted": v.deleted,
        "indeterminate": v.indeterminate,
        "lost": len(v.lost),
        "resurrected": len(v.resurrected),
        "flapped": v.flapped,
        "regions": regions,
        "fault": dict(report.notes),
    }


def _share(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    dev = DevCluster(
        servers_per_region=args.servers_per_region,
        etcd_members=args.etcd_members,
        fault_proxy=True,
        control=True,
    )
    await asyncio.to_thread(dev.start, lambda line: None)
    out: dict[str, Any] = {
        "cluster": {"servers_per_region": args.servers_per_region, "etcd_members": args.etcd_members}
    }
    try:
        cluster = ClusterFile.load(dev.state_file)
        for name in args.scenarios.split(","):
            if name == "etcd-leader-kill" and args.etcd_members < 3:
                continue
            started = time.monotonic()
            print(f"--- {name}", file=sys.stderr, flush=True)
            report = await run_drill(cluster, DrillSettings(scenario=name))
            print(report.table(), file=sys.stderr, flush=True)
            out[name] = {"seconds": round(time.monotonic() - started, 1), **summary(report)}
    finally:
        await asyncio.to_thread(dev.stop)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--servers-per-region", type=int, default=2)
    parser.add_argument("--etcd-members", type=int, default=3, choices=[1, 3])
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
