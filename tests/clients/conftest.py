"""Fixtures for the client library's tests: clients configured for fast failure detection
against the real servers of tests/conftest.py (configs: tests/support/clients.py), closed at teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from discovery_client import ClientConfig, DiscoveryClient


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[[ClientConfig], DiscoveryClient]]:
    made: list[DiscoveryClient] = []

    def _make(cfg: ClientConfig) -> DiscoveryClient:
        client = DiscoveryClient(cfg)
        made.append(client)
        return client

    yield _make
    for client in made:
        await client.close()
