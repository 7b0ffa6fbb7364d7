"""Servers in the test process on 127.0.0.1:0 (``Servers``, one test's, stopped at teardown),
and the stubs of one server (``Stubs``)."""

from __future__ import annotations

from typing import Any

import grpc.aio

from discovery.config import ServerConfig
from discovery.devtools.etcd import EtcdProcess
from discovery.server import Server
from discovery_pb.v1 import admin_pb2_grpc, lookup_pb2_grpc, registry_pb2_grpc


class Servers:
    """Starts servers for one test and stops them all at teardown."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.running: list[Server] = []

    async def start(self, etcd: EtcdProcess, region: str = "us-east", **overrides: Any) -> Server:
        settings: dict[str, Any] = {
            "region": region,
            "listen": "127.0.0.1:0",
            "etcd": (etcd.endpoint,),
            "key_prefix": self.prefix,
            "grace_seconds": 1.0,
            "etcd_timeout_seconds": 2.0,
            "watch_keepalive_seconds": 0.5,
            "insecure": True,  # tests about security pass TLS settings (tests/support/secure.py)
        }
        config = ServerConfig(**{**settings, **overrides}).validate()  # overrides win, defaults too
        server = Server(config, startup_timeout=10)
        await server.__aenter__()
        self.running.append(server)
        return server

    async def stop(self, server: Server) -> None:
        await server.stop()
        self.running.remove(server)


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.registry = registry_pb2_grpc.RegistryStub(channel)
        self.lookup = lookup_pb2_grpc.LookupStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)
