"""Who is calling: the identity in the caller's verified client certificate.

The identity is the certificate's one URI SAN, a SPIFFE ID of this server's trust domain
(``spiffe://<trust_domain>/<path>``), or the subject CN when the certificate has no URI SAN at
all. Refused (UNAUTHENTICATED, with advice in the message):

* several URI SANs: which one is the caller would be a guess, and a guess is an escalation;
* a URI SAN that is not a well-formed SPIFFE ID (``https://...``, ``spiffe://TD/`` with an empty
  or ``..`` path segment, a port, a query): falling back to the CN would let anyone who can get a
  certificate with an unrelated URI choose their identity through the CN;
* a SPIFFE ID (in the URI SAN, or a CN that looks like one) of another trust domain;
* a CN with characters that would make log lines ambiguous (control characters, spaces).

What gRPC (grpcio 1.85) puts in ``context.auth_context()`` for a verified client certificate,
measured in tests/integration/test_identity_context.py:

* ``peer_uri``: every URI SAN, in certificate order (absent without one);
* ``peer_spiffe_id``: only when there is exactly one URI SAN and it is a spiffe:// URI;
* ``x509_subject_alternative_name``: URI, DNS and IP SANs mixed, so not used for the identity;
* ``x509_common_name``, ``x509_subject``, ``x509_pem_cert`` (the leaf as PEM), and
  ``transport_security_type`` = ``ssl``.

The identity is read from ``peer_uri`` and ``x509_common_name`` (gRPC computed them from the
certificate it verified); the certificate serial, for the audit log, from ``x509_pem_cert``,
parsed once per distinct certificate (a bounded LRU: a busy server sees the same few
certificates on every call, and parsing costs far more than a dictionary lookup).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509

ANONYMOUS = "anonymous"
SERIAL_CACHE_SIZE = 1024

# SPIFFE ID rules (spiffe.io, "SPIFFE-ID" standard): lowercase trust domain of [a-z0-9.-_],
# path segments of [A-Za-z0-9.-_], no empty, "." or ".." segment, no port, query or fragment.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_CN = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: safe to log and to match
MAX_IDENTITY_LEN = 2048  # the SPIFFE standard's limit for a whole ID


class IdentityError(Exception):
    """The certificate verified but names no acceptable identity; the message says why and
    what to change (it goes to the client as UNAUTHENTICATED)."""


@dataclass(frozen=True)
class Caller:
    """The caller of one RPC: ``identity`` (SPIFFE ID or CN), the certificate ``serial`` (hex,
    uppercase, as ``openssl x509 -serial`` prints it; empty when unknown), the transport
    ``peer`` (``ipv4:10.0.0.1:53122``). ``anonymous`` on insecure servers."""

    identity: str
    serial: str
    peer: str
    anonymous: bool = False


def anonymous_caller(peer: str) -> Caller:
    """The caller on a server started with ``--insecure``: no certificate, no identity."""
    return Caller(ANONYMOUS, "", peer, anonymous=True)


def split_spiffe_id(value: str) -> tuple[str, str] | None:
    """``(trust_domain, path)`` of a well-formed SPIFFE ID (path without its leading ``/``),
    else None."""
    if not value.startswith("spiffe://") or len(value) > MAX_IDENTITY_LEN:
        return None
    domain, slash, path = value[len("spiffe://") :].partition("/")
    if not slash or not _TRUST_DOMAIN.fullmatch(domain) or not path:
        return None
    for segment in path.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            return None
    return domain, path


def valid_common_name(value: str) -> bool:
    """Whether ``value`` may be a CN identity: printable ASCII without spaces, bounded."""
    return 0 < len(value) <= MAX_IDENTITY_LEN and _CN.fullmatch(value) is not None


def check_spiffe_id(value: str, trust_domain: str, *, where: str) -> str:
    """``value`` if it is a SPIFFE ID of ``trust_domain``; else IdentityError saying why."""
    parts = split_spiffe_id(value)
    if parts is None:
        raise IdentityError(
            f"the client certificate's {where} {_shown(value)} is not a valid SPIFFE ID "
            f"(spiffe://{trust_domain}/<path>): issue the certificate with one spiffe:// URI SAN"
        )
    if parts[0] != trust_domain:
        raise IdentityError(
            f"the client certificate's {where} {_shown(value)} belongs to trust domain {parts[0]!r}, "
            f"not this server's {trust_domain!r}: use a certificate issued for spiffe://{trust_domain}/..."
        )
    return value


def caller_from_auth_context(auth: Mapping[str, Sequence[bytes]], peer: str, trust_domain: str) -> Caller:
    """The caller named by a verified client certificate (``context.auth_context()``), or
    IdentityError (UNAUTHENTICATED) when it names none this server accepts."""
    if not auth.get("x509_pem_cert") and not auth.get("x509_common_name") and not auth.get("peer_uri"):
        raise IdentityError("the call carries no client certificate: connect with mTLS (--tls-cert, --tls-key)")
    uris = [_text(u) for u in auth.get("peer_uri", ())]
    if len(uris) > 1:
        raise IdentityError(
            f"the client certificate has {len(uris)} URI SANs ({', '.join(_shown(u) for u in uris)}); "
            "an identity certificate must carry exactly one, its spiffe:// ID"
        )
    if uris:
        identity = check_spiffe_id(uris[0], trust_domain, where="URI SAN")
    else:
        names = auth.get("x509_common_name", ())
        if len(names) != 1 or not (cn := _text(names[0])):
            raise IdentityError(
                "the client certificate has neither a URI SAN nor a single subject CN: "
                "issue it with one spiffe:// URI SAN"
            )
        if cn.startswith("spiffe:"):
            identity = check_spiffe_id(cn, trust_domain, where="subject CN")
        elif not valid_common_name(cn):
            raise IdentityError(
                f"the client certificate's subject CN {_shown(cn)} has characters an identity may not "
                "have (spaces, control characters): issue it with a spiffe:// URI SAN"
            )
        else:
            identity = cn
    pems = auth.get("x509_pem_cert", ())
    serial = _serials.get(pems[0]) if pems else ""
    return Caller(identity, serial, peer)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _shown(value: str) -> str:
    """A certificate field quoted for a message: bounded, with control characters escaped."""
    return repr(value[:200] + ("..." if len(value) > 200 else ""))


class _SerialCache:
    """Certificate serials by PEM, least recently used forgotten first. Thread-safe: the
    lead may call from executor threads as well as the event loop."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, pem: bytes) -> str:
        with self._lock:
            serial = self._entries.get(pem)
            if serial is not None:
                self._entries.move_to_end(pem)
                return serial
        serial = serial_of(pem)
        with self._lock:
            self._entries[pem] = serial
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return serial

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def serial_of(pem: bytes) -> str:
    """The serial of a PEM certificate as uppercase hex; empty if it does not parse (gRPC
    verified it already: the serial is for the audit log, not for the decision)."""
    try:
        return format(x509.load_pem_x509_certificate(pem).serial_number, "X")
    except ValueError:
        return ""


_serials = _SerialCache(SERIAL_CACHE_SIZE)
