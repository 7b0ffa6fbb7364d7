"""A hung server (SIGSTOPped: it accepts TCP and never answers) is left for the next one
within about the Watch idle timeout, found by keep-alive and the idle check, not by luck."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients.conftest import config
from tests.helpers import eventually, register

RUNNER = Path(__file__).resolve().parents[2] / "bench" / "_servers.py"


@pytest.fixture
def server_process(etcd, key_prefix: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A discovery server in a process of its own (so it can be stopped), on the test's etcd and prefix."""
    args = ["discovery", "--etcd", etcd.endpoint, "--region", "us-east", "--prefix", key_prefix]
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(RUNNER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else b""
        assert line, (tmp_path / "server.log").read_text()[-2000:]
        yield proc, int(json.loads(line)["port"])
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.stdin.close()
        proc.stdout.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_hung_server_is_left_for_the_next(etcd, servers, connect, make_client, server_process) -> None:
    proc, port = server_process
    good = await servers.start(etcd)
    stubs = connect(good)
    await register(stubs, "web", "10.0.0.1:80")
    hung = f"127.0.0.1:{port}"
    client = make_client(config([hung, good]))

    async def from_hung() -> bool:
        r = await client.resolve("web")
        return r.source == hung and len(r) == 1

    await eventually(from_hung)

    proc.send_signal(signal.SIGSTOP)
    await register(stubs, "web", "10.0.0.2:80")

    async def moved() -> bool:
        r = await client.resolve("web")
        return r.source == good.address and len(r) == 2

    await eventually(moved, timeout=10)  # idle timeout 2 s, keep-alive 1 s: a few seconds
