"""The DNS port's limits as pure logic (docs/dns.md, "Limits"): responses never padded and
advertising our buffer size, the rendered-answer cache keyed on what the answer depends on
and bounded in bytes, the rate limit per network with a global budget, and instance names
answering only for instances an SRV answer could name."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import pytest

import discovery.dns.listener as listener_module
from discovery.dns import (
    MAX_UDP_PAYLOAD,
    Answers,
    DnsListener,
    ResponseRateLimit,
    Verdict,
    instance_label,
    network,
    udp_size,
)
from discovery.view import Record
from discovery_pb.v1.types_pb2 import CheckResult, Instance, Status


class _View:
    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self.revision = 7
        self.generation = 1

    def service(self, name: str) -> list[Record]:
        return [r for r in self.records if Instance.FromString(r.value).service == name]

    def service_generation(self, name: str) -> int:
        return self.generation


class _States:
    region = "a"
    peers: tuple[str, ...] = ("b",)

    def __init__(self) -> None:
        self.stale: set[str] = set()

    def servable(self, region: str) -> bool:
        return region not in self.stale


def _record(
    service: str, address: str, instance_id: str, region: str = "a", *, status: int = Status.SERVING, check: int = 0
) -> Record:
    instance = Instance(
        service=service, address=address, region=region, weight=5, status=status, instance_id=instance_id
    )
    instance.check_result.state = check  # type: ignore[assignment]
    return Record(instance, 1, 0)


def _listener(records: list[Record], rate: float = 0) -> tuple[DnsListener, _View, _States]:
    view, states = _View(records), _States()
    answers = Answers(view, states, domain="discovery.", ttl=5, visible=lambda s: True)
    return DnsListener(answers, "127.0.0.1:0", rate_limit=ResponseRateLimit(rate)), view, states


def _udp(listener: DnsListener, query: dns.message.Message) -> dns.message.Message:
    wire = listener.respond(query.to_wire(), udp=True)
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.id == query.id
    return reply


def _padding(message: dns.message.Message) -> list[dns.edns.Option]:
    return [o for o in message.options if o.otype == dns.edns.OptionType.PADDING]


# --- 1. no padding, our buffer size --------------------------------------------------------


def test_a_padded_query_gets_an_unpadded_answer_that_advertises_our_buffer_size() -> None:
    listener, _, _ = _listener([_record("web", "10.0.0.1:80", "w1")])
    query = dns.message.make_query("web.service.discovery.", "A", use_edns=0, payload=4096, pad=8)
    assert _padding(dns.message.from_wire(query.to_wire()))  # it asks for padding (RFC 8467)
    for _ in range(2):  # rendered, then reused from the cache
        wire = listener.respond(query.to_wire(), udp=True)
        assert wire is not None
        reply = dns.message.from_wire(wire)
        assert [rd.to_text() for rd in reply.answer[0]] == ["10.0.0.1"]
        assert _padding(reply) == [] and len(wire) < 100  # dnspython alone would pad it to 468
        assert reply.payload == MAX_UDP_PAYLOAD  # ours, not the query's 4096
    assert listener.counters.cached == 1


@pytest.mark.parametrize(
    ("opcode", "edns", "rcode"),
    [(dns.opcode.NOTIFY, 0, dns.rcode.NOTIMP), (dns.opcode.QUERY, 1, dns.rcode.BADVERS)],
)
def test_refusals_are_not_padded_either(opcode: int, edns: int, rcode: int) -> None:
    listener, _, _ = _listener([])
    query = dns.message.make_query("web.service.discovery.", "A", use_edns=edns, payload=4096, pad=8)
    query.set_opcode(opcode)
    reply = _udp(listener, query)
    assert reply.rcode() == rcode
    assert _padding(reply) == [] and reply.payload == MAX_UDP_PAYLOAD


def test_a_slipped_response_is_unpadded_no_larger_than_the_query_and_advertises_our_size() -> None:
    listener, _, _ = _listener([])
    query = dns.message.make_query("web.service.discovery.", "A", use_edns=0, payload=4096, pad=8)
    data = query.to_wire()
    wire = listener.slip(data)
    assert wire is not None and len(wire) <= len(data)
    reply = dns.message.from_wire(wire)
    assert reply.flags & dns.flags.TC and reply.answer == []
    assert _padding(reply) == [] and reply.payload == MAX_UDP_PAYLOAD
    assert listener.slip(dns.message.make_response(query).to_wire()) is None  # never answer an answer


# --- 2. the cache ----------------------------------------------------------------------------


def test_the_cache_ignores_ids_cookies_padding_and_sizes_within_one_step() -> None:
    listener, _, _ = _listener([_record("web", "10.0.0.1:80", "w1")])
    for i in range(50):
        cookie = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, i.to_bytes(8, "big"))
        query = dns.message.make_query(
            "WEB.service.discovery." if i % 2 else "web.service.discovery.",
            "A",
            use_edns=0,
            payload=1232 + i,  # all in the top step
            options=[cookie],
            pad=8 * (i % 3),
            want_dnssec=bool(i % 5),
        )
        assert [rd.to_text() for rd in _udp(listener, query).answer[0]] == ["10.0.0.1"]
    assert listener.counters.cached == 49 and listener.cache_entries == 1
    # What the answer depends on is in the key: no EDNS, another step, TCP, RD, type.
    for query, udp in (
        (dns.message.make_query("web.service.discovery.", "A"), True),
        (dns.message.make_query("web.service.discovery.", "A", use_edns=0, payload=512), True),
        (dns.message.make_query("web.service.discovery.", "A", use_edns=0, payload=1100), True),
        (dns.message.make_query("web.service.discovery.", "A", use_edns=0), False),
        (dns.message.make_query("web.service.discovery.", "A", use_edns=0, payload=1232, flags=0), True),
        (dns.message.make_query("web.service.discovery.", "AAAA", use_edns=0, payload=1232), True),
    ):
        assert listener.respond(query.to_wire(), udp=udp) is not None
    assert listener.counters.cached == 49 and listener.cache_entries == 7


def test_what_the_cache_must_not_answer_takes_the_full_path() -> None:
    listener, _, _ = _listener([_record("web", "10.0.0.1:80", "w1")])
    query = dns.message.make_query("web.service.discovery.", "A", use_edns=0)
    assert _udp(listener, query).rcode() == dns.rcode.NOERROR
    notify = dns.message.make_query("web.service.discovery.", "A", use_edns=0)
    notify.set_opcode(dns.opcode.NOTIFY)
    assert _udp(listener, notify).rcode() == dns.rcode.NOTIMP
    v1 = dns.message.make_query("web.service.discovery.", "A", use_edns=1)
    assert _udp(listener, v1).rcode() == dns.rcode.BADVERS
    junk = listener.respond(query.to_wire() + b"\x00", udp=True)  # trailing bytes: FORMERR
    assert junk is not None and dns.message.from_wire(junk).rcode() == dns.rcode.FORMERR
    assert listener.counters.cached == 0


def test_the_cache_is_bounded_in_bytes_the_oldest_leaving_first(monkeypatch: pytest.MonkeyPatch) -> None:
    services = [f"s{i}" for i in range(200)]
    records = [_record(s, f"10.0.{i}.{j}:80", f"i{j}") for i, s in enumerate(services) for j in range(20)]
    listener, _, _ = _listener(records)
    monkeypatch.setattr(listener_module, "CACHE_BYTES", 20_000)
    for service in services:  # each answer about 400 bytes over TCP: 80 KB in all
        assert listener.respond(dns.message.make_query(f"{service}.service.discovery.", "A").to_wire(), udp=False)
        assert listener.cache_bytes <= 20_000
    assert 10 < listener.cache_entries < 100
    listener.respond(dns.message.make_query("s199.service.discovery.", "A").to_wire(), udp=False)
    assert listener.counters.cached == 1  # the newest stayed
    listener.respond(dns.message.make_query("s0.service.discovery.", "A").to_wire(), udp=False)
    assert listener.counters.cached == 1  # the oldest left


def test_udp_answers_are_rendered_for_the_step_the_buffer_size_allows() -> None:
    sizes = {None: 512, 100: 512, 512: 512, 767: 512, 768: 768, 1100: 1024, 1232: 1232, 65535: 1232}
    for payload, expected in sizes.items():
        query = dns.message.make_query("x.", "A", use_edns=None if payload is None else 0, payload=payload)
        assert udp_size(dns.message.from_wire(query.to_wire())) == expected, payload


# --- 3. the rate limit -----------------------------------------------------------------------


def test_sources_are_counted_by_network() -> None:
    assert network("192.0.2.1") == network("192.0.2.254") != network("192.0.3.1")
    assert network("::ffff:192.0.2.9") == network("192.0.2.1")
    assert network("2001:db8:0:1::1") == network("2001:db8:0:ff::2") != network("2001:db8:0:100::1")
    assert network("fe80::1%eth0") == network("fe80::2")
    now = [0.0]
    limit = ResponseRateLimit(10, 5, slip=0, clock=lambda: now[0])
    spoofed = [limit.check(f"192.0.2.{i}") for i in range(1, 21)]  # one address each: one network
    assert spoofed.count(Verdict.ANSWER) == 5
    assert limit.check("192.0.3.1") is Verdict.ANSWER
    v6 = [limit.check(f"2001:db8:0:{i:x}::1") for i in range(20)]
    assert v6.count(Verdict.ANSWER) == 5


def test_a_global_budget_bounds_what_many_networks_get_together() -> None:
    now = [0.0]
    limit = ResponseRateLimit(10, global_rate=25, slip=0, clock=lambda: now[0])
    verdicts = [limit.check(f"10.{i}.0.1") for i in range(100)]  # 100 networks, one query each
    assert verdicts.count(Verdict.ANSWER) == 25
    assert limit.over_global == 75
    now[0] += 1.0  # a second later: the global budget is back
    assert [limit.check(f"10.{i}.0.1") for i in range(200, 225)] == [Verdict.ANSWER] * 25
    assert limit.check("10.250.0.1") is Verdict.DROP
    assert ResponseRateLimit(10).global_rate == 160  # the default: 16 networks' worth


# --- 5 and 6. instance names -------------------------------------------------------------


def _ask(listener: DnsListener, name: str, rdtype: str = "A") -> dns.message.Message:
    return listener.answers.answer(dns.message.make_query(name, rdtype))


def test_an_instance_name_answers_only_while_the_instance_is_serving() -> None:
    serving = _record("web", "10.0.0.1:80", "w1")
    records = [serving, _record("web", "10.0.0.2:80", "w2")]
    listener, view, _ = _listener(records)
    name = "w2.web.a.instance.discovery."
    assert [rd.to_text() for rd in _ask(listener, name).answer[0]] == ["10.0.0.2"]
    for status, check in ((Status.SERVING, CheckResult.CRITICAL), (Status.DRAINING, 0), (Status.NOT_SERVING, 0)):
        records[1] = _record("web", "10.0.0.2:80", "w2", status=status, check=check)
        view.generation += 1
        srv = _ask(listener, "web.service.discovery.", "SRV")
        assert [rd.target.to_text() for rd in srv.answer[0]] == ["w1.web.a.instance.discovery."]
        reply = _ask(listener, name)
        assert (reply.rcode(), reply.answer) == (dns.rcode.NXDOMAIN, []), (status, check)
        assert reply.authority[0].rdtype == dns.rdatatype.SOA
    records[1] = _record("web", "10.0.0.2:80", "w2")  # serving again
    view.generation += 1
    assert [rd.to_text() for rd in _ask(listener, name).answer[0]] == ["10.0.0.2"]


def test_an_instance_name_is_nxdomain_when_nothing_answers_and_nodata_for_another_type() -> None:
    records = [
        _record("web", "10.0.0.1:80", "w1"),
        _record("web", "[2001:db8::1]:80", "w6"),
        _record("web", "db.example.com:80", "byname"),
        _record("web", "10.0.1.1:80", "far", region="b"),
    ]
    listener, _, states = _listener(records)
    answered = _ask(listener, "w1.web.a.instance.discovery.", "ANY")
    assert [rd.to_text() for rd in answered.answer[0]] == ["10.0.0.1"]
    for name, rdtype in (("w1", "AAAA"), ("w1", "SRV"), ("w6", "A")):
        nodata = _ask(listener, f"{name}.web.a.instance.discovery.", rdtype)
        assert (nodata.rcode(), nodata.answer) == (dns.rcode.NOERROR, []), (name, rdtype)
        assert nodata.authority[0].rdtype == dns.rdatatype.SOA
    assert [rd.to_text() for rd in _ask(listener, "w6.web.a.instance.discovery.", "AAAA").answer[0]] == ["2001:db8::1"]
    assert _ask(listener, "far.web.b.instance.discovery.").answer
    states.stale.add("b")  # past --max-staleness: as if not there
    for name in (
        "byname.web.a.instance.discovery.",  # a hostname is its own SRV target: no name of ours
        "far.web.b.instance.discovery.",
        "w1.web.b.instance.discovery.",  # another region's
        "nobody.web.a.instance.discovery.",
        "w1.other.a.instance.discovery.",  # another service's
    ):
        reply = _ask(listener, name)
        assert (reply.rcode(), reply.answer) == (dns.rcode.NXDOMAIN, []), name
        assert reply.authority[0].rdtype == dns.rdatatype.SOA


def test_an_instance_query_does_not_encode_every_id_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import discovery.dns.answers as answers_module

    records = [_record("web", f"10.0.{i >> 8}.{i & 255}:80", f"Id_{i}") for i in range(300)]
    listener, view, _ = _listener(records)
    calls = [0]
    real = instance_label

    def counting(instance_id: str) -> str:
        calls[0] += 1
        return real(instance_id)

    monkeypatch.setattr(answers_module, "instance_label", counting)
    name = f"{real('Id_7')}.web.a.instance.discovery."
    assert [rd.to_text() for rd in _ask(listener, name).answer[0]] == ["10.0.0.7"]
    first = calls[0]
    for _ in range(20):
        assert _ask(listener, name).answer
    assert calls[0] == first  # the map is built once per generation of the records
    view.generation += 1
    assert _ask(listener, name).answer and calls[0] > first
