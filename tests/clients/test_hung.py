"""A hung server (SIGSTOPped: it accepts TCP and never answers) is left for the next one
within about the Watch idle timeout, found by keep-alive and the idle check, not by luck."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from discovery.devtools.process import ServerProcess, free_port
from tests.support.clients import config
from tests.support.helpers import eventually, register

RUNNER = Path(__file__).resolve().parents[2] / "bench" / "_servers.py"


@pytest.fixture
def server_process(etcd, key_prefix: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A discovery server in a process of its own (so it can be stopped), on the test's etcd and prefix."""
    address = f"127.0.0.1:{free_port()}"
    args = ["discovery", "--listen", address, "--etcd", etcd.endpoint, "--region", "us-east", "--prefix", key_prefix]
    server = ServerProcess([sys.executable, str(RUNNER), *args], address, tmp_path / "server.log")
    server.start(30)
    yield server
    server.stop(10)  # SIGCONT first: the test leaves it stopped


async def test_hung_server_is_left_for_the_next(etcd, servers, connect, make_client, server_process) -> None:
    good = await servers.start(etcd)
    stubs = connect(good)
    await register(stubs, "web", "10.0.0.1:80")
    hung = server_process.address
    client = make_client(config([hung, good]))

    async def from_hung() -> bool:
        r = await client.resolve("web")
        return r.source == hung and len(r) == 1

    await eventually(from_hung)

    server_process.send(signal.SIGSTOP)
    await register(stubs, "web", "10.0.0.2:80")

    async def moved() -> bool:
        r = await client.resolve("web")
        return r.source == good.address and len(r) == 2

    await eventually(moved, timeout=10)  # idle timeout 2 s, keep-alive 1 s: a few seconds
