"""Response rate limiting, so the DNS port cannot be used to amplify traffic at a spoofed
address nor be flooded into answering without bound (docs/dns.md, "Limits").

Sources are counted by network, as BIND's RRL counts them: an IPv4 address by its /24, an
IPv6 address by its /56 (an IPv4-mapped IPv6 address as IPv4). A spoofer picking random
addresses inside one network therefore shares one bucket, and a victim network receives at
most one bucket's worth however many of its addresses are named.

A token bucket per network: ``rate`` responses per second, ``burst`` at once. On top of it a
global bucket (``global_rate``, 16 times ``rate`` unless given) bounds what all networks
together get, so many sources cannot add up to an unbounded flood of answers. Past either, a
query is answered, every ``slip``-th time, by an empty truncated response (no larger than the
query: no amplification) so that a real client behind that address retries over TCP, which a
spoofer cannot; otherwise it is dropped. The listener keeps a second, separate limit for TCP
(``slip`` 0: a TCP query over it is refused), so a UDP flood in someone's name never shuts that
someone out of TCP.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from enum import Enum

MAX_SOURCES = 65_536  # buckets kept; past it the idlest half is forgotten (forgotten = full)
GLOBAL_FACTOR = 16  # the global budget, in per-network rates, when none is given
IPV4_PREFIX = 24
IPV6_PREFIX = 56


class Verdict(Enum):
    ANSWER = "answer"
    SLIP = "slip"  # answer with an empty TC response: a real client retries over TCP
    DROP = "drop"


def network(source: str) -> str:
    """The key ``source`` is counted under: its /24 (IPv4, as "a.b.c.") or /56 (IPv6, as the
    prefix's bytes in hex). Per packet, so string and byte work only: no ipaddress objects."""
    host = source.partition("%")[0]  # an IPv6 zone (fe80::1%eth0) is no part of the address
    if "." in host and ":" not in host:
        head, dot, _ = host.rpartition(".")
        return head + dot if dot else host
    try:
        packed = socket.inet_pton(socket.AF_INET6, host)
    except (OSError, ValueError):
        return host  # not an address (a Unix socket's name): counted as itself
    if packed[:12] == _V4_MAPPED:
        return network(socket.inet_ntop(socket.AF_INET, packed[12:]))
    return f"{packed[: IPV6_PREFIX // 8].hex()}/{IPV6_PREFIX}"


_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


class ResponseRateLimit:
    """``rate`` 0 turns limiting off (the global budget too)."""

    def __init__(
        self,
        rate: float,
        burst: float = 0.0,
        *,
        global_rate: float | None = None,
        slip: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, burst or rate)
        self.global_rate = GLOBAL_FACTOR * rate if global_rate is None else global_rate
        self._global_burst = max(1.0, self.global_rate)
        self._global = (self._global_burst, clock())
        self.slip = slip
        self._clock = clock
        self._buckets: dict[str, tuple[float, float, int]] = {}  # network -> (tokens, at, refused)
        self.dropped = 0
        self.slipped = 0
        self.over_global = 0  # refusals with tokens left for the network: the global budget's

    def check(self, source: str) -> Verdict:
        if not self.rate:
            return Verdict.ANSWER
        now = self._clock()
        key = network(source)
        tokens, at, refused = self._buckets.pop(key, (self.burst, now, 0))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        shared, shared_at = self._global
        shared = min(self._global_burst, shared + (now - shared_at) * self.global_rate)
        if tokens >= 1.0 and shared >= 1.0:
            self._global = (shared - 1.0, now)
            self._keep(key, (tokens - 1.0, now, 0))
            return Verdict.ANSWER
        self._global = (shared, now)
        if tokens >= 1.0:
            self.over_global += 1
        refused += 1
        self._keep(key, (tokens, now, refused))
        if self.slip and refused % self.slip == 0:
            self.slipped += 1
            return Verdict.SLIP
        self.dropped += 1
        return Verdict.DROP

    def _keep(self, key: str, bucket: tuple[float, float, int]) -> None:
        # Re-inserted at every query, so the dict's order is least recently seen first.
        self._buckets[key] = bucket
        if len(self._buckets) > MAX_SOURCES:
            for stale in list(self._buckets)[: MAX_SOURCES // 2]:
                del self._buckets[stale]

    @property
    def sources(self) -> int:
        """Networks with a bucket."""
        return len(self._buckets)
