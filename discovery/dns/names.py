"""The DNS names discovery answers, parsed from the right (docs/dns.md, "Names").

Below the domain (``discovery.`` by default), reading labels from the right:

1. the rightmost label is ``service``: no region (FAILOVER from this server's region); or
   ``instance``: an SRV target (rule 5); or else it names a region, and the label left of it
   must be ``service``;
2. left of ``service``: an optional tag filter ``<tag>._tag.`` at the very left;
3. then, if the labels end in ``_tcp``, the RFC 2782 form: ``_<service>._tcp``, where the first
   label carries the underscore and the service is every label up to ``_tcp``;
4. else the labels are the service name itself, dots included.

Service names are lowercase letter/digit/hyphen labels that never begin with ``_``, so
``_tag``, ``_tcp`` and the underscore of ``_<service>`` can never be part of a name, and the
fixed labels on the right (``service``, a region, ``instance``) are found before the
variable-length service: no name has two readings.

5. SRV targets: ``<id>.<service>.<region>.instance.<domain>``: one label for the instance id
   (``instance_label``), one for the region, the service between them.

This module is pure (no dnspython): names arrive as lowercase text labels relative to the
domain.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from enum import Enum

from discovery.errors import InvalidArgument
from discovery.model import validate_service

SERVICE = "service"
INSTANCE = "instance"
TAG = "_tag"
TCP = "_tcp"
MAX_LABEL = 63

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TAG_LABEL = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # tags may end in '-'; DNS allows it
_READABLE = re.compile(r"[^a-z0-9]+")
_HASH_CHARS = 13  # 65 bits of SHA-256 in base32
_READABLE_MAX = MAX_LABEL - 2 - _HASH_CHARS


class Kind(Enum):
    """What a name that is not a service or an instance is."""

    APEX = "apex"  # the domain itself: it has the SOA
    EMPTY = "empty"  # exists only as a parent of names (``service.discovery.``): no records
    UNKNOWN = "unknown"  # no such name: NXDOMAIN


@dataclass(frozen=True, slots=True)
class ServiceName:
    service: str
    region: str = ""  # "": FAILOVER from the server's own region
    tag: str = ""  # "": no tag filter
    srv_only: bool = False  # the RFC 2782 form: only SRV records live there


@dataclass(frozen=True, slots=True)
class InstanceName:
    service: str
    region: str
    label: str  # instance_label(instance_id)


Parsed = ServiceName | InstanceName | Kind


def parse(labels: tuple[str, ...]) -> Parsed:
    """``labels``: the query name below the domain, lowercased, leftmost first."""
    if not labels:
        return Kind.APEX
    if len(labels) == 1:
        return Kind.EMPTY  # "service", "instance" or a region: parents of real names
    last = labels[-1]
    if last == INSTANCE:
        return _instance(labels[:-1])
    if last == SERVICE:
        region, rest = "", labels[:-1]
    elif labels[-2] == SERVICE and _LABEL.fullmatch(last):
        region, rest = last, labels[:-2]
        if not rest:
            return Kind.EMPTY  # service.<region>.discovery.
    else:
        return Kind.UNKNOWN
    return _service(rest, region)


def _service(rest: tuple[str, ...], region: str) -> Parsed:
    """``[<tag>._tag.](<service> | _<service>._tcp)``: the labels left of ``service``."""
    tag = ""
    if len(rest) >= 2 and rest[1] == TAG:
        tag, rest = rest[0], rest[2:]
        if not _TAG_LABEL.fullmatch(tag) or not rest:
            return Kind.UNKNOWN
    srv_only = False
    if rest[-1] == TCP:
        srv_only, rest = True, rest[:-1]
        if not rest:
            return Kind.EMPTY if not tag else Kind.UNKNOWN  # _tcp.service.discovery.
        first = rest[0]
        if len(first) < 2 or not first.startswith("_"):
            return Kind.UNKNOWN
        rest = (first[1:], *rest[1:])
    service = ".".join(rest)
    if not _valid_service(service):
        return Kind.UNKNOWN
    return ServiceName(service, region, tag, srv_only)


def _instance(labels: tuple[str, ...]) -> Parsed:
    """``<id>.<service...>.<region>`` (``instance`` already taken off the right)."""
    if len(labels) < 3:
        return Kind.UNKNOWN
    label, region, service = labels[0], labels[-1], ".".join(labels[1:-1])
    if not _LABEL.fullmatch(label) or not _LABEL.fullmatch(region) or not _valid_service(service):
        return Kind.UNKNOWN
    return InstanceName(service, region, label)


def _valid_service(name: str) -> bool:
    try:
        validate_service(name)
    except InvalidArgument:
        return False
    return True


def instance_label(instance_id: str) -> str:
    """The DNS label of an instance id in SRV target names.

    An id that is already a lowercase DNS label without ``--`` is its own label
    (``web-1``). Any other id (upper case, ``.``, ``_``, ``:``, longer than 63) becomes a
    readable part (lowercased, each run of other characters one ``-``, at most 48
    characters) then ``--`` then 13 base32 characters of the SHA-256 of the id
    (``10.0.0.1-80`` gives ``10-0-0-1-80--`` and a hash). Labels of the first kind never
    hold ``--`` and labels of the second always do, so the two kinds cannot collide; two
    encoded ids collide only if 65 bits of their hashes do.
    """
    if _LABEL.fullmatch(instance_id) and "--" not in instance_id:
        return instance_id
    readable = _READABLE.sub("-", instance_id.lower()).strip("-")[:_READABLE_MAX].rstrip("-") or "x"
    digest = base64.b32encode(hashlib.sha256(instance_id.encode()).digest()).decode().lower()
    return f"{readable}--{digest[:_HASH_CHARS]}"


def target_labels(service: str, region: str, instance_id: str) -> tuple[str, ...]:
    """The labels (below the domain) of an instance's SRV target: read back by ``parse``."""
    return (instance_label(instance_id), *service.split("."), region, INSTANCE)


def is_label(text: str) -> bool:
    """Whether ``text`` can be one label of a name (a region name over 63 characters cannot)."""
    return bool(_LABEL.fullmatch(text))
