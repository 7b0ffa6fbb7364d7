"""Fixtures: a real etcd (shared, with a key prefix per test; or private, for faults) and
real servers on 127.0.0.1:0."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest

from discovery.devtools.etcd import EtcdNotFound, EtcdProcess, find_etcd
from discovery.server import Server
from tests.support.regions import Regions
from tests.support.servers import Servers, Stubs

# Most of the suite is not about transport security, and its servers listen in plaintext:
# the client library, the CLI and their subprocesses then need the explicit insecure switch.
# Tests of TLS pass a TlsConfig of their own, or clear this with monkeypatch.
os.environ["DISCOVERY_INSECURE"] = "1"

_prefixes = itertools.count()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for tests of the HTTP door."""
    async with aiohttp.ClientSession() as s:
        yield s


def _require_etcd() -> None:
    try:
        find_etcd()
    except EtcdNotFound as exc:
        pytest.exit(f"these tests need a real etcd: {exc}", returncode=3)


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """One etcd for the session; tests stay apart by key prefix."""
    _require_etcd()
    member = EtcdProcess(tmp_path_factory.mktemp("etcd-shared") / "data").start()
    yield member
    member.stop()


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    """An etcd of this test's own, to stop, hang or compact."""
    _require_etcd()
    member = EtcdProcess(tmp_path / "etcd").start()
    yield member
    member.stop()


@pytest.fixture(scope="module")
def region_etcds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, EtcdProcess]]:
    """One etcd per region ("a", "b", "c") for a test module; tests stay apart by key prefix."""
    _require_etcd()
    base = tmp_path_factory.mktemp("regions")
    members = {name: EtcdProcess(base / name).start() for name in ("a", "b", "c")}
    yield members
    for member in members.values():
        member.stop()


@pytest.fixture
def key_prefix() -> str:
    return f"/t{next(_prefixes)}-{id(object())}/discovery/v1/"


@pytest.fixture
async def servers(key_prefix: str) -> AsyncIterator[Servers]:
    s = Servers(key_prefix)
    yield s
    for server in list(s.running):
        await server.stop()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[Server], Stubs]]:
    channels: list[grpc.aio.Channel] = []

    def _connect(server: Server) -> Stubs:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return Stubs(channel)

    yield _connect
    for channel in channels:
        await channel.close()


@pytest.fixture
async def regions(servers: Servers) -> AsyncIterator[Regions]:
    """Several regions in this process, peered (tests/support/regions.py)."""
    yield Regions(servers)
