"""DNS pure logic: the names read from the right, instance labels, the response rate limit,
the policy's [dns] table and the dns_* settings (docs/dns.md)."""

from __future__ import annotations

import re

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from discovery.config import ServerConfig
from discovery.dns import (
    Answers,
    DnsListener,
    InstanceName,
    Kind,
    ResponseRateLimit,
    ServiceName,
    Verdict,
    instance_label,
    parse,
)
from discovery.dns.names import target_labels
from discovery.errors import InvalidArgument
from discovery.model import MAX_INSTANCE_ID_LEN
from discovery.security.policy import Policy, PolicyError
from discovery.view import Record
from discovery_pb.v1.types_pb2 import Instance, Status


def labels(name: str) -> tuple[str, ...]:
    return tuple(name.split(".")) if name else ()


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("web.service", ServiceName("web")),
        ("web.service.eu-west", ServiceName("web", "eu-west")),
        ("pay.api.service", ServiceName("pay.api")),
        ("pay.api.service.eu-west", ServiceName("pay.api", "eu-west")),
        ("_web._tcp.service", ServiceName("web", srv_only=True)),
        ("_pay.api._tcp.service.eu-west", ServiceName("pay.api", "eu-west", srv_only=True)),
        ("canary._tag.web.service", ServiceName("web", tag="canary")),
        ("canary._tag._pay.api._tcp.service.b", ServiceName("pay.api", "b", "canary", srv_only=True)),
        # Keywords inside a service name: the fixed labels are taken from the right first.
        ("service.service", ServiceName("service")),
        ("a.service.service", ServiceName("a.service")),  # never "a" in a region named service
        ("web.service.eu-west.service", ServiceName("web.service.eu-west")),
        ("tag.service", ServiceName("tag")),
        ("x.tag.service", ServiceName("x.tag")),
        ("_tcp._tcp.service", ServiceName("tcp", srv_only=True)),  # service "tcp", RFC 2782 form
        ("tcp.service", ServiceName("tcp")),
        ("instance.service", ServiceName("instance")),
        ("service._tag.web.service", ServiceName("web", tag="service")),
        ("web-1.web.a.instance", InstanceName("web", "a", "web-1")),
        ("n1.pay.api.eu-west.instance", InstanceName("pay.api", "eu-west", "n1")),
        ("n1.service.a.instance", InstanceName("service", "a", "n1")),
        # Parents of real names: exist, hold nothing.
        ("", Kind.APEX),
        ("service", Kind.EMPTY),
        ("eu-west", Kind.EMPTY),
        ("service.eu-west", Kind.EMPTY),
        ("_tcp.service", Kind.EMPTY),
        # Nothing else exists.
        ("web", Kind.EMPTY),  # one label: could be a region
        ("web.other", Kind.UNKNOWN),
        ("web.service.eu_west", Kind.UNKNOWN),
        ("_web.service", Kind.UNKNOWN),  # an underscore without _tcp
        ("web._tcp.service", Kind.UNKNOWN),  # RFC 2782 needs _web
        ("__._tcp.service", Kind.UNKNOWN),
        ("_._tcp.service", Kind.UNKNOWN),
        ("_web._udp.service", Kind.UNKNOWN),
        ("canary._tag.service", Kind.UNKNOWN),
        ("canary._tag._tcp.service", Kind.UNKNOWN),
        ("Canary_x._tag.web.service", Kind.UNKNOWN),
        ("a._tag.b._tag.web.service", Kind.UNKNOWN),  # one tag at most
        ("web._tag.service", Kind.UNKNOWN),  # _tag needs a tag on its left
        ("-web.service", Kind.UNKNOWN),
        ("web..service", Kind.UNKNOWN),
        ("web.a.instance", Kind.UNKNOWN),  # id, service and region are needed
        ("Web_1.web.a.instance", Kind.UNKNOWN),  # labels are encoded: instance_label
        ("x.web.a_b.instance", Kind.UNKNOWN),
        ("\ufffd.service", Kind.UNKNOWN),
    ],
)
def test_names_are_read_from_the_right(name: str, parsed: object) -> None:
    assert parse(labels(name)) == parsed


def test_every_service_name_and_form_reads_back_as_itself() -> None:
    for service in ("web", "service", "a.service", "tcp", "tag", "instance", "x.y.z", "a-b.c-d"):
        for region in ("", "eu-west", "tcp"):
            suffix = ("service", region) if region else ("service",)
            plain = (*service.split("."), *suffix)
            assert parse(plain) == ServiceName(service, region)
            first, *rest = service.split(".")
            rfc = (f"_{first}", *rest, "_tcp", *suffix)
            assert parse(rfc) == ServiceName(service, region, srv_only=True)
            assert parse(("blue", "_tag", *plain)) == ServiceName(service, region, "blue")
            target = target_labels(service, region or "r", "Id_1")
            assert parse(target) == InstanceName(service, region or "r", instance_label("Id_1"))


@pytest.mark.parametrize("instance_id", ["web-1", "a", "0", "x" * 63, "abc-def"])
def test_an_id_that_is_a_plain_label_is_its_own_label(instance_id: str) -> None:
    assert instance_label(instance_id) == instance_id


@pytest.mark.parametrize(
    "instance_id",
    ["Web-1", "10.0.0.1-80", "a_b", "host:9", "x" * 64, "x" * MAX_INSTANCE_ID_LEN, "a--b", "ab-", "9.9.9.9-1"],
)
def test_any_other_id_is_encoded_into_a_valid_label_with_a_hash(instance_id: str) -> None:
    label = instance_label(instance_id)
    assert re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", label), label
    assert "--" in label and len(label) <= 63
    assert label == instance_label(instance_id)  # deterministic


def test_encoded_labels_never_collide_with_plain_ones_or_each_other() -> None:
    ids = ["Web-1", "web-1", "WEB-1", "web.1", "web_1", "web:1", "10.0.0.1-80", "10-0-0-1-80", "a--b", "a-b"]
    encoded = [instance_label(i) for i in ids]
    assert len(set(encoded)) == len(ids)
    assert instance_label("10.0.0.1-80").startswith("10-0-0-1-80--")


def test_the_rate_limit_answers_a_burst_then_slips_every_second_refusal_and_refills() -> None:
    now = [0.0]
    limit = ResponseRateLimit(10, 5, slip=2, clock=lambda: now[0])
    verdicts = [limit.check("192.0.2.1") for _ in range(9)]
    assert verdicts[:5] == [Verdict.ANSWER] * 5
    assert verdicts[5:] == [Verdict.DROP, Verdict.SLIP, Verdict.DROP, Verdict.SLIP]
    assert limit.check("198.51.100.1") is Verdict.ANSWER  # per network
    now[0] += 0.1  # one token back
    assert limit.check("192.0.2.1") is Verdict.ANSWER
    assert limit.check("192.0.2.1") is not Verdict.ANSWER
    now[0] += 10
    assert [limit.check("192.0.2.1") for _ in range(5)] == [Verdict.ANSWER] * 5  # never above the burst
    assert limit.check("192.0.2.1") is not Verdict.ANSWER
    assert (limit.dropped, limit.slipped) == (4, 2)  # the count of refusals restarts after an answer


def test_a_zero_rate_is_no_limit_and_the_table_of_sources_stays_bounded() -> None:
    off = ResponseRateLimit(0)
    assert all(off.check("192.0.2.1") is Verdict.ANSWER for _ in range(10_000))
    limit = ResponseRateLimit(1)
    for i in range(70_000):  # as many networks (/24s)
        limit.check(f"{10 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}.1")
    assert limit.sources <= 65_536


def test_the_policy_dns_table() -> None:
    policy = Policy.parse('[dns]\nvisible = ["web", "pay.*"]\n', "p.toml")
    assert [policy.dns_visible(s) for s in ("web", "pay.api", "pay", "webx", "secret")] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert not Policy.parse("", "p.toml").dns_visible("web")  # default: nothing shown
    assert Policy.allow_all().dns_visible("anything")  # --insecure
    assert Policy.parse('[dns]\nvisible = ["*"]\n', "p.toml").dns_visible("x.y")
    for text, problem in (
        ('[dns]\nshow = ["web"]\n', "unknown key 'show' in [dns]"),
        ('[dns]\nvisible = "web"\n', "[dns] key 'visible' must be an array of strings"),
        ('[dns]\nvisible = ["pay*"]\n', "ambiguous"),
        ('[dns]\nvisible = ["{name}"]\n', "[dns] key 'visible'"),
        ('dns = ["web"]\n', "[dns] must be a table"),
    ):
        with pytest.raises(PolicyError, match=re.escape(problem)):
            Policy.parse(text, "p.toml")


def test_the_dns_settings_are_validated() -> None:
    base = ServerConfig(region="a", insecure=True)
    assert base.validate().dns_listen == ""  # off by default
    base.__class__(**{**_fields(base), "dns_listen": "127.0.0.1:0"}).validate()
    for field, value, rule in (
        ("dns_listen", "nowhere", "HOST:PORT"),
        ("dns_domain", "bad_domain.", "DNS labels"),
        ("dns_domain", "", "DNS labels"),
        ("dns_ttl_seconds", -1, "from 0 to 86400"),
        ("dns_rate_limit", -1.0, ">= 0"),
    ):
        with pytest.raises(InvalidArgument, match=re.escape(rule)):
            ServerConfig(**{**_fields(base), field: value}).validate()
    assert ServerConfig(**{**_fields(base), "dns_domain": "Corp.Example"}).validate()


def _fields(config: ServerConfig) -> dict[str, object]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


class _View:
    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self.revision = 7

    def service(self, name: str) -> list[Record]:
        return [r for r in self.records if Instance.FromString(r.value).service == name]

    def service_generation(self, name: str) -> int:
        return len(self.records)


class _States:
    region = "a"
    peers = ("b", "c")

    def servable(self, region: str) -> bool:
        return True


def _record(service: str, address: str, region: str = "a", **fields: object) -> Record:
    instance = Instance(service=service, address=address, region=region, weight=5, status=Status.SERVING)
    for name, value in fields.items():
        setattr(instance, name, value)
    return Record(instance, 1, 0)


def _ask(answers: Answers, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return answers.answer(dns.message.from_wire(query.to_wire()))


def test_answers_leave_out_what_has_no_dns_form_and_never_give_a_wrong_one() -> None:
    long_service = ".".join(["s" * 60] * 3) + "." + "s" * 51  # 234 characters: no target name fits in 255
    records = [
        _record(long_service, "10.0.0.1:80", instance_id="i"),
        _record("web", "10.0.0.2:80", instance_id="ok"),
        _record("web", "10.0.0.3:80", region="r" * 64, instance_id="far"),
    ]
    answers = Answers(_View(records), _States(), domain="discovery.", ttl=5, visible=lambda s: True)
    # The long service resolves in A, but has no SRV target that fits: left out of SRV.
    assert [rd.to_text() for rd in _ask(answers, f"{long_service}.service.discovery.").answer[0]] == ["10.0.0.1"]
    none = _ask(answers, f"{long_service}.service.discovery.", "SRV")
    assert (none.rcode(), none.answer) == (dns.rcode.NOERROR, [])
    srv = _ask(answers, "web.service.discovery.", "SRV")
    assert [rd.target.to_text() for rd in srv.answer[0]] == ["ok.web.a.instance.discovery."]
    # A domain of its own choosing, in any case.
    other = Answers(_View(records), _States(), domain="Corp.Example", ttl=0, visible=lambda s: True)
    reply = _ask(other, "WEB.service.corp.example.")
    assert [rd.to_text() for rd in reply.answer[0]] == ["10.0.0.2"] and reply.answer[0].ttl == 0
    assert _ask(other, "web.service.discovery.").rcode() == dns.rcode.REFUSED
    assert _ask(answers, "web.service.discovery.", "ANY").answer[0].rdtype == dns.rdatatype.A


def test_rendered_answers_are_reused_with_the_query_id_and_spelling_until_the_records_change() -> None:
    records = [_record("web", "10.0.0.1:80", instance_id="w1")]
    view = _View(records)
    answers = Answers(view, _States(), domain="discovery.", ttl=5, visible=lambda s: True)
    listener = DnsListener(answers, "127.0.0.1:0", rate_limit=ResponseRateLimit(0))

    def ask(name: str) -> dns.message.Message:
        query = dns.message.make_query(name, "A", use_edns=0)
        wire = listener.respond(query.to_wire(), udp=True)
        assert wire is not None
        reply = dns.message.from_wire(wire)
        assert reply.id == query.id and reply.question[0].name.to_text() == name
        return reply

    first = ask("web.service.discovery.")
    again = ask("WeB.SERVICE.discovery.")
    assert listener.counters.cached == 1
    assert [rd.to_text() for rd in again.answer[0]] == [rd.to_text() for rd in first.answer[0]] == ["10.0.0.1"]
    assert again.answer[0].name.to_text() == "WeB.SERVICE.discovery."
    records.append(_record("web", "10.0.0.2:80", instance_id="w2"))  # a new generation
    assert {rd.to_text() for rd in ask("web.service.discovery.").answer[0]} == {"10.0.0.1", "10.0.0.2"}
    assert listener.counters.cached == 1
