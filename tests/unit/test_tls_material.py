"""TLS material: what load_material accepts and refuses (with real certificates), and the
reload bookkeeping of ServerCertificates that needs no server."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from discovery.security.certs import CertificateAuthority, cert_pem, server_id
from discovery.security.tls import (
    EXPIRING,
    MaterialError,
    PeerMismatch,
    ServerCertificates,
    TlsFiles,
    check_peer,
    load_material,
)

SERVER = server_id("td", "eu-west")
NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    ca = CertificateAuthority.create(tmp_path / "ca")
    (tmp_path / "bundle.pem").write_bytes(ca.pem)
    return ca


def issue(ca: CertificateAuthority, tmp_path: Path, name: str = "server", **kw: object) -> TlsFiles:
    kw.setdefault("spiffe_id", SERVER)
    issued = ca.issue(out=tmp_path / name, **kw)  # type: ignore[arg-type]
    assert issued.cert_path is not None and issued.key_path is not None
    return TlsFiles(issued.cert_path, issued.key_path, tmp_path / "bundle.pem")


def test_good_material(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = issue(ca, tmp_path, days=30)
    m = load_material(files)
    leaf = x509.load_pem_x509_certificate(Path(files.cert).read_bytes())
    assert m.identity == SERVER
    assert m.serial == format(leaf.serial_number, "x")
    assert m.not_after == leaf.not_valid_after_utc
    assert (m.cert_chain, m.key, m.ca) == (
        Path(files.cert).read_bytes(),
        Path(files.key).read_bytes(),
        ca.pem,
    )
    assert b"PRIVATE" not in repr(m).encode() and "key=" not in repr(m)


def test_identity_is_the_common_name_without_a_spiffe_uri(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = issue(ca, tmp_path, spiffe_id="", common_name="etcd-client-eu")
    assert load_material(files).identity == "etcd-client-eu"


def test_key_of_another_certificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = issue(ca, tmp_path)
    other = issue(ca, tmp_path, "other")
    with pytest.raises(MaterialError, match="does not belong to the certificate") as e:
        load_material(files._replace(key=other.key))
    assert str(other.key) in str(e.value) and str(files.cert) in str(e.value)


def test_expired(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = issue(ca, tmp_path, not_before=NOW - datetime.timedelta(days=10), days=1)
    with pytest.raises(MaterialError, match=r"expired at .*issue a new one") as e:
        load_material(files)
    assert str(files.cert) in str(e.value)


def test_not_yet_valid(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = issue(ca, tmp_path, not_before=NOW + datetime.timedelta(days=1))
    with pytest.raises(MaterialError, match=r"not valid before .*clock"):
        load_material(files)
    later = NOW + datetime.timedelta(days=2)
    assert load_material(files, now=later).identity == SERVER


def test_signed_by_another_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = issue(CertificateAuthority.create(), tmp_path)
    with pytest.raises(MaterialError, match="is not signed by a CA in") as e:
        load_material(files)
    assert str(files.ca) in str(e.value)


def test_intermediate_in_the_chain_file(ca: CertificateAuthority, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    files = issue(CertificateAuthority(cert, key), tmp_path)
    with pytest.raises(MaterialError, match="append the intermediate"):
        load_material(files)  # the leaf alone does not reach the bundle
    Path(files.cert).write_bytes(Path(files.cert).read_bytes() + cert_pem(cert))
    assert load_material(files).identity == SERVER


def test_missing_and_not_pem(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = issue(ca, tmp_path)
    with pytest.raises(MaterialError, match=r"cannot read the CA bundle .*nowhere\.pem"):
        load_material(files._replace(ca=tmp_path / "nowhere.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(MaterialError, match=r"certificate .*junk\.pem holds no PEM certificate"):
        load_material(files._replace(cert=junk))
    with pytest.raises(MaterialError, match=r"private key .*junk\.pem holds no PEM private key"):
        load_material(files._replace(key=junk))


def test_initial_load_refuses_bad_material(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = issue(ca, tmp_path, not_before=NOW - datetime.timedelta(days=10), days=1)
    with pytest.raises(MaterialError, match="expired"):
        ServerCertificates(files)


def test_unchanged_files_are_not_reloaded(ca: CertificateAuthority, tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    certs = ServerCertificates(issue(ca, tmp_path), on_event=lambda k, m: events.append((k, m)))
    assert certs.check() is False
    assert certs.check() is False
    assert events == [] and certs.reload_failures == 0


def test_rotation_and_a_bad_key(ca: CertificateAuthority, tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    files = issue(ca, tmp_path)
    certs = ServerCertificates(files, on_event=lambda k, m: events.append((k, m)))
    first = certs.current.serial
    issue(ca, tmp_path)  # the same paths, a new certificate and key
    assert certs.check() is True
    second = certs.current.serial
    assert second != first and events[-1][0] == "reloaded" and second in events[-1][1]
    Path(files.key).write_bytes(Path(issue(ca, tmp_path, "other").key).read_bytes())
    assert certs.check() is False
    assert certs.current.serial == second and certs.reload_failures == 1
    kind, message = events[-1]
    assert kind == "rejected" and f"serial {second} stays in use" in message and "does not belong" in message
    assert certs.check() is False and certs.reload_failures == 1  # not retried until a file changes again
    certs.request_reload()  # SIGHUP: load again even though nothing changed
    assert certs.check() is False and certs.reload_failures == 2


def test_expiring_warns_once(ca: CertificateAuthority, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    events: list[tuple[str, str]] = []
    caplog.set_level(logging.WARNING, "discovery.security.tls")
    certs = ServerCertificates(issue(ca, tmp_path, days=3), on_event=lambda k, m: events.append((k, m)))
    for _ in range(3):
        certs.check()
    certs.request_reload()
    certs.check()
    assert [k for k, _ in events] == [EXPIRING]
    assert "expires in 2d" in events[0][1] and certs.current.serial in events[0][1]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    issue(ca, tmp_path, days=2)  # a new certificate, expiring too: warned about once as well
    assert certs.check() is True
    assert [k for k, _ in events] == [EXPIRING, "reloaded", EXPIRING]


def test_check_peer() -> None:
    check_peer((SERVER,), SERVER)
    expected = server_id("td", "us-east")
    with pytest.raises(PeerMismatch) as e:
        check_peer((SERVER,), expected, address="10.0.0.7:7400")
    assert str(e.value) == f"the server at 10.0.0.7:7400 presents {SERVER}, not {expected}: check --peer"
    with pytest.raises(PeerMismatch, match="presents no URI identity"):
        check_peer((), expected)
    with pytest.raises(PeerMismatch):
        check_peer((SERVER, expected), expected)  # two identities are none
