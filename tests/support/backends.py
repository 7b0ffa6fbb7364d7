"""Real backends on 127.0.0.1 for health-check tests: a TCP listener, an HTTP server (asyncio,
answering a fixed status, or accepting and never answering), a gRPC server with the standard
health service. Each can be stopped and started again on the same port."""

from __future__ import annotations

import asyncio
import contextlib

import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class TcpBackend:
    """Accepts connections (and, with ``http_status``, answers one HTTP request; with
    ``hang``, never answers)."""

    def __init__(self, *, http_status: int = 0, hang: bool = False) -> None:
        self.http_status = http_status
        self.hang = hang
        self.port = 0
        self._server: asyncio.Server | None = None
        self._held: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> TcpBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.add(writer)  # closed here, or by stop(): none is left to the garbage collector
        if self.hang:
            return
        try:
            if self.http_status:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    writer.write(
                        f"HTTP/1.1 {self.http_status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
                    )
                    await writer.drain()
        finally:
            writer.close()
            self._held.discard(writer)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._held:
                writer.close()
            self._held.clear()
            await self._server.wait_closed()
            self._server = None


class GrpcBackend:
    def __init__(self) -> None:
        self.port = 0
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> GrpcBackend:
        self._server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self

    async def set(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(service, status)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
