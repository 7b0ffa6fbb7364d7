"""DNS: every program that can resolve a name can use discovery (docs/dns.md).

``names`` parses the names (read from the right) and encodes instance ids as labels,
``answers`` turns the view's records into DNS answers (the endpoints chosen by
``discovery.query.select``, as Resolve chooses them), ``ratelimit`` limits responses per
network and in all, ``listener`` serves UDP and TCP on the server's event loop. The server builds one
with ``dns_listener``.
"""

from collections.abc import Callable

from discovery.dns.answers import MAX_UDP_PAYLOAD, Answers, Records, Regions, make_response
from discovery.dns.listener import Counters, DnsListener, udp_size
from discovery.dns.names import InstanceName, Kind, ServiceName, instance_label, parse, target_labels
from discovery.dns.ratelimit import ResponseRateLimit, Verdict, network


def dns_listener(
    view: Records,
    states: Regions,
    *,
    listen: str,
    domain: str,
    ttl: int,
    rate_limit: float,
    visible: Callable[[str], bool],
) -> DnsListener:
    """The DNS port of one server (not bound until ``start()``)."""
    answers = Answers(view, states, domain=domain, ttl=ttl, visible=visible)
    return DnsListener(
        answers,
        listen,
        rate_limit=ResponseRateLimit(rate_limit),
        tcp_rate_limit=ResponseRateLimit(rate_limit, slip=0),
    )


__all__ = [
    "MAX_UDP_PAYLOAD",
    "Answers",
    "Counters",
    "DnsListener",
    "InstanceName",
    "Kind",
    "Records",
    "Regions",
    "ResponseRateLimit",
    "ServiceName",
    "Verdict",
    "dns_listener",
    "instance_label",
    "make_response",
    "network",
    "parse",
    "target_labels",
    "udp_size",
]
