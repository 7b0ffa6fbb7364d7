"""The DNS port: UDP and TCP on the server's event loop (docs/dns.md).

Every packet gets the same handling on both transports: a packet that is not a query is
dropped (too short for a header, or a response: never answer an answer), one that cannot be
parsed gets FORMERR, anything but a one-question QUERY gets FORMERR or NOTIMP; the rest is
answered from the view by ``Answers``. Nothing here awaits anything but the socket, and a
failure inside one answer is logged and costs that query only.

UDP answers are at most 512 bytes for a query without EDNS, else the query's EDNS buffer
size capped at ``MAX_UDP_PAYLOAD``; a larger answer is sent truncated (TC set) so the client
asks again over TCP. UDP responses pass a per-source rate limit (``ratelimit``). TCP takes at
most ``max_connections`` at once, each closed after ``idle_seconds`` without a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
from discovery.dns.answers import MAX_UDP_PAYLOAD, Answers
from discovery.dns.ratelimit import ResponseRateLimit, Verdict
from discovery.model import split_address

log = logging.getLogger(__name__)

HEADER = 12
CACHE_ENTRIES = 10_000
# Rendered answers are reused while nothing they depend on changed, and at most this long:
# the SOA serial (the view's revision) in a negative answer may lag by this much.
CACHE_SECONDS = 1.0
_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"
NO_EDNS_UDP = 512
TCP_MAX = 65535
_QR = 0x8000
_TC = 0x0200
_OPCODE = 0x7800


@dataclass
class Counters:
    """What the listener did, for tests, the benchmark and logs."""

    queries: int = 0
    answered: int = 0
    truncated: int = 0
    formerr: int = 0
    dropped: int = 0  # not a query, or failed
    failed: int = 0  # an answer raised: logged, never fatal
    tcp_refused: int = 0  # connections over max_connections
    cached: int = 0  # answered from the cache of rendered answers
    limited: int = 0  # UDP queries over their source's rate: dropped, or answered empty and truncated
    by_rcode: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Cached:
    wire: bytes
    service: str
    token: tuple[object, ...]
    expires: float
    rcode: str
    truncated: bool


class DnsListener:
    """``await start()`` binds UDP and TCP on the same port (``port``); ``await stop()``."""

    def __init__(
        self,
        answers: Answers,
        listen: str,
        *,
        rate_limit: ResponseRateLimit,
        max_connections: int = 256,
        idle_seconds: float = 10.0,
    ) -> None:
        host, self._requested = split_address(listen, "dns_listen", allow_port_zero=True)
        self._host = host[1:-1] if host.startswith("[") else host
        self.answers = answers
        self.limit = rate_limit
        self.max_connections = max_connections
        self.idle_seconds = idle_seconds
        self.counters = Counters()
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._cache: dict[bytes, _Cached] = {}

    async def start(self) -> int:
        """Binds both; with port 0, a port free for both (a few tries). Raises OSError."""
        loop = asyncio.get_running_loop()
        for attempt in range(20):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(self._host, self._requested)
            )
            port = int(transport.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(
                    self._serve_tcp, self._host, port, reuse_address=True, limit=TCP_MAX + 2
                )
            except OSError:
                transport.close()
                if self._requested or attempt == 19:
                    raise
                continue
            self._udp = transport
            self.port = port
            return port
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._tcp.wait_closed()
            self._tcp = None

    # --- one packet -------------------------------------------------------------------------

    def respond(self, data: bytes, *, udp: bool) -> bytes | None:
        """The wire response to ``data``; None: send nothing."""
        counters = self.counters
        counters.queries += 1
        if len(data) < HEADER:
            counters.dropped += 1
            return None
        (flags,) = struct.unpack_from("!H", data, 2)
        if flags & _QR:
            counters.dropped += 1  # a response: answering it could start a loop
            return None
        key, question_end = _cache_key(data, udp)
        if key is not None:
            hit = self._cache.get(key)
            if hit is not None and hit.expires > time.monotonic() and hit.token == self.answers.token(hit.service):
                counters.cached += 1
                self._count(hit.rcode, hit.truncated)
                # The query's id, and its question as it spelled it (resolvers check the case).
                return data[:2] + hit.wire[2:HEADER] + data[HEADER:question_end] + hit.wire[question_end:]
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return self._formerr(data)
        except Exception:  # dnspython raising something unexpected on garbage
            log.debug("dns: unparsable packet", exc_info=True)
            return self._formerr(data)
        if len(query.question) != 1:
            return self._formerr(data)
        try:
            response, service = self._answer(query)
            wire = response.to_wire(max_size=udp_size(query) if udp else TCP_MAX, prefer_truncation=True)
        except Exception:
            counters.failed += 1
            log.exception("dns: answering %s failed", query.question[:1])
            return None
        rcode = dns.rcode.to_text(response.rcode())
        truncated = bool(wire[2] & (_TC >> 8))
        self._count(rcode, truncated)
        if key is not None and service is not None:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            token = self.answers.token(service)
            self._cache[key] = _Cached(wire, service, token, time.monotonic() + CACHE_SECONDS, rcode, truncated)
        return wire

    def _answer(self, query: dns.message.Message) -> tuple[dns.message.Message, str | None]:
        """The response, and the service it depends on (None: not to be cached)."""
        if query.opcode() != dns.opcode.QUERY:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.NOTIMP)
            return response, None
        if query.edns > 0:
            response = dns.message.make_response(query, our_payload=MAX_UDP_PAYLOAD)
            response.set_rcode(dns.rcode.BADVERS)
            return response, None
        return self.answers.respond(query)

    def _count(self, rcode: str, truncated: bool) -> None:
        counters = self.counters
        counters.answered += 1
        counters.by_rcode[rcode] = counters.by_rcode.get(rcode, 0) + 1
        counters.truncated += truncated

    def _formerr(self, data: bytes) -> bytes:
        """FORMERR from the header alone: the id, and the opcode, nothing else echoed."""
        self.counters.formerr += 1
        (qid, flags) = struct.unpack_from("!HH", data, 0)
        return struct.pack("!HHHHHH", qid, _QR | (flags & _OPCODE) | dns.rcode.FORMERR, 0, 0, 0, 0)

    def slip(self, data: bytes) -> bytes | None:
        """A rate-limited query's empty truncated response: its header and question, no
        records, so never larger than the query."""
        try:
            query = dns.message.from_wire(data)
            if len(query.question) != 1:
                return None
            response = dns.message.make_response(query)
            response.flags |= dns.flags.TC
            return response.to_wire()
        except Exception:
            return None

    # --- TCP ----------------------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections:
            self.counters.tcp_refused += 1
            writer.close()
            return
        self._connections.add(task)
        try:
            while True:
                async with asyncio.timeout(self.idle_seconds):
                    head = await reader.readexactly(2)
                    (length,) = struct.unpack("!H", head)
                    data = await reader.readexactly(length)
                wire = self.respond(data, udp=False)
                if wire is None:
                    break  # no answer to give: the peer is not speaking DNS
                writer.write(struct.pack("!H", len(wire)) + wire)
                async with asyncio.timeout(self.idle_seconds):
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("dns: TCP connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, listener: DnsListener) -> None:
        self._listener = listener
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # a flood queues here rather than in drops
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        listener = self._listener
        transport = self._transport
        if transport is None:
            return
        try:
            verdict = listener.limit.check(str(addr[0]))
            if verdict is Verdict.ANSWER:
                wire = listener.respond(data, udp=True)
            elif verdict is Verdict.SLIP:
                listener.counters.limited += 1
                wire = listener.slip(data)
            else:
                listener.counters.limited += 1
                wire = None
            if wire is not None:
                transport.sendto(wire, addr)
        except Exception:  # never let one packet end the protocol
            listener.counters.failed += 1
            log.exception("dns: UDP packet from %s failed", addr[0])

    def error_received(self, exc: Exception) -> None:
        log.debug("dns: UDP error: %s", exc)  # ICMP unreachable from a client gone: harmless


def _cache_key(data: bytes, udp: bool) -> tuple[bytes | None, int]:
    """The key of a plain query's rendered answer, and where its question ends; None for any
    other packet (it takes the full path). The key is the transport, the opcode and RD bits,
    the question with its name lowercased (DNS names ignore case), and whatever follows (the
    EDNS record, which sets the size)."""
    if data[4:10] != _ONE_QUESTION or data[10:12] not in (b"\x00\x00", b"\x00\x01"):
        return None, 0
    at, size = HEADER, len(data)
    while at < size and 0 < data[at] < 64:
        at += data[at] + 1
    if at >= size or data[at] != 0:
        return None, 0  # a compression pointer, or cut short
    end = at + 5  # the root label, type and class
    if end > size:
        return None, 0
    flags = (data[2] & 0x79).to_bytes(1, "big")  # opcode and RD
    return (b"U" if udp else b"T") + flags + data[HEADER:at].lower() + data[at:], end


def udp_size(query: dns.message.Message) -> int:
    """The most a UDP answer to ``query`` may hold: 512 without EDNS, else its buffer size
    between 512 and MAX_UDP_PAYLOAD."""
    if query.edns < 0:
        return NO_EDNS_UDP
    return max(NO_EDNS_UDP, min(query.payload, MAX_UDP_PAYLOAD))
