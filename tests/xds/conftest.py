"""Fixtures for xDS: real backends on 127.0.0.1 that answer with their name, and stock gRPC
clients (tests/xds/stock_client.py) in subprocesses, each with its own bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from discovery.devtools.etcd import EtcdProcess
from discovery.server import Server
from discovery.xds import bootstrap
from tests.support.helpers import until_progress
from tests.support.servers import Servers

CLIENT_SCRIPT = Path(__file__).with_name("stock_client.py")


class Backend:
    """A gRPC server whose every method answers with its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((_Answer(name.encode()),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class _Answer(grpc.GenericRpcHandler):
    def __init__(self, name: bytes) -> None:
        self._handler = grpc.unary_unary_rpc_method_handler(self._who)
        self._name = name

    async def _who(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._name

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._handler


class Backends:
    def __init__(self) -> None:
        self.running: list[Backend] = []

    async def start(self, *names: str) -> list[Backend]:
        started = []
        for name in names:
            backend = Backend(name)
            await backend.server.start()
            self.running.append(backend)
            started.append(backend)
        return started

    async def stop(self, backend: Backend) -> None:
        await backend.server.stop(0)
        self.running.remove(backend)


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    b = Backends()
    yield b
    for backend in list(b.running):
        await b.stop(backend)


class StockClient:
    """A stock client subprocess; ``lines`` holds what it printed, one dict per call."""

    def __init__(self, process: asyncio.subprocess.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr
        self.lines: list[dict[str, Any]] = []
        self._progress = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            async for raw in self.process.stdout:
                self.lines.append(json.loads(raw))
                self._progress.set()
        finally:
            self._progress.set()

    def mark(self) -> int:
        return len(self.lines)

    def answers(self, since: int = 0) -> list[str]:
        return [line["ok"] for line in self.lines[since:] if "ok" in line]

    def errors(self, since: int = 0) -> list[dict[str, Any]]:
        return [line for line in self.lines[since:] if "error" in line]

    async def until(self, predicate: Callable[[StockClient], object], timeout: float = 10.0) -> float:
        """Wait until ``predicate(self)`` holds; returns the seconds it took."""

        def ended() -> str | None:
            return "the client exited" if self._task.done() else None

        return await until_progress(lambda: predicate(self), self._progress, ended, self.summary, timeout)

    async def next_answers(self, count: int, timeout: float = 10.0) -> list[str]:
        mark = self.mark()
        await self.until(lambda c: len(c.answers(mark)) >= count, timeout)
        return self.answers(mark)[:count]

    def summary(self) -> str:
        tail = self.lines[-5:]
        counts = Counter(self.answers(max(0, len(self.lines) - 50)))
        err = self.stderr.read_text()[-1500:] if self.stderr.exists() else ""
        return f"{len(self.lines)} lines, last 50 answers {dict(counts)}, tail {tail}, stderr: {err}"

    async def close(self) -> None:
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                async with asyncio.timeout(5):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class StockClients:
    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self.running: list[StockClient] = []

    async def start(
        self, server: str, service: str, region: str = "", node_id: str = "test-client", config: str = ""
    ) -> StockClient:
        """A client of ``service`` whose bootstrap points at ``server`` (or is ``config``)."""
        index = len(self.running)
        path = self._dir / f"bootstrap-{index}.json"
        path.write_text(config or json.dumps(bootstrap(server, region=region, node_id=node_id)))
        stderr = self._dir / f"client-{index}.stderr"
        env = {"GRPC_VERBOSITY": "ERROR", **os.environ, "GRPC_XDS_BOOTSTRAP": str(path)}
        env.pop("GRPC_XDS_BOOTSTRAP_CONFIG", None)
        with stderr.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(CLIENT_SCRIPT),
                f"xds:///{service}",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
            )
        client = StockClient(process, stderr)
        self.running.append(client)
        return client


@pytest.fixture
async def stock_clients(tmp_path: Path) -> AsyncIterator[StockClients]:
    clients = StockClients(tmp_path)
    yield clients
    for client in clients.running:
        await client.close()


@pytest.fixture
async def server(etcd: EtcdProcess, servers: Servers) -> Server:
    """One region's server on the shared etcd."""
    return await servers.start(etcd)
