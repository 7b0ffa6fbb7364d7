"""Every drill scenario in a short form against a small `discovery dev` cluster (real etcd
and server processes, the fault proxy between regions), plus the drill failing when a
guarantee does break.

Each test asserts the report's verdict and also that the fault really happened (a drill
that injected nothing would pass too): the hung region's writes failed, the cut-off region's
lag grew, the slow link's lag reached its delay, the compaction passed the checkpoint.

The machine is shared: when it is saturated, the latency verdict is inconclusive (never
failed), so the guarantees are asserted, and the verdict is passed or, for latency alone,
inconclusive.

The clusters serve mTLS, as `discovery dev` does: the drill presents the admin's certificate
named in cluster.json's ``tls``. The three-member one runs --insecure, so the drill's path
without ``tls`` (a deployment without TLS) is driven too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from discovery.devtools.cluster import DevCluster
from discovery.drill import Bounds, ClusterFile, DrillError, DrillSettings, LoadSettings, Report, run_drill
from discovery_pb.v1 import lookup_pb2, lookup_pb2_grpc, types_pb2
from tests.support.helpers import CALL_TIMEOUT, eventually

pytestmark = pytest.mark.slow

LEASE_TTL = 2
# Gentle on two cores; a lease TTL below every hold, so a frozen region's leases expire.
LOAD = LoadSettings(register_rate=8, resolve_rate=15, leased=3, lease_ttl=LEASE_TTL, op_timeout=1.0)
# A blocked call takes the op timeout (1 s): a floor of 150 ms over the baseline still catches
# that, without failing on a shared machine's scheduling noise between saturated stretches.
BOUNDS = Bounds(slowdown_floor_ms=150, converge_within=8)
BASELINE = 3.0  # 30-45 calls of each kind: latency judged at p83-p88
SERVER_ARGS = ("--stale-after", "1.5", "--resume-grace", "2")


def _cluster(tmp: Path, *, mtls: bool, **kwargs: object) -> Iterator[ClusterFile]:
    dev = DevCluster(
        state_dir=tmp / "dev",
        fault_proxy=True,
        control=True,
        server_args=SERVER_ARGS,
        mtls=mtls,
        **kwargs,  # type: ignore[arg-type]
    )
    dev.start(lambda line: None)
    try:
        yield ClusterFile.load(dev.state_file)
    finally:
        dev.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFile]:
    yield from _cluster(tmp_path_factory.mktemp("drills"), mtls=True, regions=("a", "b", "c"), servers_per_region=2)


@pytest.fixture(scope="module")
def three_member_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFile]:
    yield from _cluster(tmp_path_factory.mktemp("drills3"), mtls=False, regions=("a", "b"), etcd_members=3)


def admin_credentials(cluster: ClusterFile) -> grpc.ChannelCredentials:
    tls = json.loads(cluster.path.read_text())["tls"]
    return grpc.ssl_channel_credentials(*(Path(tls[key]).read_bytes() for key in ("ca", "key", "cert")))


async def drill(cluster: ClusterFile, scenario: str, hold: float, **overrides: object) -> Report:
    settings = DrillSettings(
        scenario=scenario,
        hold=hold,
        baseline=BASELINE,
        after=3.0,
        load=LOAD,
        bounds=BOUNDS,
        **overrides,  # type: ignore[arg-type]
    )
    report = await run_drill(cluster, settings)
    print(report.table())
    return report


def held(report: Report) -> None:
    """The guarantees every scenario must keep; latency may be inconclusive (this machine
    was saturated), never failed."""
    assert report.broken == [], report.broken
    assert report.outcome in ("passed", "inconclusive")
    assert report.passed == (report.inconclusive == [])
    for line in report.inconclusive:  # latency on a saturated machine, or the drill's own stall
        assert "latency" in line or "saturated" in line or "the drill itself stalled" in line, line
    v = report.verdict
    assert v.lost == [] and v.resurrected == []
    assert v.convergence_s is not None and v.convergence_s <= BOUNDS.converge_within
    assert v.acknowledged > 50
    for region in report.judged:
        for phase in ("before", "during", "after"):
            fig = report.figures[region][phase]
            assert fig.writes.total > 0 and fig.resolve.total > 0, (region, phase)


async def test_region_hang(cluster: ClusterFile) -> None:
    report = await drill(cluster, "region-hang", hold=LEASE_TTL + 2.5)
    held(report)
    assert report.judged == ("a", "b")
    during = report.figures["c"]["during"]
    assert during.writes.success is not None and during.writes.success < 0.5, "c was not hung"
    # The frozen region's leases expired on waking and were registered again: its own view
    # saw them flap; the other regions held the deletions and saw nothing.
    assert report.verdict.flapped["a"] == 0 and report.verdict.flapped["b"] == 0


async def test_region_partition(cluster: ClusterFile) -> None:
    report = await drill(cluster, "region-partition", hold=4.0)
    held(report)
    lag = report.figures["c"]["during"].lag_p99_ms
    assert lag is not None and lag > 1000, "nothing reached c late: it was not cut off"
    # c's own clients kept working inside c.
    assert report.figures["c"]["during"].writes.success == 1.0


async def test_a_drill_leaves_nothing_behind(cluster: ClusterFile) -> None:
    report = await drill(cluster, "region-partition", hold=1.0)
    request = lookup_pb2.ResolveRequest(
        service=report.service, scope=lookup_pb2.ALL, statuses=[types_pb2.SERVING, types_pb2.DRAINING]
    )
    creds = admin_credentials(cluster)
    for region in cluster.regions:
        async with grpc.aio.secure_channel(region.servers[0], creds) as channel:
            stub = lookup_pb2_grpc.LookupStub(channel)

            async def empty(stub: lookup_pb2_grpc.LookupStub = stub) -> bool:
                return not (await stub.Resolve(request, timeout=CALL_TIMEOUT)).endpoints

            await eventually(empty, timeout=5.0)


async def test_slow_link(cluster: ClusterFile) -> None:
    report = await drill(cluster, "slow-link", hold=4.0)
    held(report)
    assert report.judged == ("a", "b", "c")  # a slow link blocks no region
    lag = report.figures["c"]["during"].lag_p50_ms
    assert lag is not None and lag >= 100, f"lag into c {lag} ms: the link was not slowed"
    assert report.notes["link"] == {"delay_ms": 150.0, "jitter_ms": 50.0, "loss": 0.05}


async def test_server_kill(cluster: ClusterFile) -> None:
    report = await drill(cluster, "server-kill", hold=4.0)
    held(report)
    assert report.notes["server"] in (0, 1)
    assert any("restarted" in what for _, what in report.events)


async def test_compaction_during_outage(cluster: ClusterFile) -> None:
    report = await drill(cluster, "compaction-during-outage", hold=5.0)
    held(report)
    compacted, checkpoints = report.notes["compacted"], report.notes["checkpoints"]
    assert set(compacted) == {"a", "b"}
    for origin, revision in compacted.items():
        assert checkpoints[origin] < revision, "the compaction did not pass c's checkpoint"
    assert report.verdict.deleted > 10  # deletions made during the outage had to survive the snapshot


async def test_etcd_leader_kill(three_member_cluster: ClusterFile) -> None:
    report = await drill(three_member_cluster, "etcd-leader-kill", hold=3.0)
    held(report)
    assert report.notes["etcd_member"] in (0, 1, 2)


async def test_a_broken_guarantee_fails_the_drill(cluster: ClusterFile) -> None:
    """The fault hits a region the drill holds to its bounds (a's processes are frozen by
    the --inject command while the drill believes c is the target): the report must fail."""
    control = f"from discovery.devtools.control import ControlClient; ControlClient({cluster.control!r}).call"
    report = await drill(
        cluster,
        "region-hang",
        hold=2.0,
        inject_command=f"{sys.executable} -c \"{control}('pause_region', region='a')\"",
        heal_command=f"{sys.executable} -c \"{control}('resume_region', region='a')\"",
    )
    # A broken guarantee (a's writes failed: availability), whatever the machine's load.
    assert report.outcome == "failed" and not report.passed
    assert any(line.startswith("a during: writes") and "ok, below 99.0%" in line for line in report.broken), (
        report.broken
    )
    assert report.to_json()["verdict"] == "failed"


async def test_scenarios_that_cannot_run_say_why(cluster: ClusterFile, tmp_path: Path) -> None:
    with pytest.raises(DrillError, match="etcd-members 3") as info:
        await run_drill(cluster, DrillSettings("etcd-leader-kill"))
    assert info.value.usage
    with pytest.raises(DrillError, match="no region 'mars'"):
        await run_drill(cluster, DrillSettings("region-hang", target="mars"))
    no_control = tmp_path / "cluster.json"
    raw = json.loads(cluster.path.read_text())
    del raw["control"]
    no_control.write_text(json.dumps(raw))
    with pytest.raises(DrillError, match="--inject and --heal"):
        await run_drill(ClusterFile.load(no_control), DrillSettings("region-hang"))


def _command(cluster: ClusterFile, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "discovery", "drill", "slow-link",
        "--cluster", str(cluster.path), "--region", "b", "--json",
        "--baseline", "2.5", "--duration", "2", "--after", "2.5",
        "--register-rate", "8", "--resolve-rate", "10", "--leased", "1",
        "--slowdown-floor-ms", "150", "--converge-within", "8", *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)


def test_the_command_prints_json_and_exits_by_its_verdict(cluster: ClusterFile) -> None:
    done = _command(cluster)
    report = json.loads(done.stdout)
    # 0 passed; 7 when this shared machine was saturated (latency not judged); never 1.
    assert (done.returncode, report["verdict"]) in ((0, "passed"), (7, "inconclusive")), done.stdout + done.stderr
    assert report["broken"] == [] and report["passed"] is (report["verdict"] == "passed")
    assert report["target"] == "b"
    assert report["lost"] == [] and report["resurrected"] == []
    assert set(report["regions"]) == {"a", "b", "c"}
    assert report["regions"]["a"]["during"]["writes"]["ok"] > 0
    assert "links of b slowed" in done.stderr  # progress goes to stderr, the JSON alone to stdout
    assert set(report["host"]) == {"before", "during", "after"} and report["host"]["before"]["cpus"] >= 1
    assert {(c["region"], c["kind"]) for c in report["latency"]} == {
        (r, k) for r in ("a", "b", "c") for k in ("writes", "resolves")
    }


def test_a_saturated_machine_makes_the_command_inconclusive_exit_7(cluster: ClusterFile) -> None:
    """Every half-second counts as saturated (busy >= 0% of the CPUs): latency cannot be
    judged, nothing else broke. The verdict says so and the exit code is 7."""
    done = _command(cluster, "--saturated-busy", "0")
    assert done.returncode == 7, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "inconclusive" and report["passed"] is False
    assert report["broken"] == [] and report["lost"] == [] and report["resurrected"] == []
    assert report["inconclusive"], report
    for line in report["inconclusive"]:
        assert "latency not judged" in line and "host saturated" in line, line
    assert report["saturated_when"]["busy"] == 0
    assert report["host"]["before"]["saturated_seconds"] > 2


def test_help_lists_every_scenario_and_the_exit_codes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "discovery", "drill", "--help"], check=False, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    for name in ("region-hang", "region-partition", "slow-link", "etcd-leader-kill", "server-kill"):
        assert name in done.stdout
    assert "compaction-during-outage" in done.stdout and "a guarantee broke" in done.stdout
    assert "7  inconclusive" in done.stdout and "--saturated-busy" in done.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "cannot read it as JSON"),
        ('{"regions": {"a": {"servers": ["127.0.0.1:1"]}}}', "at least two regions"),
    ],
    ids=["missing", "not-json", "one-region"],
)
def test_a_bad_cluster_file_is_a_usage_error(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "cluster.json"
    if content is not None:
        path.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "discovery", "drill", "region-hang", "--cluster", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stdout == ""
