"""etcd endpoints as the config gives them (``IPv4:PORT``, ``[IPv6]:PORT`` or ``NAME:PORT``)
and the addresses the etcd client dials.

One gRPC channel balances (round robin) over every address, so a name is resolved here,
off the event loop, into all its A and AAAA records, and the channel gets the addresses:
gRPC's own ``dns:`` target takes a single name, and a cluster is often given as one name per
member (``etcd-0.etcd.us-east.svc:2379,...``). The store resolves again periodically and
after a failure, and moves to a new channel when the answer changed (a member rescheduled
with a new address). A name that does not resolve is left out with a warning while another
endpoint still resolves; when none does, the error names them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from discovery.errors import StoreUnavailable
from discovery.model import split_address

__all__ = ["Endpoint", "Lookup", "Resolved", "parse", "resolve", "system_lookup", "target"]

# name -> its addresses (IPv4 or IPv6 text, no brackets); raises OSError when it does not resolve.
Lookup = Callable[[str], Awaitable[Sequence[str]]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str  # an IP address (IPv6 without brackets) or a DNS name
    port: int
    text: str  # as configured, for messages

    @property
    def literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Resolved:
    addresses: tuple[str, ...]  # "IP:PORT" / "[IPv6]:PORT", sorted, each once
    failures: tuple[str, ...]  # "NAME:PORT (reason)" of the names that did not resolve
    # Each endpoint's addresses (a name that failed this time: those it had, if any).
    by_endpoint: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def parse(endpoints: Sequence[str], field: str = "etcd") -> tuple[Endpoint, ...]:
    """Check each ``HOST:PORT``; InvalidArgument names ``field`` and the endpoint."""
    parsed = []
    for text in endpoints:
        host, port = split_address(text, field)
        parsed.append(Endpoint(host[1:-1] if host.startswith("[") else host, port, text))
    return tuple(parsed)


# Lookups under way, per event loop and name (a loop's futures are no use on another loop).
_inflight: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Future[Any]]] = (
    weakref.WeakKeyDictionary()
)


async def system_lookup(name: str) -> Sequence[str]:
    """Every address the system resolver (getaddrinfo: /etc/hosts, then DNS) gives ``name``,
    of the families this host has an address of (AI_ADDRCONFIG: no IPv6 answers to dial on an
    IPv4-only host). asyncio runs it in a thread, so a slow DNS server never blocks the event
    loop; a timeout cannot stop that thread, so while one lookup of a name is still running, a
    new ask joins it rather than taking another thread (a hung resolver would fill the pool)."""
    loop = asyncio.get_running_loop()
    running = _inflight.setdefault(loop, {})
    pending = running.get(name)
    if pending is None:
        pending = asyncio.ensure_future(
            loop.getaddrinfo(name, None, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG)
        )
        running[name] = pending

        def finished(done: asyncio.Future[Any]) -> None:
            running.pop(name, None)
            if not done.cancelled():
                done.exception()  # retrieved here: every asker may have timed out by now

        pending.add_done_callback(finished)
    infos = await asyncio.shield(pending)
    return [str(info[4][0]) for info in infos]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(
    endpoints: Sequence[Endpoint],
    lookup: Lookup = system_lookup,
    timeout: float = 5.0,
    keep: Mapping[str, tuple[str, ...]] | None = None,
) -> Resolved:
    """The addresses of every endpoint (names resolved, together, each within ``timeout``).
    A name that does not resolve this time keeps the addresses ``keep`` has for it (a
    Kubernetes member's name is gone from DNS while its pod restarts: one failed answer must
    not take its address out of the channel and move every call). StoreUnavailable naming the
    names when no endpoint gives an address."""

    async def one(endpoint: Endpoint) -> tuple[str, ...] | str:
        if endpoint.literal:
            return (_address(endpoint.host, endpoint.port),)
        try:
            async with asyncio.timeout(timeout):
                found = await lookup(endpoint.host)
        except TimeoutError:
            return f"{endpoint.text} (no answer from the resolver within {timeout:g}s)"
        except OSError as exc:
            return f"{endpoint.text} ({exc.strerror or exc})"
        # A scoped IPv6 address (fe80::1%eth0) cannot go into a gRPC target: left out.
        usable = [a for a in found if "%" not in a]
        return tuple(_address(a, endpoint.port) for a in usable) or f"{endpoint.text} (no usable address)"

    answers = await asyncio.gather(*(one(e) for e in endpoints))
    kept = keep or {}
    by_endpoint = {
        e.text: answer if isinstance(answer, tuple) else kept[e.text]
        for e, answer in zip(endpoints, answers, strict=True)
        if isinstance(answer, tuple) or e.text in kept
    }
    addresses = sorted({a for found in by_endpoint.values() for a in found})
    failures = tuple(answer for answer in answers if isinstance(answer, str))
    if not addresses:
        raise StoreUnavailable(
            f"etcd endpoint {', '.join(failures)} does not resolve: check the name (and the resolver) in `etcd`"
            if len(failures) == 1
            else f"no etcd endpoint resolves: {', '.join(failures)}; check the names (and the resolver) in `etcd`"
        )
    return Resolved(tuple(addresses), failures, by_endpoint)


def target(addresses: Sequence[str]) -> str:
    """The gRPC target of one channel over ``addresses``. gRPC has a scheme per family and
    one target cannot mix them: with any IPv6 address, the IPv4 ones go as IPv4-mapped IPv6
    (``[::ffff:10.0.0.1]``), which gRPC dials as IPv4."""
    if all(not a.startswith("[") for a in addresses):
        return "ipv4:" + ",".join(addresses)
    mapped = [a if a.startswith("[") else "[::ffff:{}]:{}".format(*a.rsplit(":", 1)) for a in addresses]
    return "ipv6:" + ",".join(mapped)
