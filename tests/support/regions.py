"""Several regions in one test process: each region its own etcd and servers, peered with
every other region (proximity in the order the regions are named)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from discovery.devtools.etcd import EtcdProcess
from discovery.devtools.process import free_port
from discovery.server import Server
from tests.support.servers import Servers

# Fast enough for tests, and still above a lease's TTL granularity.
FAST = {
    "stale_after_seconds": 1.5,
    "replication_heartbeat_seconds": 0.25,
    "resume_grace_seconds": 2.0,
    "election_ttl_seconds": 2,
}


class Regions:
    """``await regions.start({"a": etcd_a, "b": etcd_b}, servers=1)``; then ``regions["a"]``
    is region a's list of servers. Ports are chosen before any server starts, so every
    server can be told its peers' addresses."""

    def __init__(self, servers: Servers) -> None:
        self._servers = servers
        self.ports: dict[str, list[int]] = {}
        self.etcd: dict[str, EtcdProcess] = {}
        self.overrides: dict[str, Any] = {}
        self.per_region: Callable[[str], dict[str, Any]] = lambda _region: {}
        self.by_region: dict[str, list[Server]] = {}

    def __getitem__(self, region: str) -> list[Server]:
        return self.by_region[region]

    async def start(
        self,
        etcds: dict[str, EtcdProcess],
        servers: int = 1,
        per_region: Callable[[str], dict[str, Any]] | None = None,
        **overrides: Any,
    ) -> Regions:
        """``per_region(name)`` gives settings of one region's servers (their certificates)."""
        self.etcd = dict(etcds)
        self.overrides = {**FAST, **overrides}
        if per_region is not None:
            self.per_region = per_region
        self.ports = {name: [free_port() for _ in range(servers)] for name in etcds}
        for name in etcds:
            for index in range(servers):
                await self.start_server(name, index)
        return self

    def peers(self, region: str) -> tuple[str, ...]:
        return tuple(
            f"{other}=" + ",".join(f"127.0.0.1:{p}" for p in ports)
            for other, ports in self.ports.items()
            if other != region
        )

    async def start_server(self, region: str, index: int, **overrides: Any) -> Server:
        server = await self._servers.start(
            self.etcd[region],
            region=region,
            listen=f"127.0.0.1:{self.ports[region][index]}",
            peers=self.peers(region),
            **{**self.overrides, **self.per_region(region), **overrides},
        )
        running = self.by_region.setdefault(region, [])
        running[:] = [s for s in running if s.port != server.port] + [server]
        return server

    async def stop_server(self, server: Server) -> None:
        await self._servers.stop(server)
        for running in self.by_region.values():
            if server in running:
                running.remove(server)

    def leader(self, region: str, origin: str) -> Server | None:
        for server in self.by_region.get(region, []):
            election = server.elections.get(origin)
            if election is not None and election.leading:
                return server
        return None


def names(servers: Sequence[Server]) -> list[str]:
    return [s.address for s in servers]
