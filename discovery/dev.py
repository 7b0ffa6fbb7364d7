"""A whole local cluster in the foreground, like ``consul agent -dev``: per region its own
etcd and N discovery servers, all on 127.0.0.1. For trying and testing, never production.

Every pid reported is the real process (etcd itself, the server's Python), so a signal sent
to it reaches what it names. Stopping ends everything this started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery.etcd_process import EtcdProcess
from discovery.model import validate_region


@dataclass
class ServerProcess:
    region: str
    address: str
    proc: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Region:
    name: str
    etcd: list[EtcdProcess] = field(default_factory=list)
    servers: list[ServerProcess] = field(default_factory=list)


@dataclass
class DevCluster:
    """Start with ``start()``, stop with ``stop()``; ``describe()`` is cluster.json."""

    regions: list[str]
    servers_per_region: int = 1
    etcd_members: int = 1
    base_port: int = 7400
    state_dir: Path | None = None
    keep: bool = False
    running: list[Region] = field(default_factory=list)

    def validate(self) -> None:
        if not self.regions:
            raise ValueError("--regions: at least one region")
        for name in self.regions:
            validate_region(name, "--regions")
        if len(set(self.regions)) != len(self.regions):
            raise ValueError("--regions: a region is named twice")
        if self.etcd_members != 1:
            raise ValueError("--etcd-members: only 1 is supported so far (3-member clusters come with multi-region)")
        if not 1 <= self.servers_per_region <= 16:
            raise ValueError("--servers-per-region: from 1 to 16")

    def start(self, progress: Any = print) -> None:
        self.validate()
        self._own_dir = self.state_dir is None
        self.state_dir = self.state_dir or Path(tempfile.mkdtemp(prefix="discovery-dev-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        port = self.base_port
        for name in self.regions:
            region = Region(name)
            self.running.append(region)
            progress(f"starting etcd for {name}")
            region.etcd.append(EtcdProcess(self.state_dir / name / "etcd-0").start())
            for i in range(self.servers_per_region):
                address = f"127.0.0.1:{port}"
                port += 1
                region.servers.append(self._start_server(name, i, address, region.etcd))
        for region in self.running:
            for server in region.servers:
                progress(f"waiting for {server.region} server at {server.address}")
                self._wait_serving(server)
        (self.state_dir / "cluster.json").write_text(json.dumps(self.describe(), indent=2) + "\n")

    def _start_server(self, region: str, index: int, address: str, etcd: list[EtcdProcess]) -> ServerProcess:
        assert self.state_dir is not None
        log_path = self.state_dir / region / f"server-{index}.log"
        args = [
            sys.executable, "-m", "discovery", "serve",
            "--region", region, "--listen", address, "--etcd", ",".join(m.endpoint for m in etcd),
        ]  # fmt: skip
        with log_path.open("ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        return ServerProcess(region, address, proc, log_path)

    def _wait_serving(self, server: ServerProcess, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if server.proc.poll() is not None:
                    tail = server.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(
                        f"{server.region} server at {server.address} exited with {server.proc.returncode}: "
                        + " | ".join(tail)
                    )
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.region} server at {server.address} not serving after {timeout:g}s")
                time.sleep(0.1)

    def describe(self) -> dict[str, Any]:
        return {
            "regions": {
                r.name: {
                    "servers": [{"address": s.address, "pid": s.proc.pid} for s in r.servers],
                    "etcd": [{"address": m.endpoint, "pid": m.pid} for m in r.etcd],
                }
                for r in self.running
            },
            "state_dir": str(self.state_dir),
        }

    def table(self) -> str:
        rows = [("REGION", "ROLE", "ADDRESS", "PID")]
        for r in self.running:
            rows += [(r.name, "server", s.address, str(s.proc.pid)) for s in r.servers]
            rows += [(r.name, "etcd", m.endpoint, str(m.pid)) for m in r.etcd]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)

    def dead(self) -> list[str]:
        """Servers that exited although nobody asked them to."""
        return [
            f"{s.region} server {s.address} (exit {s.proc.returncode})"
            for r in self.running
            for s in r.servers
            if s.proc.poll() is not None
        ]

    def stop(self) -> None:
        """Servers first (SIGTERM, they drain), then etcd; then the state dir unless kept."""
        for region in self.running:
            for server in region.servers:
                _terminate(server.proc)
        for region in self.running:
            for server in region.servers:
                _reap(server.proc)
            for member in region.etcd:
                member.stop()
        self.running.clear()
        if self.state_dir is not None and getattr(self, "_own_dir", False) and not self.keep:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)  # a drill may have paused it
        proc.terminate()


def _reap(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
