"""The one launcher of gRPC server processes for ``discovery dev``, the tests and the benches:
``ServerProcess`` starts a command (``python -m discovery serve ...``, ``bench/_servers.py``)
with its output in a log file, tied to this process by ``lifeline`` (it never outlives us),
waits until gRPC health says SERVING (on its address, or on the plaintext health listener of a
server that serves mTLS), and stops it with SIGTERM, then SIGKILL.

Also the free ports every local process is started on, and ``StartAborted``.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery.devtools import lifeline

# The default reconnect backoff starts at 1 s: a probe that first hits a port not yet
# listening would then see the server up to a second late, on every server.
_PROBE_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


class StartAborted(RuntimeError):
    """Raised by a wait when the caller's ``abort`` event is set (Ctrl-C during startup)."""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int, exclude: Collection[int] = ()) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1, none of them in ``exclude``. The sockets
    are held until all are chosen, so no port is handed out twice within a call.

    Chosen below the kernel's ephemeral range, not by binding port 0: a port from that range,
    released until etcd or a server binds it, can meanwhile become the local port of any
    outgoing connection on the machine, and the start fails with "address already in use"
    (seen as etcd exiting with 1 at startup, a few times in a hundred suite runs)."""
    low, high = _ports_below_ephemeral()
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(100 * count + 1000):
            if len(ports) == count:
                return ports
            port = random.randrange(low, high)
            if port in exclude or port in ports:
                continue
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or lingering in TIME_WAIT): another one
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports on 127.0.0.1 between {low} and {high}")


def _ports_below_ephemeral() -> tuple[int, int]:
    try:
        first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768  # Linux's default start
    # Above the well-known and the common fixed ports (7400 for `discovery dev`, 2379 for etcd).
    low = 10_000 if first > 15_000 else 1024
    return low, max(low + 1000, first)


class ServerProcess:
    """One server process listening on ``address`` and serving gRPC health; ``args`` (the
    whole command line) are kept, so a restart is the same server on the same address.

    ``health_address``: where ``wait_serving`` asks gRPC health, when not ``address``. A server
    that requires client certificates refuses a probe without one in the handshake, so its
    plaintext health listener (``discovery serve --health-listen``) is asked instead: the probe
    needs no credentials, and sees the same status the TLS port serves.

    ``start`` = ``launch`` + ``wait_serving`` (stopping it if that fails); ``stop`` =
    ``terminate`` (SIGCONT, SIGTERM) + ``reap`` (wait, then SIGKILL). ``launch`` again after
    it exited (or was killed) restarts it, appending to the same log.
    """

    def __init__(
        self,
        args: Sequence[str],
        address: str,
        log_path: Path,
        name: str | None = None,
        health_address: str | None = None,
    ) -> None:
        self.args = list(args)
        self.address = address
        self.health_address = health_address
        self.log_path = log_path
        self.name = name or f"server at {address}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"ServerProcess({self.name!r}, pid={self.proc.pid if self.proc else None})"

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs (or was never started)."""
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0, abort: threading.Event | None = None) -> ServerProcess:
        """Launch, and return once it serves; on failure it is stopped and the error raised."""
        self.launch()
        try:
            self.wait_serving(timeout, abort)
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> None:
        """Start the process without waiting for it to serve."""
        if self.running():
            # A second server on the same port would fail, and orphan the first.
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # Its own session: Ctrl-C or a closed terminal reaches only our process, which stops
            # it in order; lifeline: it dies with our process all the same, however that dies.
            self.proc = lifeline.popen(
                self.args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def wait_serving(self, timeout: float, abort: threading.Event | None = None) -> None:
        """Until gRPC health says SERVING; RuntimeError naming the log if it exits or times
        out, ``StartAborted`` once ``abort`` is set."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.health_address or self.address, options=_PROBE_OPTIONS) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}: {tail(self.log_path)} (see {self.log_path})"
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

    def send(self, sig: signal.Signals) -> None:
        """A signal to the process if it runs (SIGSTOP: a hung server)."""
        if self.proc is not None and self.running():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGCONT (a paused process acts on nothing else), then SIGTERM; does not wait."""
        self.send(signal.SIGCONT)
        self.send(signal.SIGTERM)

    def reap(self, timeout: float = 15.0, kill_timeout: float = 5.0) -> None:
        """Up to ``timeout`` for it to exit (a server drains), then SIGKILL."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(kill_timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Safe twice, and if it never started."""
        self.terminate()
        self.reap(timeout)

    def kill(self) -> None:
        """SIGKILL (a crash: no drain) and wait for it."""
        if self.proc is not None and self.running():
            self.proc.kill()
            self.proc.wait(10)


def tail(path: Path, lines: int = 3) -> str:
    """The last lines of a log, on one line."""
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"
