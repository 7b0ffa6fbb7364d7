"""Who is calling over HTTP, and the TLS context of the HTTPS listener.

The HTTPS listener asks every client for a certificate of the server's client CA during the
handshake (no certificate, no connection), then hands the verified certificate to the same
``Guard`` the gRPC servicers use, shaped as gRPC's ``auth_context`` (``peer_uri``,
``x509_common_name``, ``x509_pem_cert``): the identity, the policy's grants, the audit line
and the stream limits are decided by one piece of code for both doors.

The certificate, key and CA come from the server's ``ServerCertificates`` (discovery/security/
tls.py), which validates and reloads them; ``HttpsContext.run`` builds a new ``SSLContext``
off the event loop whenever that material changes, and every new handshake picks the latest
(``sni_callback`` runs for every ClientHello, with or without SNI).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID

from discovery.security.tls import Material, ServerCertificates, uris_of

log = logging.getLogger(__name__)

_CACHE_SIZE = 256  # distinct client certificates remembered (parsing costs ~100 us each)


class RequestContext:
    """The guard's view of one HTTP request (``discovery.security.guard.CallContext``)."""

    __slots__ = ("_auth", "_peer")

    def __init__(self, request: web.Request) -> None:
        peername = request.transport.get_extra_info("peername") if request.transport else None
        self._peer = peer_of(peername)
        self._auth: Mapping[str, Sequence[bytes]] = {}
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        if sslobj is not None:
            der = sslobj.getpeercert(binary_form=True)
            if der:
                self._auth = _auth_context(der)

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        return self._auth


def peer_of(peername: object) -> str:
    """A socket's peer in gRPC's form (``ipv4:10.0.0.1:53122``, ``ipv6:[::1]:53122``), so the
    audit log and ``Caller.peer`` read the same whichever door the call came through."""
    if not isinstance(peername, tuple) or len(peername) < 2:
        return "http:unknown"
    host, port = peername[0], peername[1]
    if ":" in str(host):
        return f"ipv6:[{host}]:{port}"
    return f"ipv4:{host}:{port}"


_parsed: OrderedDict[bytes, Mapping[str, Sequence[bytes]]] = OrderedDict()


def _auth_context(der: bytes) -> Mapping[str, Sequence[bytes]]:
    """What gRPC would report for this (already verified) certificate."""
    hit = _parsed.get(der)
    if hit is not None:
        _parsed.move_to_end(der)
        return hit
    cert = x509.load_der_x509_certificate(der)
    auth: dict[str, list[bytes]] = {"x509_pem_cert": [ssl.DER_cert_to_PEM_cert(der).encode()]}
    uris = uris_of(cert)
    if uris:
        auth["peer_uri"] = [u.encode() for u in uris]
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names:
        auth["x509_common_name"] = [str(n.value).encode() for n in names]
    _parsed[der] = auth
    while len(_parsed) > _CACHE_SIZE:
        _parsed.popitem(last=False)
    return auth


def build_context(material: Material) -> ssl.SSLContext:
    """A server context that presents ``material`` and requires a client certificate of its CA.
    Blocking (the key passes through a private temporary file: ``ssl`` loads keys only from
    files); called off the event loop."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=material.ca.decode("ascii", "replace"))
    with tempfile.TemporaryDirectory(prefix="discovery-https-") as directory:
        cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
        cert.write_bytes(material.cert_chain)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(material.key)
        ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class HttpsContext:
    """The listener's SSLContext, following the server's certificate reloads."""

    def __init__(self, certificates: ServerCertificates, poll_seconds: float) -> None:
        self._certificates = certificates
        self._poll = poll_seconds
        self._material = certificates.current
        self._current = build_context(self._material)
        self.context = build_context(self._material)  # the listener's; handshakes switch to _current
        self.context.sni_callback = self._select

    def _select(self, sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self._current

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            material = self._certificates.current
            if material is self._material:
                continue
            self._material = material  # a set that fails to load is not retried until it changes
            try:
                self._current = await asyncio.to_thread(build_context, material)
            except (OSError, ssl.SSLError) as exc:
                log.warning("HTTPS keeps its old certificate: the new one does not load (%s)", exc)
            else:
                log.info("HTTPS now serves the certificate with serial %s", material.serial)
