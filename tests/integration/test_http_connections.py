"""What one HTTP client may hold of a server (docs/http.md, "Limits"): an idle keep-alive
connection is closed, each listener holds a bounded number of connections and answers one
more 503, and an event stream waiting for a future revision counts as a stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from discovery.devtools.etcd import EtcdProcess
from discovery.http import door
from tests.support.helpers import eventually, register
from tests.support.http import HTTP, base, get_json
from tests.support.secure import ADMIN, Pki
from tests.support.servers import Servers

pytestmark = pytest.mark.slow


class Raw:
    """One plain HTTP/1.1 connection, kept open between requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None = None) -> Raw:
        async with asyncio.timeout(5):
            return cls(*await asyncio.open_connection("127.0.0.1", port, ssl=tls))

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        return await self.response()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(5):
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(lines[0].split()[1]), headers, body

    async def closed_by_server(self, within: float) -> bool:
        async with asyncio.timeout(within):
            return await self.reader.read() == b""

    def close(self) -> None:
        self.writer.close()


async def test_an_idle_keep_alive_connection_is_closed(
    servers: Servers, etcd: EtcdProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert door.KEEPALIVE_SECONDS <= 60  # aiohttp's own default is 3630 s
    monkeypatch.setattr(door, "KEEPALIVE_SECONDS", 0.5)  # the same wiring, a shorter wait
    server = await servers.start(etcd, **HTTP)
    assert server.http is not None
    for port in (server.http.port, server.http.metrics_port):
        conn = await Raw.open(port)
        try:
            status, headers, _ = await conn.get("/healthz")
            assert status == 200 and headers.get("connection", "").lower() != "close"
            assert (await conn.get("/healthz"))[0] == 200  # kept alive between requests
            assert await conn.closed_by_server(within=5), port  # then closed once idle
        finally:
            conn.close()


async def _full(port: int, held: list[Raw], tls: ssl.SSLContext | None = None) -> None:
    """One connection over the cap is answered 503 and closed; the listener still serves."""
    extra = await Raw.open(port, tls)
    try:
        status, headers, body = await extra.get("/healthz")
        assert status == 503, body
        assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
        answer = json.loads(body)
        assert answer["error"] == "resource_exhausted" and "limit" in answer["message"], answer
        assert await extra.closed_by_server(within=5)
    finally:
        extra.close()
    for conn in held:  # the ones it holds are served as before
        assert (await conn.get("/healthz"))[0] == 200


async def test_each_listener_holds_a_bounded_number_of_connections(
    servers: Servers, etcd: EtcdProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(door, "METRICS_MAX_CONNECTIONS", 3)
    monkeypatch.setattr(door, "MAX_CONNECTIONS", 2)  # beyond http_max_streams
    server = await servers.start(etcd, **HTTP, http_max_streams=1)
    assert server.http is not None
    for port, cap in ((server.http.metrics_port, 3), (server.http.port, 3)):
        held = [await Raw.open(port) for _ in range(cap)]
        try:
            for conn in held:
                assert (await conn.get("/healthz"))[0] == 200
            await _full(port, held)
            held.pop().close()

            async def admitted(port: int = port) -> bool:
                conn = await Raw.open(port)
                try:
                    return (await conn.get("/healthz"))[0] == 200
                finally:
                    conn.close()

            await eventually(admitted, timeout=5)  # a freed place is taken again
        finally:
            for conn in held:
                conn.close()
    # Each refusal counted for /metrics, by listener (the 503 above, and any of admitted()'s
    # tries that came before the freed place was).
    refused = server.http.refused()
    assert refused.keys() == {"metrics_listen", "http_listen"} and min(refused.values()) >= 1, refused
    conn = await Raw.open(server.http.metrics_port)
    try:
        status, _, body = await conn.get("/metrics")
    finally:
        conn.close()
    assert status == 200
    for listener, n in refused.items():
        line = f'discovery_http_connections_refused_total{{listener="{listener}"}} {float(n)}'
        assert line in body.decode().splitlines(), line


async def test_the_https_listener_answers_over_its_cap_after_the_handshake(
    servers: Servers, etcd: EtcdProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(door, "MAX_CONNECTIONS", 1)
    pki = Pki(tmp_path)
    server = await servers.start(etcd, http_listen="127.0.0.1:0", http_max_streams=1, **pki.settings("us-east"))
    assert server.http is not None and server.http.scheme == "https"
    issued = pki.client(ADMIN)
    assert issued.cert_path and issued.key_path
    tls = ssl.create_default_context(cafile=str(pki.ca_path))
    tls.load_cert_chain(issued.cert_path, issued.key_path)
    held = [await Raw.open(server.http.port, tls) for _ in range(2)]
    try:
        for conn in held:
            assert (await conn.get("/healthz"))[0] == 200
        await _full(server.http.port, held, tls)
    finally:
        for conn in held:
            conn.close()


async def test_an_event_stream_waiting_for_a_future_revision_counts_against_the_limit(
    servers: Servers, etcd: EtcdProcess, connect: Any, session: aiohttp.ClientSession
) -> None:
    server = await servers.start(etcd, **HTTP, http_max_streams=1, max_wait_seconds=3.0)
    assert server.http is not None
    reply = await register(connect(server), "web", "10.0.0.1:80")
    url = f"{base(server)}/v1/events"
    future = reply.revision + 1_000_000
    waiting = asyncio.create_task(get_json(session, f"{url}?since={future}"))
    try:

        async def counted() -> bool:
            return server.http is not None and len(server.http.events) == 1

        await eventually(counted, timeout=5)
        status, body, response = await get_json(session, url)
        assert status == 429 and body["limit"] == "http_max_streams", body
        assert response.headers["Retry-After"] == "1"
        async with asyncio.timeout(10):
            status, body, _ = await waiting  # the wait ends within max_wait_seconds ...
        assert status == 504 and body["error"] == "revision_not_reached", body
        assert len(server.http.events) == 0  # ... and gives its place back
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=10)) as stream:
            assert stream.status == 200 and stream.content_type == "text/event-stream"
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting


async def test_headers_that_come_too_slowly_close_the_connection(
    servers: Servers, etcd: EtcdProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends a header now and then (slowloris) does not hold a connection: its
    request's headers must be complete within HEADERS_SECONDS of their first byte."""
    assert door.HEADERS_SECONDS <= 30
    monkeypatch.setattr(door, "HEADERS_SECONDS", 0.5)  # the same wiring, a shorter wait
    server = await servers.start(etcd, **HTTP)
    assert server.http is not None
    for port in (server.http.port, server.http.metrics_port):
        # A request whose headers come in pieces, well within the deadline, is answered...
        conn = await Raw.open(port)
        try:
            for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: 127.0.0.1\r", b"\n\r", b"\n"):
                conn.writer.write(piece)
                await conn.writer.drain()
                await asyncio.sleep(0.05)  # apart, so they arrive as separate reads
            assert (await conn.response())[0] == 200
            assert (await conn.get("/healthz"))[0] == 200  # and the next request on it too
        finally:
            conn.close()
        # ... and a drip is closed, long before a well-behaved header would have finished.
        drip = await Raw.open(port)
        try:
            drip.writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")

            async def trickle(drip: Raw = drip) -> None:
                for i in range(50):
                    drip.writer.write(f"X-Slow-{i}: 1\r\n".encode())
                    await drip.writer.drain()
                    await asyncio.sleep(0.1)  # the attack's own pace, not synchronisation

            trickling = asyncio.create_task(trickle())
            try:
                assert await drip.closed_by_server(within=4), port
            finally:
                trickling.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await trickling
        finally:
            drip.close()
    assert server.http.slow() == {"http_listen": 1, "metrics_listen": 1}


async def test_refusals_waiting_for_their_close_are_bounded(
    servers: Servers, etcd: EtcdProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past REFUSING refused connections still open, a new one is dropped without its 503:
    a flood over the cap does not hold a file descriptor per connection for a second."""
    monkeypatch.setattr(door, "METRICS_MAX_CONNECTIONS", 1)
    monkeypatch.setattr(door, "REFUSING", 1)
    server = await servers.start(etcd, **HTTP)
    assert server.http is not None
    port = server.http.metrics_port
    held = await Raw.open(port)
    answered = await Raw.open(port)  # refused with its 503, closed a second later
    dropped = await Raw.open(port)  # refused while the first refusal is pending: no answer
    try:
        assert (await held.get("/healthz"))[0] == 200
        async with asyncio.timeout(5):
            head = await answered.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), head
        with contextlib.suppress(ConnectionError):
            assert await dropped.closed_by_server(within=5)  # EOF or a reset, never a 503
    finally:
        for conn in (held, answered, dropped):
            conn.close()
    assert server.http.refused()["metrics_listen"] == 2
