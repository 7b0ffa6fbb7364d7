"""A userspace TCP proxy between regions that can partition, delay or "lose" traffic.

Drills need network faults between regions, and ``tc netem`` needs root and a kernel module
that is often missing. Instead every server dials its peers through a route of this proxy
(one listening port per peer server and dialling region), and the proxy applies the fault of
the pair of regions to every byte it forwards, on connections old and new.

It models what TCP shows the application, not packets: a partition holds the bytes (TCP
would retransmit them) and delivers them in order once healed; loss is a retransmission
timeout added to a chunk (and, to keep order, to what follows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger("discovery.faultproxy")

RETRANSMIT_S = 0.2  # Linux's minimum TCP retransmission timeout: what a lost segment costs
BUFFER_LIMIT = 16 * 1024 * 1024  # held bytes per direction before the proxy stops reading
CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
_CALL_TIMEOUT_S = 10.0  # for a thread waiting on the proxy's loop

T = TypeVar("T")
Link = tuple[str, str]  # (dialling region, dialled region)


@dataclass(frozen=True)
class LinkFault:
    """The fault of a link between two regions, applied to both directions."""

    blackhole: bool = False  # a partition: nothing passes either way
    delay_ms: float = 0.0  # added one-way latency per chunk
    jitter_ms: float = 0.0  # uniform +- around delay_ms
    loss: float = 0.0  # share of chunks held one retransmission timeout extra

    def __post_init__(self) -> None:
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be from 0 to below 1, not {self.loss}")
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must not be negative")
        if self.jitter_ms > self.delay_ms:
            raise ValueError(f"jitter_ms ({self.jitter_ms}) must not exceed delay_ms ({self.delay_ms})")

    def to_json(self) -> dict[str, Any]:
        return {"blackhole": self.blackhole, "delay_ms": self.delay_ms, "jitter_ms": self.jitter_ms, "loss": self.loss}

    @classmethod
    def from_json(cls, raw: Any) -> LinkFault:
        """A fault from its JSON form; ValueError naming what is wrong (missing keys are 0)."""
        if not isinstance(raw, dict):
            raise ValueError(f"a link fault is a JSON object, not {raw!r}")
        unknown = set(raw) - {"blackhole", "delay_ms", "jitter_ms", "loss"}
        if unknown:
            raise ValueError(f"unknown link fault keys: {', '.join(sorted(unknown))}")
        blackhole = raw.get("blackhole", False)
        if not isinstance(blackhole, bool):
            raise ValueError(f"blackhole must be true or false, not {blackhole!r}")
        numbers = {}
        for key in ("delay_ms", "jitter_ms", "loss"):
            value = raw.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number, not {value!r}")
            numbers[key] = float(value)
        return cls(blackhole=blackhole, **numbers)

    @property
    def normal(self) -> bool:
        return self == _NORMAL

    def hold_s(self) -> float:
        """How long one chunk read now is held before it is sent on."""
        held = self.delay_ms + random.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else self.delay_ms
        if self.loss and random.random() < self.loss:
            held += RETRANSMIT_S * 1000
        return held / 1000


_NORMAL = LinkFault()


@dataclass
class _Route:
    link: Link
    upstream: tuple[str, int]
    sock: socket.socket
    server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"


@dataclass
class _Chunk:
    data: bytes  # b"" is the end of the stream
    release: float | None  # monotonic time to send it; None: read during a partition


@dataclass
class _Direction:
    """One direction of one connection: chunks in the order read, each sent once released."""

    proxy: FaultProxy
    link: Link
    queue: deque[_Chunk] = field(default_factory=deque)
    buffered: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    space: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # the end of the stream was read

    async def read_from(self, reader: asyncio.StreamReader) -> None:
        while True:
            while self.buffered >= BUFFER_LIMIT:  # backpressure: the sender's TCP window fills
                self.space.clear()
                await self.space.wait()
            try:
                data = await reader.read(CHUNK)
            except OSError:
                data = b""  # a reset ends the stream like a close
            fault = self.proxy.fault(self.link)
            release = None if fault.blackhole else time.monotonic() + fault.hold_s()
            self.queue.append(_Chunk(data, release))
            self.buffered += len(data)
            self.arrived.set()
            if not data:
                self.ended.set()
                return

    async def write_to(self, writer: asyncio.StreamWriter) -> None:
        """Until the end of the stream is passed on (a half close: the other direction goes on
        until its own end) or a write fails (the connection is then closed)."""
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            chunk = self.queue[0]
            await self._released(chunk)
            self.queue.popleft()
            self.buffered -= len(chunk.data)
            self.space.set()
            if not chunk.data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk.data)
            await writer.drain()

    async def _released(self, chunk: _Chunk) -> None:
        while True:
            changed = self.proxy.changed  # taken before the fault is read, so no change is missed
            fault = self.proxy.fault(self.link)
            if fault.blackhole:
                await changed.wait()
                continue
            if fault.normal:
                return  # healed: what was held goes now
            if chunk.release is None:
                # Held by a partition now lifted: everything it held is delayed from now on
                # at once, not one delay per chunk.
                release = time.monotonic() + fault.hold_s()
                for held in self.queue:
                    if held.release is None:
                        held.release = release
            assert chunk.release is not None
            wait = chunk.release - time.monotonic()
            if wait <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await changed.wait()


class FaultProxy:
    """Forwards TCP between regions, through one port per (dialling region, dialled region,
    server address), applying each pair of regions' ``LinkFault``.

    ``route()`` binds synchronously, so its addresses can go into command lines before
    ``start()``; the proxy then runs its own event loop in a daemon thread, and every other
    method is safe to call from any thread.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._routes: dict[tuple[str, str, str], _Route] = {}
        self._faults: dict[Link, LinkFault] = {}
        self._lock = threading.Lock()  # routes and faults, read by other threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._stopped = False
        # Set and replaced on every fault change: what a held chunk waits on.
        self.changed = asyncio.Event()

    # --- routes -----------------------------------------------------------------------------

    def route(self, from_region: str, to_region: str, address: str) -> str:
        """The address a server of ``from_region`` dials to reach ``address`` (a server of
        ``to_region``) through the proxy; the same route twice is the same port."""
        key = (from_region, to_region, address)
        with self._lock:
            if self._stopped:
                raise RuntimeError("the fault proxy was stopped")
            existing = self._routes.get(key)
            if existing is not None:
                return existing.address
            host, _, port = address.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((self.host, 0))
                sock.listen(128)  # connections made before start() wait in the backlog
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            route = _Route((from_region, to_region), (host or "127.0.0.1", int(port)), sock)
            self._routes[key] = route
            serving = self._loop is not None  # else start() serves it
        if serving:
            self._call(self._serve(route))
        log.debug("route %s -> %s: %s via %s", from_region, to_region, address, route.address)
        return route.address

    def routes(self) -> dict[str, dict[str, list[str]]]:
        """The proxy's address of every server, per dialling and dialled region."""
        result: dict[str, dict[str, list[str]]] = {}
        with self._lock:
            for route in self._routes.values():
                src, dst = route.link
                result.setdefault(src, {}).setdefault(dst, []).append(route.address)
        return result

    # --- faults -----------------------------------------------------------------------------

    def set_fault(self, region: str, fault: LinkFault | None, peer: str | None = None) -> None:
        """Apply ``fault`` to every link between ``region`` and another region (or only
        ``peer``), both ways; None heals them. In effect for every connection once it returns."""
        with self._lock:
            links = {link for link in (r.link for r in self._routes.values()) if region in link}
            if peer is not None:
                links = {link for link in links if peer in link}
            if not links:
                other = f" and {peer!r}" if peer is not None else ""
                raise KeyError(f"no link between {region!r}{other} goes through this proxy")
            for link in links:
                if fault is None or fault.normal:
                    self._faults.pop(link, None)
                else:
                    self._faults[link] = fault
        log.info("links of %s%s: %s", region, f" with {peer}" if peer else "", fault or "healed")
        self._notify()

    def heal(self) -> None:
        """Every link back to normal."""
        with self._lock:
            healed, self._faults = bool(self._faults), {}
        if healed:
            log.info("every link healed")
            self._notify()

    def faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"from": src, "to": dst, **fault.to_json()} for (src, dst), fault in sorted(self._faults.items())]

    def fault(self, link: Link) -> LinkFault:
        with self._lock:
            return self._faults.get(link, _NORMAL)

    def _notify(self) -> None:
        """Wake every held chunk to look at its link again, and return once they can have:
        so a fault is in force for every byte the proxy sends after ``set_fault`` returns."""
        if self._loop is not None and self._thread is not threading.current_thread():
            with contextlib.suppress(RuntimeError):  # stopped meanwhile: nothing to wake
                self._call(self._wake())

    async def _wake(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    # --- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """Serve every route (and those added later) from a daemon thread of its own."""
        if self._thread is not None:
            raise RuntimeError("the fault proxy was started already")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._main(ready))
            except BaseException as exc:
                failure.append(exc)
                log.exception("the fault proxy failed")
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(_CALL_TIMEOUT_S) or failure or self._loop is None:
            raise RuntimeError(f"the fault proxy did not start: {failure[0] if failure else 'timed out'}")

    async def _main(self, ready: threading.Event) -> None:
        self.changed = asyncio.Event()  # of this loop
        self._stopping = asyncio.Event()
        with self._lock:
            # Together: a route added from now on is served by route() itself.
            self._loop = asyncio.get_running_loop()
            routes = list(self._routes.values())
        for route in routes:
            await self._serve(route)
        ready.set()
        await self._stopping.wait()
        with self._lock:
            routes = list(self._routes.values())
        for route in routes:
            if route.server is not None:
                route.server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5)

    async def _serve(self, route: _Route) -> None:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections.add(task)
            try:
                await self._forward(route, reader, writer)
            except asyncio.CancelledError:
                pass  # stop(): asyncio's streams would log the cancellation as an error
            finally:
                self._connections.discard(task)

        route.server = await asyncio.start_server(accepted, sock=route.sock)

    def stop(self) -> None:
        """Close every listener and connection and end the thread. Safe to call twice."""
        with self._lock:
            self._stopped = True
            routes = list(self._routes.values())
        loop, thread, stopping = self._loop, self._thread, self._stopping
        if loop is not None and thread is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # its loop ended already
                loop.call_soon_threadsafe(stopping.set)
            thread.join(_CALL_TIMEOUT_S)
            if thread.is_alive():
                log.warning("the fault proxy thread did not end within %ss", _CALL_TIMEOUT_S)
        self._loop = None
        for route in routes:
            route.sock.close()  # those never served; closing twice is harmless

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT_S)

    # --- one connection -----------------------------------------------------------------------

    async def _forward(
        self, route: _Route, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        up, down = _Direction(self, route.link), _Direction(self, route.link)
        tasks = [asyncio.create_task(up.read_from(client_reader))]
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            # A partition holds the SYN too: the upstream is dialled once the link allows.
            if not await self._until_open(route.link, up.ended):
                return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    upstream_reader, upstream_writer = await asyncio.open_connection(*route.upstream)
            except (OSError, TimeoutError) as exc:
                log.debug("%s: cannot reach %s:%s: %s", route.address, *route.upstream, exc)
                return  # the dialler sees its connection closed, as a refused one would be
            tasks += [
                asyncio.create_task(up.write_to(upstream_writer)),
                asyncio.create_task(down.read_from(upstream_reader)),
                asyncio.create_task(down.write_to(client_writer)),
            ]
            # Each side's close reaches the other once what it sent before is delivered; a write
            # that fails (its reader closed for good) closes both.
            await asyncio.wait([tasks[1], tasks[3]], return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
                        async with asyncio.timeout(1):
                            await writer.wait_closed()

    async def _until_open(self, link: Link, client_closed: asyncio.Event) -> bool:
        """Until the link is not partitioned (True) or the client closed first (False)."""
        while True:
            changed = self.changed
            if client_closed.is_set():
                return False
            if not self.fault(link).blackhole:
                return True
            waits = [asyncio.create_task(changed.wait()), asyncio.create_task(client_closed.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
