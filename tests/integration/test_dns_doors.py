"""The DNS port as a door: bad input, a query flood, and the policy's DNS visibility with
mTLS on (docs/dns.md, docs/security.md)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.opcode
import dns.rcode
import pytest

from discovery.devtools.etcd import EtcdProcess
from discovery.dns import instance_label
from discovery.server import Server
from tests.support import dnsq
from tests.support.helpers import eventually, register, resolve
from tests.support.secure import ADMIN, Pki
from tests.support.servers import Servers, Stubs


class Raw(asyncio.DatagramProtocol):
    """A UDP client that sends anything and collects whatever comes back."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.received.put_nowait(data)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    async def reply(self, timeout: float = 1.0) -> bytes | None:
        """The next datagram, or None when none comes within ``timeout``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                return await self.received.get()
        return None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@contextlib.asynccontextmanager
async def raw(port: int, source: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    _, client = await loop.create_datagram_endpoint(Raw, local_addr=(source, 0), remote_addr=("127.0.0.1", port))
    try:
        yield client
    finally:
        client.close()


def query(name: str = "web.service.discovery.", rdtype: str = "A") -> dns.message.Message:
    return dns.message.make_query(name, rdtype, use_edns=False)


async def dns_server(servers: Servers, etcd: EtcdProcess, **overrides: object) -> tuple[Server, Stubs]:
    import grpc.aio

    server = await servers.start(etcd, dns_listen="127.0.0.1:0", **overrides)
    return server, Stubs(grpc.aio.insecure_channel(server.address))


async def test_garbage_packets_get_formerr_or_nothing_and_the_server_keeps_answering(
    servers: Servers, etcd: EtcdProcess
) -> None:
    server, stubs = await dns_server(servers, etcd, dns_rate_limit=0.0)  # the flood test has the limit
    await register(stubs, "web", "10.0.0.1:80")
    assert server.dns is not None
    port = server.dns_port
    async with raw(port) as client:
        for packet in (b"", b"\x12", b"\x00" * 11):  # no header: dropped
            client.send(packet)
            assert await client.reply(0.3) is None
        # A header promising five questions and holding none: FORMERR, the id echoed.
        client.send(struct.pack("!HHHHHH", 0xBEEF, 0x0100, 5, 0, 0, 0))
        reply = await client.reply()
        assert reply is not None and reply[:2] == b"\xbe\xef"
        assert dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR
        # A response is never answered (no loops between two servers).
        answer = dns.message.make_response(query())
        client.send(answer.to_wire())
        assert await client.reply(0.3) is None
        # Two questions: FORMERR. An UPDATE: NOTIMP. EDNS version 1: BADVERS.
        two = query()
        two.question.append(query("other.service.discovery.").question[0])
        client.send(two.to_wire())
        assert dns.message.from_wire(await client.reply() or b"").rcode() == dns.rcode.FORMERR
        update = query()
        update.set_opcode(dns.opcode.NOTIFY)
        client.send(update.to_wire())
        assert dns.message.from_wire(await client.reply() or b"").rcode() == dns.rcode.NOTIMP
        client.send(dns.message.make_query("web.service.discovery.", "A", use_edns=1).to_wire())
        assert dns.message.from_wire(await client.reply() or b"").rcode() == dns.rcode.BADVERS
        # Random bytes, a thousand packets: each gets FORMERR or nothing, and nothing breaks.
        rng = random.Random(16)
        for _ in range(1000):
            client.send(rng.randbytes(rng.randrange(12, 600)))
        # A real query after them is answered. The burst may overflow the socket's buffer, so
        # the kernel may drop it: sent again until answered, as a client would.
        last, answer = query(), None
        async with asyncio.timeout(20):
            while answer is None:
                client.send(last.to_wire())
                while (reply := await client.reply(1.0)) is not None:
                    message = dns.message.from_wire(reply)
                    assert message.rcode() in (dns.rcode.FORMERR, dns.rcode.NOERROR), message
                    if message.id == last.id and message.answer:
                        answer = message
        assert dnsq.addresses(answer) == {"10.0.0.1"}
    # TCP: a length that never arrives, then something that is not DNS, then a real query.
    for junk in (b"\x03\xe8" + b"x" * 10, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(junk)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        del reader
    assert dnsq.addresses(await dnsq.tcp(port, "web.service.discovery.")) == {"10.0.0.1"}
    assert server.dns.counters.failed == 0 and server.dns.counters.formerr >= 2
    assert len((await resolve(stubs, "web")).endpoints) == 1  # gRPC unaffected
    await stubs.channel.close()


async def test_a_query_flood_is_rate_limited_per_network_and_grpc_keeps_answering(
    servers: Servers, etcd: EtcdProcess
) -> None:
    rate = 50
    server, stubs = await dns_server(servers, etcd, dns_rate_limit=float(rate))
    await register(stubs, "web", "10.0.0.1:80")
    assert server.dns is not None
    port = server.dns_port
    assert dnsq.addresses(await dnsq.udp(port, "web.service.discovery.")) == {"10.0.0.1"}
    flood = 2000
    # 127.0.1.1 is not in the flooding source's /24 (sources count by network).
    async with raw(port) as client, raw(port, source="127.0.1.1") as bystander:
        start = time.monotonic()
        wire = query().to_wire()
        for i in range(flood):
            client.send(wire)
            if i % 200 == 0:
                await asyncio.sleep(0)  # let the server read: its socket buffer is finite
        # gRPC answers during the flood.
        assert len((await resolve(stubs, "web")).endpoints) == 1
        full = slipped = 0
        while (reply := await client.reply(0.5)) is not None:
            message = dns.message.from_wire(reply)
            if message.flags & 0x0200:
                assert message.answer == [] and len(reply) <= len(wire)  # no amplification
                slipped += 1
            else:
                full += 1
        elapsed = time.monotonic() - start
        # At most the burst plus the refill over the flood's duration; the rest dropped or slipped.
        assert full <= rate + rate * elapsed + 1, (full, elapsed)
        assert slipped > 0 and full + slipped < flood
        # Another network is not limited by this one's flood.
        bystander.send(query().to_wire())
        reply = await bystander.reply(2.0)
        assert reply is not None and dnsq.addresses(dns.message.from_wire(reply)) == {"10.0.0.1"}
    assert server.dns.limit.dropped > 0
    # The flooded source is answered again once its bucket refills; TCP has a bucket of its own.
    assert dnsq.addresses(await dnsq.tcp(port, "web.service.discovery.")) == {"10.0.0.1"}

    async def answered_again() -> bool:
        try:
            return dnsq.addresses(await dnsq.udp(port, "web.service.discovery.")) == {"10.0.0.1"}
        except dns.exception.Timeout:
            return False  # still limited: dropped

    await eventually(answered_again, timeout=5)
    assert server.dns.counters.failed == 0
    await stubs.channel.close()


async def test_addresses_of_one_network_share_its_rate(servers: Servers, etcd: EtcdProcess) -> None:
    """A spoofer cycling through the addresses of one /24 fills one bucket, not one each."""
    server, stubs = await dns_server(servers, etcd, dns_rate_limit=1.0)  # a burst of one, then one a second
    await register(stubs, "web", "10.0.0.1:80")
    assert server.dns is not None
    port = server.dns_port
    wire = query().to_wire()
    async with (
        raw(port) as client,
        raw(port, source="127.0.0.9") as neighbour,
        raw(port, source="127.0.1.1") as bystander,
    ):
        for _ in range(10):  # one answered, nine refused (dropped, slipped, dropped, ...)
            client.send(wire)
        replies = []
        while (reply := await client.reply(0.5)) is not None:
            replies.append(dns.message.from_wire(reply))
        assert sum(1 for r in replies if r.answer) == 1 and len(replies) <= 5
        # The tenth refusal in the network: an empty truncated answer, not the records.
        neighbour.send(wire)
        limited = await neighbour.reply(2.0)
        assert limited is not None and len(limited) <= len(wire)
        message = dns.message.from_wire(limited)
        assert message.flags & 0x0200 and message.answer == []
        # Another network has its own bucket.
        bystander.send(wire)
        reply = await bystander.reply(2.0)
        assert reply is not None and dnsq.addresses(dns.message.from_wire(reply)) == {"10.0.0.1"}
    assert server.dns.counters.limited == 10
    await stubs.channel.close()


VISIBLE = """
[dns]
visible = ["web", "pay.*"]

[[grant]]
identity = "{admin}"
admin = true
register = ["*"]
read = ["*"]
"""


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def test_dns_shows_only_what_the_policy_makes_visible_with_mtls(
    servers: Servers, etcd: EtcdProcess, pki: Pki
) -> None:
    policy = pki.policy(VISIBLE.format(admin=ADMIN))
    server = await servers.start(etcd, **pki.settings("us-east", policy=policy), dns_listen="127.0.0.1:0")
    channel = pki.channel(server.address, pki.client(ADMIN))
    stubs = Stubs(channel)
    for service, address in (("web", "10.0.0.1:80"), ("secret", "10.0.0.2:80"), ("pay.api", "10.0.0.3:80")):
        await register(stubs, service, address, instance_id="i1")
    port = server.dns_port

    async def web_answers() -> bool:
        return dnsq.addresses(await dnsq.udp(port, "web.service.discovery.")) == {"10.0.0.1"}

    await eventually(web_answers, timeout=5)
    assert dnsq.addresses(await dnsq.udp(port, "pay.api.service.discovery.")) == {"10.0.0.3"}
    # Not visible: exactly as if it did not exist, in every form.
    for name, rdtype in (
        ("secret.service.discovery.", "A"),
        ("secret.service.us-east.discovery.", "A"),
        ("_secret._tcp.service.discovery.", "SRV"),
        (f"{instance_label('i1')}.secret.us-east.instance.discovery.", "A"),
    ):
        hidden = await dnsq.udp(port, name, rdtype)
        assert (dnsq.rcode(hidden), hidden.answer) == ("NXDOMAIN", []), name
    # A reloaded policy that shows it: answered, without a restart.
    policy.write_text(VISIBLE.format(admin=ADMIN).replace('"pay.*"]', '"pay.*", "secret"]'))

    async def secret_answers() -> bool:
        return dnsq.addresses(await dnsq.udp(port, "secret.service.discovery.")) == {"10.0.0.2"}

    await eventually(secret_answers, timeout=10)
    # The gRPC door still wants a certificate; DNS never changed that.
    assert len((await resolve(stubs, "secret")).endpoints) == 1
    await channel.close()


def test_the_sources_in_this_file_need_loopback_aliases() -> None:
    """127.0.0.2 is a second source address on Linux's loopback (all of 127/8 is local)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.2", 0))


async def test_tcp_connections_are_bounded_and_idle_ones_closed(servers: Servers, etcd: EtcdProcess) -> None:
    server, stubs = await dns_server(servers, etcd)
    await register(stubs, "web", "10.0.0.1:80")
    listener = server.dns
    assert listener is not None
    listener.max_connections, listener.idle_seconds = 3, 0.5
    held = [await asyncio.open_connection("127.0.0.1", server.dns_port) for _ in range(3)]
    # Each held connection is served (one query each), so all three are counted before the fourth.
    for reader, writer in held:
        wire = query().to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
        length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5), "big")
        assert dnsq.addresses(dns.message.from_wire(await reader.readexactly(length))) == {"10.0.0.1"}
    reader, writer = await asyncio.open_connection("127.0.0.1", server.dns_port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # over the bound: closed at once
    writer.close()
    assert listener.counters.tcp_refused == 1
    # Idle connections are closed by the server after idle_seconds: the slots come back.
    for reader, writer in held:
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert dnsq.addresses(await dnsq.tcp(server.dns_port, "web.service.discovery.")) == {"10.0.0.1"}
    assert len((await resolve(stubs, "web")).endpoints) == 1
    await stubs.channel.close()


async def test_tcp_connections_are_bounded_per_source_and_refused_cleanly(servers: Servers, etcd: EtcdProcess) -> None:
    server, stubs = await dns_server(servers, etcd)
    await register(stubs, "web", "10.0.0.1:80")
    listener = server.dns
    assert listener is not None
    listener.max_per_source = 2
    port = server.dns_port

    async def served(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        wire = query().to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
        async with asyncio.timeout(5):
            length = int.from_bytes(await reader.readexactly(2), "big")
            assert dnsq.addresses(dns.message.from_wire(await reader.readexactly(length))) == {"10.0.0.1"}
        return reader, writer

    held = [await served("127.0.0.1") for _ in range(2)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # a third from the same address: closed at once
    writer.close()
    assert listener.counters.tcp_refused == 1
    other = await served("127.0.0.2")  # another address is served meanwhile
    for _, held_writer in [*held, other]:
        held_writer.close()
        await held_writer.wait_closed()

    async def slot_back() -> bool:
        try:
            _, again = await served("127.0.0.1")
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        again.close()
        return True

    await eventually(slot_back, timeout=5)  # a closed connection gives its slot back
    assert len((await resolve(stubs, "web")).endpoints) == 1
    await stubs.channel.close()


async def test_tcp_queries_are_rate_limited_with_refused_and_the_connection_stays(
    servers: Servers, etcd: EtcdProcess
) -> None:
    rate = 5
    server, stubs = await dns_server(servers, etcd, dns_rate_limit=float(rate))
    await register(stubs, "web", "10.0.0.1:80")
    assert server.dns is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.dns_port)
    sent = [query() for _ in range(40)]
    start = time.monotonic()
    writer.write(b"".join(len(w).to_bytes(2, "big") + w for w in (q.to_wire() for q in sent)))
    rcodes = []
    async with asyncio.timeout(10):
        for sent_query in sent:
            length = int.from_bytes(await reader.readexactly(2), "big")
            reply = dns.message.from_wire(await reader.readexactly(length))
            assert reply.id == sent_query.id and reply.question == sent_query.question
            rcodes.append(reply.rcode())
    elapsed = time.monotonic() - start
    answered = rcodes.count(dns.rcode.NOERROR)
    assert 1 <= answered <= rate + rate * elapsed + 1, (answered, elapsed)
    assert rcodes.count(dns.rcode.REFUSED) == len(sent) - answered
    assert server.dns.counters.limited == len(sent) - answered
    # Same connection, later: answered again once the bucket refills.
    async with asyncio.timeout(10):
        while True:
            again = query()
            wire = again.to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
            length = int.from_bytes(await reader.readexactly(2), "big")
            reply = dns.message.from_wire(await reader.readexactly(length))
            if reply.rcode() == dns.rcode.NOERROR:
                break
            await asyncio.sleep(0.2)  # pacing a client's retries, not synchronisation
    assert dnsq.addresses(reply) == {"10.0.0.1"}
    writer.close()
    # UDP has its own bucket: TCP's refusals did not spend it.
    assert dnsq.addresses(await dnsq.udp(server.dns_port, "web.service.discovery.")) == {"10.0.0.1"}
    assert len((await resolve(stubs, "web")).endpoints) == 1
    await stubs.channel.close()


async def test_dns_counts_reach_the_metrics(servers: Servers, etcd: EtcdProcess) -> None:
    """What the DNS port did shows in /metrics like every other door's figures: queries,
    answers by rcode, malformed ones."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    server, stubs = await dns_server(servers, etcd, metrics_listen="127.0.0.1:0")
    await register(stubs, "web", "10.0.0.1:80")
    assert server.http is not None
    async with asyncio.timeout(15):
        await eventually(lambda: dnsq.udp(server.dns_port, "web.service.discovery."))
        assert (await dnsq.udp(server.dns_port, "nothing.service.discovery.")).rcode() == dns.rcode.NXDOMAIN
        async with raw(server.dns_port) as client:
            client.send(b"\x12\x34" + b"\x00" * 20)  # a header and garbage: FORMERR
            assert await client.reply() is not None

        async def counted() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{server.http.metrics_port}/metrics") as response,
            ):
                text = await response.text()
            samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
            answers = samples.get("discovery_dns_answers_total", {})
            ok = any(dict(k).get("rcode") == "NOERROR" for k in answers) and any(
                dict(k).get("rcode") == "NXDOMAIN" for k in answers
            )
            return samples if ok and samples.get("discovery_dns_formerr_total") else {}

        samples = await eventually(counted)
    assert sum(samples["discovery_dns_queries_total"].values()) >= 3
    assert sum(samples["discovery_dns_formerr_total"].values()) >= 1
