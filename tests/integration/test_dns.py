"""The DNS port against three peered regions in this process (real etcd per region), asked
by dnspython's async queries and by a real ``dig`` (docs/dns.md)."""

from __future__ import annotations

import re
from collections.abc import Callable

import dns.exception
import pytest

from discovery.devtools.etcd import EtcdProcess
from discovery.dns import instance_label
from discovery.server import Server
from discovery_client import DEFAULT_WEIGHT
from discovery_pb.v1 import registry_pb2, types_pb2
from tests.support import dnsq
from tests.support.helpers import CALL_TIMEOUT, eventually, instance, register, resolve
from tests.support.regions import Regions
from tests.support.servers import Stubs

DNS = {"dns_listen": "127.0.0.1:0"}


@pytest.fixture
async def three(regions: Regions, region_etcds: dict[str, EtcdProcess]) -> Regions:
    """Regions a, b, c, each one server with DNS; a's peers are b then c, c's are a then b."""
    return await regions.start(region_etcds, **DNS)


def port(regions: Regions, region: str) -> int:
    return regions[region][0].dns_port


async def answers_a(dns_port: int, name: str, expected: set[str]) -> None:
    async def probe() -> bool:
        try:
            response = await dnsq.udp(dns_port, name)
        except dns.exception.Timeout:
            return False  # a datagram lost on a loaded machine: asked again
        got = dnsq.addresses(response)
        assert got == expected, got
        return True

    await eventually(probe, timeout=10)


async def test_a_srv_region_and_rfc2782_forms_for_a_service_in_two_regions(
    three: Regions, connect: Callable[[Server], Stubs]
) -> None:
    a, b = connect(three["a"][0]), connect(three["b"][0])
    await register(a, "web", "10.0.0.1:80", instance_id="web-1", weight=7)
    await register(b, "web", "10.0.1.1:81", instance_id="Web_B.1")
    await register(a, "pay.api", "10.0.0.5:9000", instance_id="p1")
    # Region c has none: FAILOVER goes to its nearest region with one, a.
    await answers_a(port(three, "c"), "web.service.discovery.", {"10.0.0.1"})
    await answers_a(port(three, "a"), "web.service.discovery.", {"10.0.0.1"})
    await answers_a(port(three, "b"), "web.service.discovery.", {"10.0.1.1"})
    await answers_a(port(three, "a"), "web.service.b.discovery.", {"10.0.1.1"})
    await answers_a(port(three, "c"), "web.service.c.discovery.", set())

    # SRV from c: a's instance, priority 1 (c's nearest peer), weight 7, the target resolves
    # and its address comes along in the additional section.
    response = await dnsq.udp(port(three, "c"), "web.service.discovery.", "SRV")
    assert dnsq.srv(response) == [(1, 7, 80, "web-1.web.a.instance.discovery.")]
    additional = {(r.name.to_text(), rd.to_text()) for r in response.additional for rd in r}
    assert additional == {("web-1.web.a.instance.discovery.", "10.0.0.1")}
    target = await dnsq.udp(port(three, "c"), "web-1.web.a.instance.discovery.")
    assert dnsq.addresses(target) == {"10.0.0.1"}

    # b's instance id is no DNS label: encoded (docs/dns.md), and the encoded name resolves.
    label = instance_label("Web_B.1")
    assert re.fullmatch(r"web-b-1--[a-z2-7]{13}", label), label
    response = await dnsq.udp(port(three, "a"), "_web._tcp.service.b.discovery.", "SRV")
    assert dnsq.srv(response) == [(1, DEFAULT_WEIGHT, 81, f"{label}.web.b.instance.discovery.")]
    assert dnsq.addresses(await dnsq.udp(port(three, "a"), f"{label}.web.b.instance.discovery.")) == {"10.0.1.1"}
    own = await dnsq.udp(port(three, "a"), "_web._tcp.service.discovery.", "SRV")
    assert dnsq.srv(own) == [(0, 7, 80, "web-1.web.a.instance.discovery.")]
    # The RFC 2782 name holds SRV only.
    nodata = await dnsq.udp(port(three, "a"), "_web._tcp.service.discovery.", "A")
    assert (dnsq.rcode(nodata), nodata.answer, dnsq.soa_in_authority(nodata)) == ("NOERROR", [], True)

    # A dotted service name, both forms; case does not matter.
    assert dnsq.addresses(await dnsq.udp(port(three, "a"), "PAY.api.Service.discovery.")) == {"10.0.0.5"}
    dotted = await dnsq.udp(port(three, "a"), "_pay.api._tcp.service.discovery.", "SRV")
    assert dnsq.srv(dotted) == [(0, DEFAULT_WEIGHT, 9000, "p1.pay.api.a.instance.discovery.")]

    # The same through dig: flags say authoritative, no recursion offered.
    out = await dnsq.dig(port(three, "c"), "web.service.discovery.", "A")
    assert "status: NOERROR" in out and re.search(r"flags: qr aa rd;", out), out
    assert (await dnsq.dig(port(three, "c"), "+short", "web.service.discovery.")).split() == ["10.0.0.1"]
    short = await dnsq.dig(port(three, "c"), "+short", "web.service.discovery.", "SRV")
    assert short.split() == ["1", "7", "80", "web-1.web.a.instance.discovery."]
    short = await dnsq.dig(port(three, "a"), "+short", "_web._tcp.service.b.discovery.", "SRV")
    assert short.split() == ["1", str(DEFAULT_WEIGHT), "81", f"{label}.web.b.instance.discovery."]


async def test_tag_filter_and_hostname_endpoints(three: Regions, connect: Callable[[Server], Stubs]) -> None:
    a = connect(three["a"][0])
    await register(a, "web", "10.0.0.1:80", instance_id="w1")
    await register(a, "web", "10.0.0.2:80", instance_id="w2", tags=["canary", "Blue", "v1.2"])
    await register(a, "db", "db.example.com:5432", instance_id="primary")
    await register(a, "db", "10.0.0.9:5432", instance_id="replica")
    await register(a, "v6", "[2001:db8::1]:443", instance_id="six")
    dns_port = port(three, "a")
    await answers_a(dns_port, "web.service.discovery.", {"10.0.0.1", "10.0.0.2"})
    assert dnsq.addresses(await dnsq.udp(dns_port, "canary._tag.web.service.discovery.")) == {"10.0.0.2"}
    assert dnsq.addresses(await dnsq.udp(dns_port, "canary._tag.web.service.a.discovery.")) == {"10.0.0.2"}
    tagged = await dnsq.udp(dns_port, "canary._tag._web._tcp.service.discovery.", "SRV")
    assert dnsq.srv(tagged) == [(0, DEFAULT_WEIGHT, 80, "w2.web.a.instance.discovery.")]
    # No instance has the tag: the service exists, the answer is empty (NODATA).
    none = await dnsq.udp(dns_port, "green._tag.web.service.discovery.")
    assert (dnsq.rcode(none), none.answer) == ("NOERROR", [])
    # Tags that are no lowercase DNS label cannot be asked for ("Blue" is not "blue").
    assert (await dnsq.udp(dns_port, "blue._tag.web.service.discovery.")).answer == []

    # A hostname endpoint is never in A (a CNAME cannot stand beside A records), only in SRV.
    assert dnsq.addresses(await dnsq.udp(dns_port, "db.service.discovery.")) == {"10.0.0.9"}
    records = dnsq.srv(await dnsq.udp(dns_port, "db.service.discovery.", "SRV"))
    assert records == [
        (0, DEFAULT_WEIGHT, 5432, "db.example.com."),
        (0, DEFAULT_WEIGHT, 5432, "replica.db.a.instance.discovery."),
    ]
    six = await dnsq.udp(dns_port, "v6.service.discovery.", "AAAA")
    assert dnsq.addresses(six, "AAAA") == {"2001:db8::1"}
    assert (await dnsq.udp(dns_port, "v6.service.discovery.", "A")).answer == []


async def test_failover_when_the_local_region_is_deregistered_or_draining_and_back(
    three: Regions, connect: Callable[[Server], Stubs]
) -> None:
    a, b = connect(three["a"][0]), connect(three["b"][0])
    await register(a, "api", "10.0.0.1:80", instance_id="api-a")
    await register(b, "api", "10.0.1.1:80", instance_id="api-b")
    dns_port = port(three, "a")
    await answers_a(dns_port, "api.service.discovery.", {"10.0.0.1"})
    await answers_a(port(three, "c"), "api.service.b.discovery.", {"10.0.1.1"})  # b's record is at c too

    await register(a, "api", "10.0.0.1:80", instance_id="api-a", status=types_pb2.DRAINING)
    await answers_a(dns_port, "api.service.discovery.", {"10.0.1.1"})
    response = await dnsq.udp(dns_port, "api.service.discovery.", "SRV")
    assert [r[0] for r in dnsq.srv(response)] == [1]  # b, a's nearest peer
    await register(a, "api", "10.0.0.1:80", instance_id="api-a", status=types_pb2.SERVING)
    await answers_a(dns_port, "api.service.discovery.", {"10.0.0.1"})

    await a.registry.Deregister(
        registry_pb2.DeregisterRequest(service="api", instance_id="api-a"), timeout=CALL_TIMEOUT
    )
    await answers_a(dns_port, "api.service.discovery.", {"10.0.1.1"})
    await register(a, "api", "10.0.0.3:80", instance_id="api-a2")
    await answers_a(dns_port, "api.service.discovery.", {"10.0.0.3"})


async def test_nxdomain_nodata_refused_and_the_soa(three: Regions, connect: Callable[[Server], Stubs]) -> None:
    a = connect(three["a"][0])
    await register(a, "quiet", "10.0.0.1:80", instance_id="q", status=types_pb2.DRAINING)
    await register(a, "web", "10.0.0.2:80", instance_id="w")
    dns_port = port(three, "a")
    await answers_a(dns_port, "web.service.discovery.", {"10.0.0.2"})

    unknown = await dnsq.udp(dns_port, "nope.service.discovery.")
    assert (dnsq.rcode(unknown), unknown.answer, dnsq.soa_in_authority(unknown)) == ("NXDOMAIN", [], True)
    soa = unknown.authority[0]
    assert soa.ttl == 5 and soa[0].minimum == 5  # negative answers are cached for the TTL
    # Known, nothing serving anywhere: NOERROR, no answers, the SOA.
    quiet = await dnsq.udp(dns_port, "quiet.service.discovery.")
    assert (dnsq.rcode(quiet), quiet.answer, dnsq.soa_in_authority(quiet)) == ("NOERROR", [], True)
    txt = await dnsq.udp(dns_port, "web.service.discovery.", "TXT")
    assert (dnsq.rcode(txt), txt.answer, dnsq.soa_in_authority(txt)) == ("NOERROR", [], True)
    assert dnsq.rcode(await dnsq.udp(dns_port, "web.service.nowhere.discovery.")) == "NXDOMAIN"
    assert dnsq.rcode(await dnsq.udp(dns_port, "web.elsewhere.discovery.")) == "NXDOMAIN"
    apex = await dnsq.udp(dns_port, "discovery.", "SOA")
    assert [r.rdtype for r in apex.answer] == [dns_soa()]
    # Outside the domain: REFUSED, not authoritative, no recursion offered.
    out = await dnsq.udp(dns_port, "example.com.")
    assert dnsq.rcode(out) == "REFUSED" and out.answer == [] and not out.flags & 0x0400 and not out.flags & 0x0080

    text = await dnsq.dig(dns_port, "nope.service.discovery.")
    assert "status: NXDOMAIN" in text and re.search(r"AUTHORITY SECTION:\ndiscovery\.\s+5\s+IN\s+SOA", text), text
    text = await dnsq.dig(dns_port, "quiet.service.discovery.")
    assert "status: NOERROR" in text and "ANSWER: 0" in text and "AUTHORITY: 1" in text, text
    text = await dnsq.dig(dns_port, "www.example.com.")
    assert "status: REFUSED" in text, text


def dns_soa() -> int:
    import dns.rdatatype

    return int(dns.rdatatype.SOA)


async def register_many(stubs: Stubs, service: str, count: int) -> None:
    instances = [instance(service, f"10.1.{i // 250}.{i % 250 + 1}:8080", instance_id=f"n{i}") for i in range(count)]
    await stubs.registry.RegisterBatch(registry_pb2.RegisterBatchRequest(instances=instances), timeout=CALL_TIMEOUT)


async def test_truncation_then_tcp_with_300_endpoints_and_edns_sizes(
    three: Regions, connect: Callable[[Server], Stubs]
) -> None:
    a = connect(three["a"][0])
    await register_many(a, "big", 300)
    await register_many(a, "mid", 40)  # about 700 bytes of A records: over 512, under 1232
    dns_port = port(three, "a")

    async def big_over_tcp() -> bool:
        return len(dnsq.addresses(await dnsq.tcp(dns_port, "big.service.discovery."))) == 300

    await eventually(big_over_tcp, timeout=10)
    plain = await dnsq.udp(dns_port, "big.service.discovery.")
    assert plain.flags & 0x0200 and plain.answer == []  # TC: ask again over TCP
    edns = await dnsq.udp(dns_port, "big.service.discovery.", edns=0, payload=4096)
    assert edns.flags & 0x0200 and edns.answer == []  # over our 1232-byte UDP maximum too
    srv = await dnsq.tcp(dns_port, "big.service.discovery.", "SRV")
    assert len(dnsq.srv(srv)) == 300 and sum(len(r) for r in srv.additional if r.rdtype == 1) == 300

    mid_plain = await dnsq.udp(dns_port, "mid.service.discovery.")
    assert mid_plain.flags & 0x0200
    mid_edns = await dnsq.udp(dns_port, "mid.service.discovery.", edns=0, payload=1232)
    assert not mid_edns.flags & 0x0200 and len(dnsq.addresses(mid_edns)) == 40
    mid_small = await dnsq.udp(dns_port, "mid.service.discovery.", edns=0, payload=600)
    assert mid_small.flags & 0x0200  # the client's buffer size is honoured

    # dig sees TC over UDP, retries over TCP by itself and gets all 300.
    text = await dnsq.dig(dns_port, "+noedns", "+ignore", "big.service.discovery.")
    assert re.search(r"flags: qr aa tc rd;", text), text
    assert len((await dnsq.dig(dns_port, "+short", "big.service.discovery.")).split()) == 300


async def test_stale_replicas_are_served_until_max_staleness_drops_them(
    regions: Regions, region_etcds: dict[str, EtcdProcess], connect: Callable[[Server], Stubs]
) -> None:
    # a drops replicas stale for over 2 s; b serves them however old.
    await regions.start(region_etcds, per_region=lambda r: {"max_staleness_seconds": 2.0} if r == "a" else {}, **DNS)
    await register(connect(regions["c"][0]), "only-c", "10.0.2.1:80", instance_id="c1")
    await answers_a(port(regions, "a"), "only-c.service.discovery.", {"10.0.2.1"})
    await answers_a(port(regions, "b"), "only-c.service.discovery.", {"10.0.2.1"})
    await regions.stop_server(regions["c"][0])  # c goes silent
    await answers_a(port(regions, "a"), "only-c.service.discovery.", set())
    nodata = await dnsq.udp(port(regions, "a"), "only-c.service.discovery.")
    assert dnsq.rcode(nodata) == "NOERROR"  # known, nothing servable: not NXDOMAIN
    stale = await dnsq.udp(port(regions, "b"), "only-c.service.c.discovery.")
    assert dnsq.addresses(stale) == {"10.0.2.1"}
    gone = await resolve(connect(regions["b"][0]), "only-c", scope=2)
    assert gone.stale or any(e.stale for e in gone.endpoints)
