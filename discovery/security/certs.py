"""A small certificate authority for development and tests: a CA, and certificates whose
identity is a SPIFFE ID in the URI SAN (what every listener reads the caller's identity from).

Production runs any SPIFFE-capable CA instead (docs/security.md); `discovery dev`, `discovery
certs` and the tests use this one. ``server_id`` is the one spelling of a server's identity.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
_BACKDATE = datetime.timedelta(minutes=5)  # clocks of the machines that check it may be behind


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM, and where they were written (if they were)."""

    cert: bytes
    key: bytes
    cert_path: Path | None = None
    key_path: Path | None = None


class CertificateAuthority:
    """A CA key and certificate. ``create`` makes one (in ``directory`` as ca.pem and
    ca-key.pem, the key readable by its owner only); ``load`` reads one back."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(
        cls, directory: Path | str | None = None, *, name: str = "discovery development CA", days: int = 3650
    ) -> CertificateAuthority:
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(cert, key)
        if directory is not None:
            ca.save(Path(directory))
        return ca

    @classmethod
    def load(cls, directory: Path | str) -> CertificateAuthority:
        directory = Path(directory)
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / CA_KEY}: expected an EC private key")
        return cls(cert, key)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CA_CERT).write_bytes(cert_pem(self.cert))
        _write_private(directory / CA_KEY, key_pem(self.key))

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def issue(
        self,
        *,
        spiffe_id: str = "",
        common_name: str = "",
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        days: float = 365,
        not_before: datetime.datetime | None = None,
        out: Path | str | None = None,
    ) -> Issued:
        """A certificate for client and server use. ``spiffe_id`` becomes the URI SAN (and the
        CN, unless ``common_name`` is given); ``uris`` adds further URI SANs (tests of refusal).
        With ``out`` (a path prefix), writes ``PREFIX.pem`` and ``PREFIX-key.pem``."""
        key = _new_key()
        start = not_before or (_now() - _BACKDATE)
        cn = common_name or spiffe_id or (dns[0] if dns else "discovery")
        names: list[x509.GeneralName] = []
        if spiffe_id:
            names.append(x509.UniformResourceIdentifier(spiffe_id))
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(cert_pem(cert), key_pem(key))
        if out is not None:
            prefix = Path(out)
            prefix.parent.mkdir(parents=True, exist_ok=True)
            cert_path, key_path = Path(f"{prefix}.pem"), Path(f"{prefix}-key.pem")
            cert_path.write_bytes(issued.cert)
            _write_private(key_path, issued.key)
            issued = Issued(issued.cert, issued.key, cert_path, key_path)
        return issued


def server_id(trust_domain: str, region: str) -> str:
    """The identity of every discovery server of ``region``: peers check it when they dial."""
    return f"spiffe://{trust_domain}/discovery/server/{region}"


def service_id(trust_domain: str, name: str) -> str:
    return f"spiffe://{trust_domain}/svc/{name}"
