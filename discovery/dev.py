"""A whole local cluster in the foreground, like ``consul agent -dev``: per region its own
etcd (1 or 3 members) and N discovery servers, all on 127.0.0.1, every region peered with
the others in the order given. For trying and testing, never production.

Every pid reported is the real process (etcd itself, the server's Python), so a signal sent
to it reaches what it names: the drills pause regions, kill servers and etcd leaders through
the methods here, or through the pids in ``cluster.json``. Stopping ends everything this
started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery import lifeline
from discovery.devcontrol import ControlServer
from discovery.etcd_process import EtcdCluster, StartAborted, free_ports
from discovery.faultproxy import FaultProxy
from discovery.model import validate_region

DEFAULT_REGIONS = ("us-east", "eu-west", "ap-south")
STATE_FILE = "cluster.json"

# The default reconnect backoff starts at 1 s: a probe that first hits a port not yet
# listening would then see the server up to a second late, on every server.
_PROBE_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]

Progress = Callable[[str], object]
PeerRoute = Callable[[str, str, str], str]  # (from region, to region, server address) -> address to dial


@dataclass
class ServerProcess:
    """One ``discovery serve``; ``args`` are kept so a restart is the same server."""

    region: str
    index: int
    address: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{self.region} server-{self.index} at {self.address}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        if self.running():
            # A second server on the same port would fail, and orphan the first.
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        with self.log_path.open("ab") as log:
            # As etcd (etcd_process): its own session, and it dies with this process.
            self.proc = lifeline.popen(
                self.args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def wait_serving(self, timeout: float, abort: threading.Event | None = None) -> None:
        """Until gRPC health says SERVING; RuntimeError naming the log if it exits or times out."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address, options=_PROBE_OPTIONS) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}: {_tail(self.log_path)} (see {self.log_path})"
                    )
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if abort is not None and abort.is_set():
                    raise StartAborted(f"stopped while waiting for {self.name}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not serving after {timeout:g}s; see {self.log_path}")
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.running():
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Region:
    name: str
    etcd: EtcdCluster
    servers: list[ServerProcess] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def pids(self) -> list[int]:
        """Every running process of the region: servers and etcd members."""
        return [s.pid for s in self.servers if s.running()] + [m.pid for m in self.etcd.members if m.running()]


@dataclass
class DevCluster:
    """A local multi-region cluster. ``start()`` returns once every server serves and
    ``cluster.json`` is written; ``stop()`` ends every process it started (safe to call twice,
    also after a failed or aborted start, and from another thread via ``abort()`` first).

    ``base_port=0`` picks free ports, so clusters can run side by side; otherwise the servers
    take ``base_port``, ``base_port + 1``... in region order. ``server_args`` go to every
    ``discovery serve`` after the generated flags, so they win (e.g. ``("--resume-grace", "2")``).
    ``peer_via(from_region, to_region, address)`` returns the address a server of
    ``from_region`` is told for that server of ``to_region``: a drill puts a fault proxy there.

    ``fault_proxy`` routes every peer connection through a ``FaultProxy`` of this cluster
    (``self.proxy``), unless ``peer_via`` routes them already; ``control`` serves a
    ``ControlServer`` (``self.control_address``, also in cluster.json) through which another
    process injects faults.
    """

    regions: Sequence[str] = DEFAULT_REGIONS
    servers_per_region: int = 1
    etcd_members: int = 1
    base_port: int = 0
    state_dir: Path | None = None
    keep: bool = False
    server_args: tuple[str, ...] = ()
    peer_via: PeerRoute | None = None
    start_timeout: float = 30.0
    fault_proxy: bool = False
    control: bool = False
    running: list[Region] = field(default_factory=list, init=False)
    proxy: FaultProxy | None = field(default=None, init=False)
    control_address: str | None = field(default=None, init=False)
    _control: ControlServer | None = field(default=None, init=False, repr=False)
    _abort: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _created: list[Path] = field(default_factory=list, init=False, repr=False)  # removed by stop()
    _progress_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def validate(self) -> None:
        if not self.regions:
            raise ValueError("--regions: at least one region")
        for name in self.regions:
            validate_region(name, "--regions")
        if len(set(self.regions)) != len(self.regions):
            raise ValueError("--regions: a region is named twice")
        if self.etcd_members not in (1, 3):
            raise ValueError("--etcd-members: 1 or 3")
        if not 1 <= self.servers_per_region <= 16:
            raise ValueError("--servers-per-region: from 1 to 16")
        count = len(self.regions) * self.servers_per_region
        if self.base_port and not 1 <= self.base_port <= 65536 - count:
            raise ValueError(f"--base-port: {count} server ports from {self.base_port} do not fit below 65536")

    # --- start --------------------------------------------------------------------------------

    def start(self, progress: Progress = print) -> DevCluster:
        """Allocate every port, then bring the regions up side by side and wait for all.
        On any failure, or ``abort()`` from another thread, stop what was started and raise
        (``StartAborted`` for an abort). A DevCluster starts once."""
        self.validate()
        if self.running:
            raise RuntimeError("this cluster was started already")
        try:
            if self.fault_proxy:
                self.proxy = FaultProxy()
            self._prepare()  # binds the proxy's routes
            if self.proxy is not None:
                self.proxy.start()
            with ThreadPoolExecutor(len(self.running), thread_name_prefix="dev-region") as pool:
                try:
                    futures = [pool.submit(self._start_region, r, progress) for r in self.running]
                    errors: list[BaseException] = []
                    for future in as_completed(futures):
                        error = future.exception()
                        if error is not None:
                            self._abort.set()  # the other regions stop waiting too
                            errors.append(error)
                except BaseException:
                    self._abort.set()
                    raise
            if errors:
                # A real failure explains more than the aborts it caused elsewhere.
                raise next((e for e in errors if not isinstance(e, StartAborted)), errors[0])
            if self.control:
                self._control = ControlServer(self, self.proxy)
                self.control_address = self._control.start()
            self.write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def abort(self) -> None:
        """Make a ``start()`` running in another thread give up at its next check."""
        self._abort.set()

    def _prepare(self) -> None:
        """State dir, every port and every command line, before any process starts: each
        server's flags name the servers of every other region."""
        self.state_dir = self._make_state_dir()
        per_region = 2 * self.etcd_members
        ports, etcd_ports = self._ports(per_region * len(self.regions))
        addresses = {
            name: [f"127.0.0.1:{ports.pop(0)}" for _ in range(self.servers_per_region)] for name in self.regions
        }
        for i, name in enumerate(self.regions):
            region_dir = self.state_dir / name
            region_dir.mkdir()
            mine = etcd_ports[i * per_region : (i + 1) * per_region]
            self.running.append(Region(name, EtcdCluster(region_dir, self.etcd_members, name="etcd", ports=mine)))
        for region in self.running:
            for i, address in enumerate(addresses[region.name]):
                args = self._server_command(region, address, addresses)
                log_path = self.state_dir / region.name / f"server-{i}.log"
                region.servers.append(ServerProcess(region.name, i, address, args, log_path))

    def _make_state_dir(self) -> Path:
        """The state dir, remembering what this cluster created so ``stop`` removes only that."""
        if self.state_dir is None:
            state_dir = Path(tempfile.mkdtemp(prefix="discovery-dev-"))
            self._created.append(state_dir)
            return state_dir
        state_dir = self.state_dir.resolve()
        if not state_dir.exists():
            state_dir.mkdir(parents=True)
            self._created.append(state_dir)
            return state_dir
        # Members of a kept cluster remember their old peer ports and would not find each
        # other again: an earlier cluster's data is refused rather than half started.
        taken = [n for n in (*self.regions, STATE_FILE) if (state_dir / n).exists()]
        if taken:
            raise RuntimeError(
                f"state dir {state_dir} already holds {', '.join(taken)} from an earlier cluster: "
                "remove them or choose another --state-dir"
            )
        self._created += [state_dir / n for n in (*self.regions, STATE_FILE)]
        return state_dir

    def _ports(self, etcd_count: int) -> tuple[list[int], list[int]]:
        """Server ports and etcd ports, all distinct: chosen in one call, since ports chosen in
        separate calls could repeat."""
        count = len(self.regions) * self.servers_per_region
        if not self.base_port:
            ports = free_ports(count + etcd_count)
            return ports[:count], ports[count:]
        servers = list(range(self.base_port, self.base_port + count))
        for port in servers:
            if not _port_free(port):
                raise RuntimeError(f"port {port} on 127.0.0.1 is in use: choose another --base-port (0: free ports)")
        return servers, free_ports(etcd_count, exclude=servers)

    def _server_command(self, region: Region, address: str, addresses: dict[str, list[str]]) -> list[str]:
        """``discovery serve`` for one server. Every other region is a peer, nearest first in
        the order of ``regions``, so FAILOVER and replication follow that order."""
        route = self.peer_via or (self.proxy.route if self.proxy is not None else lambda _from, _to, peer: peer)
        peers = [
            f"--peer={name}={','.join(route(region.name, name, peer) for peer in addresses[name])}"
            for name in self.regions
            if name != region.name
        ]
        return [
            sys.executable, "-m", "discovery", "serve",
            "--region", region.name,
            "--listen", address,
            "--advertise", address,
            "--etcd", ",".join(region.etcd.endpoints),
            *peers,
            *self.server_args,
        ]  # fmt: skip

    def _start_region(self, region: Region, progress: Progress) -> None:
        """etcd and servers launched together, then waited for: a server's Python start
        (about half a second) overlaps etcd's first election, and a server waits for its
        etcd by itself. etcd is waited for first, so its failure is the one reported."""
        region.etcd.launch()
        for member in region.etcd.members:
            self._report(progress, f"started {region.name} {member.name} pid {member.pid} on {member.endpoint}")
        for server in region.servers:
            server.launch()
            self._report(progress, f"started {region.name} server-{server.index} pid {server.pid} on {server.address}")
        region.etcd.wait_healthy(self.start_timeout, self._abort)
        for server in region.servers:
            server.wait_serving(self.start_timeout, self._abort)

    def _report(self, progress: Progress, line: str) -> None:
        with self._progress_lock:  # regions start in threads: one line at a time
            progress(line)

    # --- what a drill needs -------------------------------------------------------------------

    def region(self, name: str) -> Region:
        for region in self.running:
            if region.name == name:
                return region
        raise KeyError(f"no region {name!r} in this cluster ({', '.join(r.name for r in self.running)})")

    def pause_region(self, name: str, timeout: float = 5.0) -> None:
        """SIGSTOP every process of the region, servers and etcd: a hung region, its sockets
        open and silent. Returns once every thread of them has stopped."""
        pids = self.region(name).pids()
        _signal_all(pids, signal.SIGSTOP)
        _wait_stopped(pids, True, timeout)

    def resume_region(self, name: str, timeout: float = 5.0) -> None:
        """SIGCONT every process of the region; returns once none of their threads is stopped."""
        pids = self.region(name).pids()
        _signal_all(pids, signal.SIGCONT)
        _wait_stopped(pids, False, timeout)

    def kill_server(self, region: str, index: int) -> None:
        """SIGKILL one server (a crash: no drain, no deregistration)."""
        self.region(region).servers[index].kill()

    def restart_server(self, region: str, index: int, timeout: float | None = None) -> int:
        """Start a killed server again, same address and flags; returns its new pid once it
        serves, and rewrites cluster.json."""
        server = self.region(region).servers[index]
        server.launch()
        server.wait_serving(timeout or self.start_timeout)
        self.write_state()
        return server.pid

    def etcd_leader(self, region: str, timeout: float = 10.0) -> int:
        """Index of the region's etcd leader (in ``region(name).etcd.members``); waits through
        an election."""
        return self.region(region).etcd.leader(timeout)

    def kill_etcd_member(self, region: str, index: int) -> None:
        """SIGKILL one etcd member of the region; its data stays for ``restart_etcd_member``."""
        self.region(region).etcd.kill_member(index)

    def restart_etcd_member(self, region: str, index: int, timeout: float | None = None) -> int:
        """Start a killed member again on its ports and data; returns its new pid once healthy,
        and rewrites cluster.json."""
        etcd = self.region(region).etcd
        etcd.restart_member(index, timeout or self.start_timeout)
        self.write_state()
        return etcd.members[index].pid

    # --- reporting ----------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        assert self.state_dir is not None, "the cluster was never started"
        return self.state_dir / STATE_FILE

    def describe(self) -> dict[str, Any]:
        """What cluster.json holds: per region its servers and etcd members, address and pid;
        the control server's address and the fault proxy's routes when they run."""
        described: dict[str, Any] = {
            "regions": {
                r.name: {
                    "servers": [{"address": s.address, "pid": s.pid} for s in r.servers],
                    "etcd": [{"address": m.endpoint, "pid": m.pid} for m in r.etcd.members],
                }
                for r in self.running
            },
            "state_dir": str(self.state_dir),
        }
        if self.control_address is not None:
            described["control"] = self.control_address
        if self.proxy is not None:
            described["routes"] = self.proxy.routes()
        return described

    def write_state(self) -> None:
        # Written aside and renamed, so a reader never sees half a file.
        partial = self.state_file.with_suffix(".json.tmp")
        partial.write_text(json.dumps(self.describe(), indent=2) + "\n")
        partial.replace(self.state_file)

    def table(self) -> str:
        rows = [("REGION", "ROLE", "ADDRESS", "PID", "LOG")]
        for r in self.running:
            rows += [(r.name, "server", s.address, str(s.pid), str(s.log_path)) for s in r.servers]
            rows += [(r.name, "etcd", m.endpoint, str(m.pid), str(m.log_path)) for m in r.etcd.members]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)

    def dead(self) -> list[str]:
        """Processes that exited, whether a drill killed them or they crashed."""
        lines = [
            f"{s.name} exited with {s.proc.returncode}; see {s.log_path}"
            for r in self.running
            for s in r.servers
            if s.proc is not None and s.proc.poll() is not None
        ]
        lines += [
            f"{r.name} {m.name} at {m.endpoint} exited with {m.proc.returncode}; see {m.log_path}"
            for r in self.running
            for m in r.etcd.members
            if m.proc is not None and m.proc.poll() is not None
        ]
        return lines

    # --- stop ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything, in this order:

        1. the control server, so no fault lands while stopping;
        2. SIGCONT to every process, since a drill may have paused a region, and heal every link;
        3. SIGTERM to every server together, and wait for each (they drain; SIGKILL after 15 s);
        4. the fault proxy, once no server uses it;
        5. stop every region's etcd;
        6. remove what this cluster created in the state dir, unless ``keep``.
        """
        control, self._control = self._control, None
        if control is not None:
            control.stop()
        for region in self.running:
            _signal_all(region.pids(), signal.SIGCONT)
        if self.proxy is not None:
            self.proxy.heal()  # draining servers reach their peers as usual
        for region in self.running:
            _signal_all([s.pid for s in region.servers if s.running()], signal.SIGTERM)
        for region in self.running:
            for server in region.servers:
                _reap(server)
        if self.proxy is not None:
            self.proxy.stop()
        for region in self.running:
            region.etcd.stop()
        self.running.clear()
        if not self.keep:
            for path in reversed(self._created):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        self._created.clear()


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        # The process may have exited since it was listed; our unreaped child keeps its pid.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_stopped(pids: list[int], stopped: bool, timeout: float) -> None:
    # A signal reaches a running process's threads at their next return to user space, not
    # within kill(): a drill that acts right after pausing must not find the region still up.
    deadline = time.monotonic() + timeout
    while pending := [pid for pid in pids if _stopped(pid) not in (stopped, None)]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pending} not {'stopped' if stopped else 'resumed'} after {timeout:g}s")
        time.sleep(0.005)


def _stopped(pid: int) -> bool | None:
    """Whether every thread of ``pid`` is stopped by a signal; None when it has exited (or
    there is no /proc to tell), which ends either wait."""
    states: list[str] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            # The name in parentheses may hold spaces: the state follows the last ')'.
            states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
    if not states or any(state in ("Z", "X") for state in states):
        return None
    return all(state == "T" for state in states)


def _reap(server: ServerProcess, timeout: float = 15.0) -> None:
    if server.proc is None:
        return
    try:
        server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the gRPC server binds: connections of a cluster stopped a moment ago linger in
        # TIME_WAIT on the port and must not count as "in use"; a listener still does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"
