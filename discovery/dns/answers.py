"""DNS answers from the view (docs/dns.md, "Semantics").

Which endpoints a name stands for is what Resolve would return: ``discovery.query.select``
with scope FAILOVER (the plain name) or the one region (the region form), so the serving
rule, staleness (``--max-staleness``) and failover order are the ones every other door uses.
This module only turns those records into DNS records. Everything here runs on the event
loop, synchronously, in time linear in the service's instances.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from discovery.dns.names import InstanceName, Kind, ServiceName, instance_label, is_label, parse, target_labels
from discovery.errors import InvalidArgument
from discovery.model import split_address
from discovery.query import Query, select
from discovery.view import Record
from discovery_pb.v1.lookup_pb2 import Scope
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.SRV import SRV

log = logging.getLogger(__name__)

IN = dns.rdataclass.IN
MAX_UDP_PAYLOAD = 1232  # what we advertise and the most we send over UDP (no fragmentation)
_SOA_TIMERS = (60, 60, 3600)  # refresh, retry, expire: no secondaries transfer this zone


class Records(Protocol):
    """What the answers read of the view (discovery.view.View)."""

    @property
    def revision(self) -> int: ...

    def service(self, name: str) -> Iterable[Record]: ...

    def service_generation(self, name: str) -> int: ...


class Regions(Protocol):
    """What the answers read of replication (discovery.replication.RegionStates)."""

    region: str
    peers: tuple[str, ...]

    def servable(self, region: str) -> bool: ...


def make_response(query: dns.message.Message) -> dns.message.Message:
    """The empty response to ``query`` every answer starts from: never padded (dnspython
    pads a response to 468 bytes when the query carries an EDNS PADDING option, RFC 8467:
    for encrypted transports, which this port is not; on UDP it would only amplify), and with
    EDNS our own buffer size, whatever the query's."""
    return dns.message.make_response(query, our_payload=MAX_UDP_PAYLOAD, pad=0)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """One record, decoded once per service generation, with its DNS data ready."""

    instance_id: str
    label: str  # instance_label(instance_id): its label in SRV target names
    address: dns.rdata.Rdata | None  # A or AAAA; None for a hostname
    srv: dns.rdata.Rdata | None  # None when no target name fits (too long)
    target: dns.name.Name | None  # the SRV target when it is ours (its A/AAAA goes in additional)


class _Generation:
    """What is decoded of one generation of a service's records: each record's DNS data, and
    which records an instance label names (built at the first instance query, then O(1))."""

    __slots__ = ("by_label", "by_record", "generation")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.by_record: dict[int, _Endpoint | None] = {}
        self.by_label: dict[tuple[str, str], list[Record]] | None = None


class Answers:
    """``visible(service)``: whether the policy lets DNS show it (DNS carries no identity)."""

    def __init__(
        self,
        view: Records,
        states: Regions,
        *,
        domain: str,
        ttl: int,
        visible: Callable[[str], bool],
    ) -> None:
        self._view = view
        self._states = states
        self.origin = dns.name.from_text(domain)
        self._ttl = ttl
        self._visible = visible
        self._rank = {states.region: 0} | {peer: i + 1 for i, peer in enumerate(states.peers)}
        self._decoded: dict[str, _Generation] = {}
        self._soa_mname = dns.name.Name((b"ns", *self.origin.labels))
        self._soa_rname = dns.name.Name((b"hostmaster", *self.origin.labels))

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """The response to a parsed query with exactly one question."""
        return self.respond(query)[0]

    def respond(self, query: dns.message.Message) -> tuple[dns.message.Message, str]:
        """The response, and the service it depends on ("" for none): the answer stays the
        same while ``token(service)`` does."""
        response = make_response(query)
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        if question.rdclass not in (IN, dns.rdataclass.ANY) or not qname.is_subdomain(self.origin):
            response.set_rcode(dns.rcode.REFUSED)  # not an open resolver
            return response, ""
        response.flags |= dns.flags.AA
        labels = tuple(label.decode("ascii", "replace").lower() for label in qname.relativize(self.origin).labels)
        parsed = parse(labels)
        service = ""
        if isinstance(parsed, ServiceName):
            service = parsed.service
            self._service(response, qname, qtype, parsed)
        elif isinstance(parsed, InstanceName):
            service = parsed.service
            self._instance(response, qname, qtype, parsed)
        elif parsed is Kind.APEX and qtype in (dns.rdatatype.SOA, dns.rdatatype.ANY):
            response.answer.append(self._soa())
        elif parsed is Kind.UNKNOWN:
            self._negative(response, dns.rcode.NXDOMAIN)
        else:
            self._negative(response, dns.rcode.NOERROR)
        return response, service

    def token(self, service: str) -> tuple[object, ...]:
        """Everything an answer about ``service`` depends on but the clock: its records (their
        generation, across regions), which regions may be served (``--max-staleness``) and
        whether the policy shows it."""
        states = self._states
        servable = tuple(states.servable(region) for region in states.peers)
        return (self._view.service_generation(service), servable, bool(service) and self._visible(service))

    # --- names ----------------------------------------------------------------------------

    def _service(self, response: dns.message.Message, qname: dns.name.Name, qtype: int, name: ServiceName) -> None:
        records = self._known(name.service)
        if not records or (name.region and name.region not in self._rank):
            self._negative(response, dns.rcode.NXDOMAIN)
            return
        chosen = self._select(name, records)
        endpoints = self._endpoints(name.service, chosen)
        want_srv = qtype in (dns.rdatatype.SRV,)
        want_a = not name.srv_only and qtype in (dns.rdatatype.A, dns.rdatatype.ANY)
        want_aaaa = not name.srv_only and qtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY)
        if want_srv:
            srvs = [e.srv for e in endpoints if e.srv is not None]
            if srvs:
                response.answer.append(dns.rrset.from_rdata_list(qname, self._ttl, srvs))
                for e in endpoints:
                    if e.srv is not None and e.target is not None and e.address is not None:
                        response.additional.append(dns.rrset.from_rdata_list(e.target, self._ttl, [e.address]))
        for wanted, rdtype in ((want_a, dns.rdatatype.A), (want_aaaa, dns.rdatatype.AAAA)):
            if wanted:
                # Hostname endpoints are left out: a CNAME cannot stand beside A records.
                rdatas = [e.address for e in endpoints if e.address is not None and e.address.rdtype == rdtype]
                if rdatas:
                    response.answer.append(dns.rrset.from_rdata_list(qname, self._ttl, rdatas))
        if not response.answer:
            self._negative(response, dns.rcode.NOERROR)

    def _instance(self, response: dns.message.Message, qname: dns.name.Name, qtype: int, name: InstanceName) -> None:
        """An SRV target's own A/AAAA. The name exists while the instance is one an SRV answer
        could name: visible, in a servable region, serving (the rule of ``discovery.query``,
        as for the service's names and Resolve) and registered by address. Otherwise
        NXDOMAIN; NODATA when it exists but has no record of the type asked."""
        candidates: list[Record] = []
        if self._visible(name.service):
            candidates = self._labelled(name.service, name.region, name.label)
        serving = self._select(ServiceName(name.service, name.region), candidates) if candidates else []
        addresses = [e.address for e in self._endpoints(name.service, serving) if e.address is not None]
        if not addresses:
            self._negative(response, dns.rcode.NXDOMAIN)
            return
        wanted = [a for a in addresses if qtype in (a.rdtype, dns.rdatatype.ANY)]
        if wanted:
            response.answer.append(dns.rrset.from_rdata_list(qname, self._ttl, wanted[:1]))
        else:
            self._negative(response, dns.rcode.NOERROR)

    def _known(self, service: str) -> list[Record]:
        """The service's records in every region and status; none when DNS may not show it."""
        if not self._visible(service):
            return []  # answered as if it did not exist: its existence is not shown either
        return list(self._view.service(service))

    def _labelled(self, service: str, region: str, label: str) -> list[Record]:
        """The records (any status) of ``service`` in ``region`` whose id has ``label``: a map
        built once per generation of the service's records, so an instance query is not a
        walk over every instance encoding each id."""
        generation = self._decoded_generation(service)
        if generation.by_label is None:
            records = list(self._view.service(service))
            by_label: dict[tuple[str, str], list[Record]] = {}
            for record, endpoint in zip(records, self._decode_all(generation, service, records), strict=True):
                if endpoint is not None:
                    by_label.setdefault((record.region, endpoint.label), []).append(record)
            generation.by_label = by_label
        return generation.by_label.get((region, label), [])

    def _select(self, name: ServiceName, records: list[Record]) -> list[Record]:
        states = self._states
        tags = frozenset((name.tag,)) if name.tag else frozenset()
        if not name.region:
            query = Query(name.service, scope=Scope.FAILOVER, tags=tags)
            return select(records, query, states.region, states.peers, states.servable)
        if name.region != states.region and not states.servable(name.region):
            return []
        mine = [r for r in records if r.region == name.region]
        return select(mine, Query(name.service, scope=Scope.LOCAL, tags=tags), name.region)

    # --- records --------------------------------------------------------------------------

    def _decoded_generation(self, service: str) -> _Generation:
        generation = self._view.service_generation(service)
        cached = self._decoded.get(service)
        if cached is None or cached.generation != generation:
            if len(self._decoded) > 4096:  # services come and go
                self._decoded.clear()
            cached = self._decoded[service] = _Generation(generation)
        return cached

    def _endpoints(self, service: str, records: Sequence[Record]) -> list[_Endpoint]:
        generation = self._decoded_generation(service)
        return [e for e in self._decode_all(generation, service, records) if e is not None]

    def _decode_all(self, generation: _Generation, service: str, records: Sequence[Record]) -> list[_Endpoint | None]:
        # Keyed by the record object: within one generation the view holds the same ones.
        by_record = generation.by_record
        out = []
        for record in records:
            key = id(record)
            if key not in by_record:
                by_record[key] = self._decode(service, record)
            out.append(by_record[key])
        return out

    def _decode(self, service: str, record: Record) -> _Endpoint | None:
        instance = record.instance
        try:
            host, port = split_address(instance.address)
        except InvalidArgument:
            return None  # validated when registered; a newer server's record we cannot read
        address: dns.rdata.Rdata | None = None
        target: dns.name.Name | None = None
        try:
            if host.startswith("["):
                address = _rdata(AAAA, dns.rdatatype.AAAA, str(ipaddress.IPv6Address(host[1:-1])))
            elif _is_ipv4(host):
                address = _rdata(A, dns.rdatatype.A, host)
            if address is not None:
                target = self._target(service, record.region, instance.instance_id)
                srv_target = target
            else:
                srv_target = dns.name.from_text(host)  # a hostname is its own target
        except dns.exception.DNSException as exc:
            log.debug("dns: %s/%s has no DNS form: %s", service, instance.instance_id, exc)
            return _Endpoint(instance.instance_id, instance_label(instance.instance_id), address, None, None)
        priority = self._rank.get(record.region, len(self._rank))
        srv = None
        if srv_target is not None:
            srv = _rdata(SRV, dns.rdatatype.SRV, priority, min(instance.weight, 65535), port, srv_target)
        return _Endpoint(instance.instance_id, instance_label(instance.instance_id), address, srv, target)

    def _target(self, service: str, region: str, instance_id: str) -> dns.name.Name | None:
        """None when the name would be too long (a service name near 253 characters) or the
        region is no DNS label: such endpoints are left out of SRV, never given a wrong name."""
        if not is_label(region):
            return None
        labels = [label.encode() for label in target_labels(service, region, instance_id)]
        try:
            return dns.name.Name((*labels, *self.origin.labels))
        except dns.name.NameTooLong:
            return None

    def _soa(self) -> dns.rrset.RRset:
        refresh, retry, expire = _SOA_TIMERS
        serial = self._view.revision & 0xFFFFFFFF
        soa = _rdata(
            SOA, dns.rdatatype.SOA, self._soa_mname, self._soa_rname, serial, refresh, retry, expire, self._ttl
        )
        return dns.rrset.from_rdata_list(self.origin, self._ttl, [soa])

    def _negative(self, response: dns.message.Message, rcode: dns.rcode.Rcode) -> None:
        """NXDOMAIN or NODATA, with the SOA that tells resolvers how long to cache it."""
        response.set_rcode(rcode)
        response.authority.append(self._soa())


_R = TypeVar("_R", bound=dns.rdata.Rdata)


def _rdata(kind: type[_R], *fields: object) -> _R:
    """An rdata of class IN built from its fields (dnspython's constructors are untyped)."""
    build: Any = kind
    return cast(_R, build(IN, *fields))


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True
