"""TLS material for the server's listeners and for the channels it dials to its peers.

``load_material`` reads a certificate, its key and a CA bundle and refuses, with advice that names
the file, anything gRPC would accept but that would fail in service: a key of another certificate,
an expired or not yet valid certificate, a chain that does not lead to the bundle.

``ServerCertificates`` serves that material through gRPC's dynamic server credentials and reloads
it when the files change (a poll, or ``request_reload`` on SIGHUP). A bad new file keeps the old
material in use: a half-finished rotation never takes a listener down.

``peer_uris`` and ``check_peer`` let a replication dialer see which identity a peer presents:
gRPC Python shows a client nothing of the server's certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from discovery.errors import InvalidArgument
from discovery.model import split_address

log = logging.getLogger(__name__)

EXPIRY_WARNING = datetime.timedelta(days=7)
_MAX_CHAIN = 10  # intermediates followed from the leaf to the bundle; real chains have one or two

# Events reported to ``on_event``: the lead engineer's audit log and metrics.
RELOADED, REJECTED, EXPIRING = "reloaded", "rejected", "expiring"


class TlsFiles(NamedTuple):
    """Paths of a certificate (the leaf, then any intermediates), its private key and a CA bundle."""

    cert: str | os.PathLike[str]
    key: str | os.PathLike[str]
    ca: str | os.PathLike[str]


class MaterialError(Exception):
    """TLS files that cannot serve: the message names the file and says what to do."""


class PeerMismatch(Exception):
    """A peer presented another identity than the one it was dialed as."""


@dataclass(frozen=True)
class Material:
    """Validated PEM material, ready for gRPC. The key never shows in a repr (logs)."""

    cert_chain: bytes = field(repr=False)
    key: bytes = field(repr=False)
    ca: bytes = field(repr=False)
    identity: str  # the leaf's single spiffe:// URI SAN, else its CN
    serial: str  # hex, as openssl prints it (without colons)
    not_after: datetime.datetime


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _read(path: str | os.PathLike[str], role: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise MaterialError(
            f"cannot read the {role} {path}: {exc.strerror or exc}: check the path and its permissions"
        ) from None


def _certificates(data: bytes, path: str | os.PathLike[str], role: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise MaterialError(
            f"the {role} {path} holds no PEM certificate (expected '-----BEGIN CERTIFICATE-----'): "
            "point the setting at the PEM file"
        )
    return certs


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _private_key(data: bytes, path: str | os.PathLike[str]) -> Any:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise MaterialError(
            f"the private key {path} is encrypted: gRPC needs it unencrypted (protect it with file permissions, 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise MaterialError(
            f"the private key {path} holds no PEM private key (expected '-----BEGIN PRIVATE KEY-----' or similar): "
            "point the key setting at the key file"
        ) from None


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _chain_reaches(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], roots: list[x509.Certificate]
) -> bool:
    """Whether the leaf is signed by a root, or by an intermediate that (through others) is."""
    current, unused = leaf, list(intermediates)
    for _ in range(_MAX_CHAIN):
        if any(_signed_by(current, root) for root in roots):
            return True
        parent = next((c for c in unused if _signed_by(current, c)), None)
        if parent is None:
            return False
        unused.remove(parent)
        current = parent
    return False


def _when(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%SZ")


def identity_of(cert: x509.Certificate) -> str:
    """The certificate's single spiffe:// URI SAN, else its common name (else "")."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        spiffe = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    except x509.ExtensionNotFound:
        spiffe = []
    if len(spiffe) == 1:
        return spiffe[0]
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


def uris_of(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.get_values_for_type(x509.UniformResourceIdentifier))


def load_material(files: TlsFiles, *, now: datetime.datetime | None = None) -> Material:
    """Read and check ``files``; raises MaterialError naming the file at fault and the fix."""
    now = now or _utcnow()
    chain_pem, key_pem, ca_pem = (
        _read(files.cert, "certificate"),
        _read(files.key, "private key"),
        _read(files.ca, "CA bundle"),
    )
    chain = _certificates(chain_pem, files.cert, "certificate")
    roots = _certificates(ca_pem, files.ca, "CA bundle")
    key = _private_key(key_pem, files.key)
    leaf = chain[0]
    serial = format(leaf.serial_number, "x")
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise MaterialError(
            f"the private key {files.key} does not belong to the certificate {files.cert} (serial {serial}): "
            "install the key issued with this certificate (write the new certificate and key together)"
        )
    if now >= leaf.not_valid_after_utc:
        raise MaterialError(
            f"the certificate {files.cert} (serial {serial}) expired at {_when(leaf.not_valid_after_utc)}: "
            "issue a new one"
        )
    if now < leaf.not_valid_before_utc:
        raise MaterialError(
            f"the certificate {files.cert} (serial {serial}) is not valid before {_when(leaf.not_valid_before_utc)} "
            f"(now {_when(now)}): check this machine's clock, or the issuer's"
        )
    if not _chain_reaches(leaf, chain[1:], roots):
        raise MaterialError(
            f"the certificate {files.cert} (serial {serial}, issuer '{leaf.issuer.rfc4514_string()}') is not signed by "
            f"a CA in {files.ca}: add its CA to that bundle, or append the intermediate certificates to {files.cert} "
            "after the leaf"
        )
    return Material(chain_pem, key_pem, ca_pem, identity_of(leaf), serial, leaf.not_valid_after_utc)


def _same(a: Material, b: Material) -> bool:
    return (a.cert_chain, a.key, a.ca) == (b.cert_chain, b.key, b.ca)


def _server_config(m: Material) -> Any:
    return grpc.ssl_server_certificate_configuration([(m.key, m.cert_chain)], root_certificates=m.ca)


_Signature = tuple[tuple[int, int, int] | None, ...]


def _signature(files: TlsFiles) -> _Signature:
    sig: list[tuple[int, int, int] | None] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            sig.append(None)  # missing mid-rotation: loading it says so
        else:
            sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(sig)


@dataclass(frozen=True)
class _Scan:
    signature: _Signature
    material: Material | None = None
    error: MaterialError | None = None


class ServerCertificates:
    """The server's certificate, key and client-CA bundle, reloaded when the files change.

    ``credentials()`` gives gRPC server credentials that require a client certificate and pick
    up each reload at the next handshake; connections already open keep theirs. The initial load
    raises MaterialError (a server must not start on bad material); a bad reload keeps the old
    material, logs a warning, counts ``reload_failures`` and reports ``rejected`` to ``on_event``.
    """

    def __init__(
        self,
        files: TlsFiles,
        *,
        poll_seconds: float = 5.0,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.files = files
        self.poll_seconds = poll_seconds
        self._on_event = on_event
        self._seen = _signature(files)
        material = load_material(files)
        # (generation, material, prepared gRPC configuration): replaced whole, read by the fetchers
        # in gRPC's threads, so they see one consistent triple without taking a lock.
        self._state: tuple[int, Material, Any] = (0, material, _server_config(material))
        self._reload_failures = 0
        self._warned_serial = ""
        self._force = False
        self._wake = asyncio.Event()
        self._warn_if_expiring()

    @property
    def current(self) -> Material:
        return self._state[1]

    @property
    def not_after(self) -> datetime.datetime:
        return self._state[1].not_after

    @property
    def reload_failures(self) -> int:
        return self._reload_failures

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for one ``add_secure_port``: call once per port, since each keeps track of
        which material it has handed to that port's listener."""
        generation, _, config = self._state
        served = [generation]
        lock = threading.Lock()

        def fetch() -> Any:
            # gRPC calls this before every handshake, in its own thread: no file IO here, only
            # hand over a configuration prepared by check(), once per generation (None keeps the
            # current one, and saves gRPC rebuilding its TLS context at every connection).
            try:
                gen, _, cfg = self._state
                with lock:
                    if gen == served[0]:
                        return None
                    served[0] = gen
                return cfg
            except Exception:  # an exception here would fail the handshake; keep serving instead
                return None

        return grpc.dynamic_ssl_server_credentials(config, fetch, require_client_authentication=True)

    def request_reload(self) -> None:
        """Load the files at the next poll even if they look unchanged, and poll now. Call it from
        the event loop's thread (``loop.add_signal_handler`` for SIGHUP)."""
        self._force = True
        self._wake.set()

    def check(self) -> bool:
        """Reload when a file changed (or a reload was requested); True when new material is in use."""
        force, self._force = self._force, False
        return self._apply(self._scan(force))

    async def run(self) -> None:
        """Poll every ``poll_seconds`` until cancelled; the file reading runs in a worker thread."""
        while True:
            self._wake.clear()
            force, self._force = self._force, False
            try:
                self._apply(await asyncio.to_thread(self._scan, force))
            except Exception:  # a bug must not stop the reloads
                log.exception("checking the TLS files failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)

    def _scan(self, force: bool) -> _Scan | None:
        # The signature is taken before the read: a change during the read shows at the next poll.
        signature = _signature(self.files)
        if signature == self._seen and not force:
            return None
        try:
            return _Scan(signature, material=load_material(self.files))
        except MaterialError as exc:
            return _Scan(signature, error=exc)

    def _apply(self, scan: _Scan | None) -> bool:
        if scan is None:
            self._warn_if_expiring()
            return False
        self._seen = scan.signature  # a rejected set is not retried until a file changes again
        generation, old, _ = self._state
        if scan.error is not None:
            self._reload_failures += 1
            message = f"new TLS files rejected, the certificate serial {old.serial} stays in use: {scan.error}"
            log.warning("%s", message)
            self._emit(REJECTED, message)
            return False
        new = scan.material
        assert new is not None
        if _same(new, old):
            return False
        self._state = (generation + 1, new, _server_config(new))
        message = f"TLS certificate reloaded: {new.identity} serial {new.serial}, valid until {_when(new.not_after)}"
        log.info("%s", message)
        self._emit(RELOADED, message)
        self._warn_if_expiring()
        return True

    def _warn_if_expiring(self) -> None:
        material = self.current
        left = material.not_after - _utcnow()
        if left >= EXPIRY_WARNING or self._warned_serial == material.serial:
            return
        self._warned_serial = material.serial
        if left.total_seconds() > 0:
            message = (
                f"the TLS certificate {self.files.cert} (serial {material.serial}) expires in "
                f"{left.days}d {left.seconds // 3600}h, at {_when(material.not_after)}: install a new one "
                "(it is reloaded without a restart)"
            )
        else:
            message = (
                f"the TLS certificate {self.files.cert} (serial {material.serial}) expired at "
                f"{_when(material.not_after)}: clients refuse it; install a new one"
            )
        log.warning("%s", message)
        self._emit(EXPIRING, message)

    def _emit(self, kind: str, message: str) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, message)
        except Exception:  # the listener's failure is its own; reloading goes on
            log.exception("the TLS %s event handler failed", kind)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Client credentials from the files as they are now: our certificate, key and the CA bundle
    that verifies servers. gRPC cannot reload these: rebuild the channel to rotate."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca, "CA bundle"),
        private_key=_read(files.key, "private key"),
        certificate_chain=_read(files.cert, "certificate"),
    )


def _client_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    # The identity is the URI SAN, not the name dialed: a load balancer's address is fine.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=os.fspath(files.ca))
    except (OSError, ssl.SSLError) as exc:
        raise MaterialError(f"cannot load the CA bundle {files.ca}: {exc}: check the path and that it is PEM") from None
    try:
        ctx.load_cert_chain(os.fspath(files.cert), os.fspath(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise MaterialError(
            f"cannot load the certificate {files.cert} with the key {files.key}: {exc}: check both paths and that the "
            "key belongs to the certificate"
        ) from None
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def peer_uris(address: str, files: TlsFiles, *, timeout: float) -> tuple[str, ...]:
    """The URI SANs of the leaf certificate the server at ``address`` (HOST:PORT) presents.

    gRPC Python exposes no peer certificate on the client side, so a replication dialer checks
    a peer's origin with this separate handshake (Python's ssl): the server's chain is verified
    against ``files.ca``, our certificate is presented (servers require client auth), the host
    name is not checked (the identity is the URI SAN). Raises MaterialError for our own files,
    OSError (ssl.SSLError included) when the handshake fails and TimeoutError after ``timeout``.
    """
    try:
        host, port = split_address(address, "peer address")
    except InvalidArgument as exc:
        raise ValueError(str(exc)) from None
    host = host.strip("[]")
    ctx = await asyncio.to_thread(_client_context, files)
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
            try:
                ssl_object = writer.get_extra_info("ssl_object")
                der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            finally:
                # Aborted, not closed: only the certificate was wanted, and a graceful TLS close
                # waits for the server's close_notify, which a gRPC server does not send
                # (uvloop waits for it up to 30 s; asyncio's loop did not wait).
                writer.transport.abort()
    except TimeoutError:
        raise TimeoutError(f"no TLS handshake with {address} within {timeout:g}s: is it up and reachable?") from None
    if not der:
        raise ssl.SSLError(f"the server at {address} presented no certificate")
    return uris_of(x509.load_der_x509_certificate(der))


def check_peer(uris: Sequence[str], expected: str, *, address: str = "the peer") -> None:
    """Raise PeerMismatch unless ``uris`` is exactly the one identity ``expected``."""
    if list(uris) == [expected]:
        return
    presents = ", ".join(uris) if uris else "no URI identity"
    raise PeerMismatch(f"the server at {address} presents {presents}, not {expected}: check --peer")
