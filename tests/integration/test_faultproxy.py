"""The fault proxy with real sockets: an echo server behind its routes, faults set from the test's thread."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from discovery.devtools.faultproxy import FaultProxy, LinkFault

WAIT = 5.0  # seconds: the bound of every wait here


class Echo:
    """An echo server on 127.0.0.1:0 that counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.connected = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.connected.set()
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    server = Echo()
    address = await server.start()
    yield address
    await server.stop()


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    p = FaultProxy()
    yield p
    p.stop()


async def connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = address.rpartition(":")
    async with asyncio.timeout(WAIT):
        return await asyncio.open_connection(host, int(port))


async def exchange(address: str, payload: bytes) -> bytes:
    reader, writer = await connect(address)
    try:
        writer.write(payload)
        async with asyncio.timeout(WAIT):
            return await reader.readexactly(len(payload))
    finally:
        writer.close()


async def set_fault(proxy: FaultProxy, region: str, fault: LinkFault | None, peer: str | None = None) -> None:
    # set_fault blocks until the proxy's loop applied it: off the test's loop.
    await asyncio.to_thread(proxy.set_fault, region, fault, peer)


def test_link_fault_json_round_trip_and_validation() -> None:
    fault = LinkFault(delay_ms=100, jitter_ms=20, loss=0.1)
    assert LinkFault.from_json(fault.to_json()) == fault
    assert LinkFault.from_json({"blackhole": True}) == LinkFault(blackhole=True)
    bad_ones: list[object] = [
        {"loss": 1},
        {"loss": -0.1},
        {"delay_ms": -1},
        {"delay_ms": 10, "jitter_ms": 20},
        {"x": 1},
        [],
    ]
    for bad in bad_ones:
        with pytest.raises(ValueError):
            LinkFault.from_json(bad)


async def test_passes_bytes_both_ways_and_same_route_same_port(proxy: FaultProxy, echo: str) -> None:
    address = proxy.route("a", "b", echo)
    assert proxy.route("a", "b", echo) == address and proxy.route("b", "a", echo) != address
    proxy.start()
    payload = bytes(range(256)) * 4096  # 1 MiB
    assert await exchange(address, payload) == payload

    # A half close passes too: the echo still answers what came before it, then closes.
    reader, writer = await connect(address)
    writer.write(payload)
    writer.write_eof()
    async with asyncio.timeout(WAIT):
        assert await reader.read() == payload
    writer.close()
    assert proxy.routes() == {"a": {"b": [address]}, "b": {"a": [proxy.route("b", "a", echo)]}}


async def test_blackhole_holds_both_ways_then_delivers_in_order(proxy: FaultProxy, echo: str) -> None:
    address = proxy.route("a", "b", echo)
    proxy.start()
    reader, writer = await connect(address)
    writer.write(b"before;")
    async with asyncio.timeout(WAIT):
        assert await reader.readexactly(7) == b"before;"

    await set_fault(proxy, "b", LinkFault(blackhole=True))
    assert proxy.faults() == [
        {"from": "a", "to": "b", "blackhole": True, "delay_ms": 0.0, "jitter_ms": 0.0, "loss": 0.0}
    ]
    for i in range(20):
        writer.write(f"held-{i};".encode())
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await reader.read(1)

    await asyncio.to_thread(proxy.heal)
    expected = "".join(f"held-{i};" for i in range(20)).encode()
    async with asyncio.timeout(WAIT):
        assert await reader.readexactly(len(expected)) == expected
    assert proxy.faults() == []
    writer.close()


async def test_a_connection_opened_during_a_blackhole_connects_upstream_after_heal(proxy: FaultProxy) -> None:
    server = Echo()
    upstream = await server.start()
    try:
        address = proxy.route("a", "b", upstream)
        proxy.start()
        await set_fault(proxy, "a", LinkFault(blackhole=True))
        reader, writer = await connect(address)  # accepted by the proxy...
        writer.write(b"hello")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await server.connected.wait()
        assert server.accepted == 0  # ...but not dialled upstream

        await set_fault(proxy, "a", None)
        async with asyncio.timeout(WAIT):
            await server.connected.wait()
            assert await reader.readexactly(5) == b"hello"
        writer.close()
    finally:
        await server.stop()


async def test_delay_is_at_least_the_delay_and_jitter_keeps_order(proxy: FaultProxy, echo: str) -> None:
    address = proxy.route("a", "b", echo)
    proxy.start()
    reader, writer = await connect(address)
    await set_fault(proxy, "a", LinkFault(delay_ms=100))
    started = time.monotonic()
    writer.write(b"x")
    async with asyncio.timeout(WAIT):
        assert await reader.readexactly(1) == b"x"
    assert time.monotonic() - started >= 0.2, "100 ms each way"

    await set_fault(proxy, "a", LinkFault(delay_ms=30, jitter_ms=30))
    expected = await _write_apart(writer, 40)
    async with asyncio.timeout(WAIT):
        assert await reader.readexactly(len(expected)) == expected
    writer.close()


async def test_a_partition_lifted_into_a_delay_releases_what_it_held_together(proxy: FaultProxy, echo: str) -> None:
    """Chunks held by a partition are delayed once from its end, not one delay after another."""
    address = proxy.route("a", "b", echo)
    proxy.start()
    reader, writer = await connect(address)
    await set_fault(proxy, "a", LinkFault(blackhole=True))
    expected = await _write_apart(writer, 40)
    await set_fault(proxy, "a", LinkFault(delay_ms=100))
    started = time.monotonic()
    async with asyncio.timeout(WAIT):
        assert await reader.readexactly(len(expected)) == expected
    # Out and back: about two delays (0.2 s), where one per chunk would take over 4 s.
    assert time.monotonic() - started < 2.0
    writer.close()


async def _write_apart(writer: asyncio.StreamWriter, count: int) -> bytes:
    """``count`` numbered chunks, each its own read at the proxy (written a moment apart)."""
    sent = b""
    for i in range(count):
        chunk = f"<{i}>".encode()
        writer.write(chunk)
        await writer.drain()
        sent += chunk
        await asyncio.sleep(0.005)  # pacing, not synchronisation: separate chunks for the proxy
    return sent


async def test_loss_holds_some_chunks_a_retransmission_timeout_and_keeps_order(proxy: FaultProxy, echo: str) -> None:
    address = proxy.route("a", "b", echo)
    proxy.start()
    reader, writer = await connect(address)
    await set_fault(proxy, "b", LinkFault(loss=0.3))
    gaps: list[float] = []
    for i in range(14):
        started = time.monotonic()
        chunk = f"<{i}>".encode()
        writer.write(chunk)
        async with asyncio.timeout(WAIT):
            assert await reader.readexactly(len(chunk)) == chunk
        gaps.append(time.monotonic() - started)
    lost = [gap for gap in gaps if gap >= 0.2]
    # A round trip loses a chunk with probability 1 - 0.7 * 0.7: all 14 or none is below 1e-4.
    assert 0 < len(lost) < 14, gaps
    assert max(gaps) < 0.2 * 2 + 0.6, "at most one retransmission each way"

    expected = await _write_apart(writer, 40)
    async with asyncio.timeout(WAIT):
        assert await reader.readexactly(len(expected)) == expected
    writer.close()


async def test_a_peer_fault_affects_only_that_pair(proxy: FaultProxy, echo: str) -> None:
    ab, ac, cb = proxy.route("a", "b", echo), proxy.route("a", "c", echo), proxy.route("c", "b", echo)
    proxy.start()
    await set_fault(proxy, "a", LinkFault(blackhole=True), peer="b")
    assert await exchange(ac, b"ac") == b"ac" and await exchange(cb, b"cb") == b"cb"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(exchange(ab, b"ab"), 0.5)
    with pytest.raises(KeyError):
        proxy.set_fault("a", None, peer="nowhere")
    await set_fault(proxy, "b", None, peer="a")
    assert await exchange(ab, b"ab") == b"ab"


async def test_a_fault_set_before_start_applies_and_stop_closes_everything(echo: str) -> None:
    proxy = FaultProxy()
    address = proxy.route("a", "b", echo)
    proxy.set_fault("a", LinkFault(blackhole=True))
    proxy.start()
    try:
        held_reader, held_writer = await connect(address)
        await set_fault(proxy, "a", None)
        reader, writer = await connect(address)
        writer.write(b"up")
        async with asyncio.timeout(WAIT):
            assert await reader.readexactly(2) == b"up"
    finally:
        await asyncio.to_thread(proxy.stop)
    async with asyncio.timeout(WAIT):
        assert await reader.read() == b"" and await held_reader.read() == b"", "closed by stop()"
    with pytest.raises(OSError):
        await connect(address)
    for w in (writer, held_writer):
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
    await asyncio.to_thread(proxy.stop)  # twice is fine
