"""The DNS port: UDP and TCP on the server's event loop (docs/dns.md).

Every packet gets the same handling on both transports: a packet that is not a query is
dropped (too short for a header, or a response: never answer an answer), one that cannot be
parsed gets FORMERR, anything but a one-question QUERY gets FORMERR or NOTIMP; the rest is
answered from the view by ``Answers``. Nothing here awaits anything but the socket, and a
failure inside one answer is logged and costs that query only.

UDP answers are at most 512 bytes for a query without EDNS, else the largest step of
``UDP_SIZES`` within the query's EDNS buffer size (so at most ``MAX_UDP_PAYLOAD``); a larger
answer is sent truncated (TC set) so the client asks again over TCP. Responses are never
padded, and advertise our buffer size. UDP responses pass a rate limit per network and a
global one (``ratelimit``); TCP queries pass a separate one. TCP takes at most
``max_connections`` at once and ``max_per_source`` from one address (IPv6: one /56), each closed after
``idle_seconds`` without a query.
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
from discovery.dns.answers import MAX_UDP_PAYLOAD, Answers, make_response
from discovery.dns.ratelimit import ResponseRateLimit, Verdict, network
from discovery.model import split_address

log = logging.getLogger(__name__)

HEADER = 12
CACHE_ENTRIES = 10_000
# The cache's bound in bytes (its answers, keys and per-entry overhead): a TCP answer may be
# 64 KiB, so a bound on entries alone would allow 650 MB.
CACHE_BYTES = 16 * 1024 * 1024
_ENTRY_OVERHEAD = 200  # the entry object, its key and the dict slot, roughly
# Rendered answers are reused while nothing they depend on changed, and at most this long:
# the SOA serial (the view's revision) in a negative answer may lag by this much.
CACHE_SECONDS = 1.0
_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"
NO_EDNS_UDP = 512
# UDP answers are rendered for the largest of these the query's buffer size allows: sending
# less than a client takes is always allowed, and one rendering then serves every size in
# its step (the cache's key holds the step, not the size).
UDP_SIZES = (512, 768, 1024, MAX_UDP_PAYLOAD)
_OPT_TYPE = b"\x00\x29"  # 41
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
    tcp_refused: int = 0  # connections over max_connections, or over max_per_source from one address
    cached: int = 0  # answered from the cache of rendered answers
    limited: int = 0  # queries over their network's or the global rate: UDP dropped or slipped, TCP refused
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
        tcp_rate_limit: ResponseRateLimit | None = None,
        max_connections: int = 256,
        max_per_source: int = 32,
        idle_seconds: float = 10.0,
    ) -> None:
        """``tcp_rate_limit``: None for none; keep it apart from ``rate_limit`` (a UDP flood
        spoofed in a client's name must not shut it out of TCP, where the slip sends it)."""
        host, self._requested = split_address(listen, "dns_listen", allow_port_zero=True)
        self._host = host[1:-1] if host.startswith("[") else host
        self.answers = answers
        self.limit = rate_limit
        self.tcp_limit = tcp_rate_limit or ResponseRateLimit(0)
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self.idle_seconds = idle_seconds
        self.counters = Counters()
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._per_source: dict[str, int] = {}
        self._cache: dict[bytes, _Cached] = {}
        self._cache_bytes = 0

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
            token = self.answers.token(service)
            self._remember(key, _Cached(wire, service, token, time.monotonic() + CACHE_SECONDS, rcode, truncated))
        return wire

    def _remember(self, key: bytes, entry: _Cached) -> None:
        """Kept within CACHE_ENTRIES and CACHE_BYTES, the oldest entries leaving first."""
        cache = self._cache
        old = cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= _cost(key, old)
        cost = _cost(key, entry)
        if cost > CACHE_BYTES:
            return
        while cache and (len(cache) >= CACHE_ENTRIES or self._cache_bytes + cost > CACHE_BYTES):
            oldest = next(iter(cache))
            self._cache_bytes -= _cost(oldest, cache.pop(oldest))
        cache[key] = entry
        self._cache_bytes += cost

    @property
    def cache_bytes(self) -> int:
        """What the rendered-answer cache holds, as it counts it (CACHE_BYTES at most)."""
        return self._cache_bytes

    @property
    def cache_entries(self) -> int:
        return len(self._cache)

    def _answer(self, query: dns.message.Message) -> tuple[dns.message.Message, str | None]:
        """The response, and the service it depends on (None: not to be cached)."""
        if query.opcode() != dns.opcode.QUERY:
            response = make_response(query)
            response.set_rcode(dns.rcode.NOTIMP)
            return response, None
        if query.edns > 0:
            response = make_response(query)
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
        return _bare(data, 0, dns.rcode.FORMERR)

    def slip(self, data: bytes) -> bytes | None:
        """A rate-limited query's empty truncated response: its header and question, no
        records, EDNS (if the query had it) with our buffer size and never padded, so never
        larger than the query. Built from the bytes, not parsed: a flood is what it answers."""
        _, question_end = _cache_key(data, udp=True)
        if not question_end or data[2] & (_QR >> 8):
            return None
        edns = data[10:12] == b"\x00\x01" and data[question_end : question_end + 3] == b"\x00" + _OPT_TYPE
        return _bare(data, question_end, dns.rcode.NOERROR, truncated=True, edns=edns)

    def refuse(self, data: bytes) -> bytes | None:
        """A TCP query over its network's rate: REFUSED, from its header and question alone
        (no parsing); None (close) for what is not a query."""
        if len(data) < HEADER or data[2] & (_QR >> 8):
            return None
        _, question_end = _cache_key(data, udp=False)
        return _bare(data, question_end, dns.rcode.REFUSED)

    # --- TCP ----------------------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        # An IPv4 client has one address; an IPv6 one a whole prefix to pick from, so its
        # connections count by network there, or the per-source cap would bind nobody.
        source = network(address) if ":" in address else address
        held = self._per_source.get(source, 0)
        if len(self._connections) >= self.max_connections or held >= self.max_per_source:
            # Refused at once, before reading anything: the peer sees the connection close.
            self.counters.tcp_refused += 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        self._connections.add(task)
        self._per_source[source] = held + 1
        try:
            while True:
                async with asyncio.timeout(self.idle_seconds):
                    head = await reader.readexactly(2)
                    (length,) = struct.unpack("!H", head)
                    data = await reader.readexactly(length)
                if self.tcp_limit.check(address) is Verdict.ANSWER:
                    wire = self.respond(data, udp=False)
                else:
                    self.counters.limited += 1
                    wire = self.refuse(data)
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
            left = self._per_source.pop(source, 1) - 1
            if left > 0:
                self._per_source[source] = left
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


def _cost(key: bytes, entry: _Cached) -> int:
    return len(key) + len(entry.wire) + len(entry.service) + _ENTRY_OVERHEAD


# OPT record of a bare response: root name, type 41, our buffer size, no extended rcode,
# version 0, no flags, no options (RFC 6891).
_OUR_OPT = b"\x00" + _OPT_TYPE + struct.pack("!HBBHH", MAX_UDP_PAYLOAD, 0, 0, 0, 0)


def _bare(data: bytes, question_end: int, rcode: int, *, truncated: bool = False, edns: bool = False) -> bytes:
    """A response of the query's id, opcode and RD, ``rcode``, and its question as sent (when
    ``question_end`` says where it ends; else none), with an OPT of our buffer size when
    ``edns``: no records, nothing parsed, nothing else echoed."""
    (qid, flags) = struct.unpack_from("!HH", data, 0)
    flags = _QR | (flags & (_OPCODE | 0x0100)) | rcode | (_TC if truncated else 0)
    question = 1 if question_end else 0
    header = struct.pack("!HHHHHH", qid, flags, question, 0, 0, 1 if edns else 0)
    return header + (data[HEADER:question_end] if question_end else b"") + (_OUR_OPT if edns else b"")


def _cache_key(data: bytes, udp: bool) -> tuple[bytes | None, int]:
    """The key of a plain query's rendered answer, and where its question ends (0 when the
    question cannot be read). The key holds only what the answer depends on: the transport,
    the RD bit, the name lowercased (DNS names ignore case), the type and class, and for EDNS
    its presence and (UDP) the step of UDP_SIZES its buffer size allows. Never the id, the
    other EDNS fields or options (cookies, padding): varying those must not miss the cache
    and fill it. None for anything else (another opcode, a second record, EDNS of another
    version, trailing bytes): it takes the full path."""
    size = len(data)
    if size < HEADER or data[4:10] != _ONE_QUESTION or data[10:12] not in (b"\x00\x00", b"\x00\x01"):
        return None, 0
    at = HEADER
    while at < size and 0 < data[at] < 64:
        at += data[at] + 1
    if at >= size or data[at] != 0:
        return None, 0  # a compression pointer, or cut short
    end = at + 5  # the root label, type and class
    if end > size:
        return None, 0
    if data[2] & 0x78:
        return None, end  # not a QUERY: NOTIMP, never cached
    rd = b"R" if data[2] & 0x01 else b"-"
    question = data[HEADER:at].lower() + data[at:end]
    if data[11] == 0:
        if end != size:
            return None, end
        return (b"U" if udp else b"T") + rd + (b"%d" % NO_EDNS_UDP if udp else b"") + b"/" + question, end
    # One additional record: it must be the OPT (root name, type 41) and the last bytes.
    if end + 11 > size or data[end] != 0 or data[end + 1 : end + 3] != _OPT_TYPE:
        return None, end
    payload, rcode_high, version, _flags, rdlength = struct.unpack_from("!HBBHH", data, end + 3)
    if rcode_high or version or end + 11 + rdlength != size:
        return None, end
    step = _udp_step(payload) if udp else 0
    return (b"U" if udp else b"T") + rd + b"E%d/" % step + question, end


def _udp_step(payload: int) -> int:
    """The largest of UDP_SIZES an EDNS buffer size of ``payload`` allows."""
    step = UDP_SIZES[0]
    for size in UDP_SIZES:
        if payload >= size:
            step = size
    return step


def udp_size(query: dns.message.Message) -> int:
    """The most a UDP answer to ``query`` may hold: 512 without EDNS, else the largest of
    UDP_SIZES within its buffer size (at most MAX_UDP_PAYLOAD)."""
    if query.edns < 0:
        return NO_EDNS_UDP
    return _udp_step(query.payload)
