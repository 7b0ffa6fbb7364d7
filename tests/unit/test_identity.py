"""The caller's identity from an auth context shaped as grpcio 1.85 shapes it (measured in
tests/integration/test_identity_context.py), and the deny list through the policy."""

from __future__ import annotations

import pytest

from discovery.security import identity
from discovery.security.certs import CertificateAuthority
from discovery.security.identity import (
    ANONYMOUS,
    Caller,
    IdentityError,
    anonymous_caller,
    caller_from_auth_context,
    serial_of,
    split_spiffe_id,
)
from discovery.security.policy import Policy

TD = "example.org"
WEB = f"spiffe://{TD}/svc/web"
PEER = "ipv4:10.0.0.7:53122"


def _auth(uris: tuple[str, ...] = (), cn: str = "", pem: bytes = b"-") -> dict[str, list[bytes]]:
    auth: dict[str, list[bytes]] = {"transport_security_type": [b"ssl"], "x509_pem_cert": [pem]}
    if uris:
        auth["peer_uri"] = [u.encode() for u in uris]
    if cn:
        auth["x509_common_name"] = [cn.encode()]
    return auth


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca"))


def test_spiffe_id_with_its_serial(ca: CertificateAuthority) -> None:
    cert = ca.issue(spiffe_id=WEB).cert
    caller = caller_from_auth_context(_auth((WEB,), cn=WEB, pem=cert), PEER, TD)
    assert caller == Caller(WEB, serial_of(cert), PEER)
    assert not caller.anonymous
    assert caller.serial and caller.serial == caller.serial.upper()
    assert int(caller.serial, 16) > 0


def test_the_uri_wins_over_the_cn() -> None:
    assert caller_from_auth_context(_auth((WEB,), cn="something-else"), PEER, TD).identity == WEB


def test_cn_only() -> None:
    assert caller_from_auth_context(_auth(cn="legacy-batch"), PEER, TD).identity == "legacy-batch"


def test_cn_that_is_a_spiffe_id_is_checked_like_one() -> None:
    assert caller_from_auth_context(_auth(cn=WEB), PEER, TD).identity == WEB
    with pytest.raises(IdentityError, match="trust domain"):
        caller_from_auth_context(_auth(cn="spiffe://other.org/svc/web"), PEER, TD)


@pytest.mark.parametrize("cn", ["two words", "tab\there", "new\nline", "x" * 3000])
def test_cn_that_would_confuse_a_log_is_refused(cn: str) -> None:
    with pytest.raises(IdentityError, match="subject CN"):
        caller_from_auth_context(_auth(cn=cn), PEER, TD)


def test_two_uris_are_refused() -> None:
    with pytest.raises(IdentityError, match="2 URI SANs") as e:
        caller_from_auth_context(_auth((WEB, f"spiffe://{TD}/svc/admin")), PEER, TD)
    assert "exactly one" in str(e.value)


def test_foreign_trust_domain_is_refused() -> None:
    with pytest.raises(IdentityError) as e:
        caller_from_auth_context(_auth(("spiffe://other.org/svc/web",)), PEER, TD)
    assert "trust domain 'other.org'" in str(e.value) and f"spiffe://{TD}/" in str(e.value)


@pytest.mark.parametrize(
    "uri",
    [
        "https://example.org/svc/web",
        f"spiffe://{TD}",
        f"spiffe://{TD}/",
        f"spiffe://{TD}/svc//web",
        f"spiffe://{TD}/svc/../admin",
        f"spiffe://{TD}/svc/web/",
        f"spiffe://{TD}:443/svc/web",
        f"spiffe://{TD}/svc/web?x=1",
        f"spiffe://{TD.upper()}/svc/web",
        f"SPIFFE://{TD}/svc/web",
    ],
)
def test_malformed_or_non_spiffe_uri_is_refused_without_falling_back_to_the_cn(uri: str) -> None:
    with pytest.raises(IdentityError, match="not a valid SPIFFE ID"):
        caller_from_auth_context(_auth((uri,), cn="admin"), PEER, TD)


def test_no_certificate_at_all() -> None:
    with pytest.raises(IdentityError, match="no client certificate"):
        caller_from_auth_context({}, PEER, TD)


def test_refusal_quotes_hostile_values_safely() -> None:
    hostile = "https://x/\x1b[31mred" + "a" * 500
    with pytest.raises(IdentityError) as e:
        caller_from_auth_context(_auth((hostile,)), PEER, TD)
    assert "\x1b" not in str(e.value) and len(str(e.value)) < 500


def test_split_spiffe_id() -> None:
    assert split_spiffe_id(WEB) == (TD, "svc/web")
    assert split_spiffe_id(f"spiffe://{TD}/a/b.c/d_e-f") == (TD, "a/b.c/d_e-f")
    assert split_spiffe_id("spiffe://td") is None


def test_serials_are_parsed_once_per_certificate(ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch) -> None:
    cert = ca.issue(spiffe_id=WEB).cert
    calls: list[bytes] = []
    real = identity.serial_of

    def counting(pem: bytes) -> str:
        calls.append(pem)
        return real(pem)

    monkeypatch.setattr(identity, "serial_of", counting)
    identity._serials.clear()
    for _ in range(100):
        caller_from_auth_context(_auth((WEB,), pem=cert), PEER, TD)
    assert calls == [cert]


def test_the_serial_cache_is_bounded(ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "_serials", identity._SerialCache(3))
    for i in range(10):
        caller_from_auth_context(_auth((WEB,), pem=f"not a pem {i}".encode()), PEER, TD)
    assert len(identity._serials) == 3


def test_unparseable_pem_gives_an_empty_serial_not_a_failure() -> None:
    assert caller_from_auth_context(_auth((WEB,), pem=b"garbage"), PEER, TD).serial == ""


def test_anonymous_caller() -> None:
    assert anonymous_caller(PEER) == Caller(ANONYMOUS, "", PEER, anonymous=True)


def test_deny_list_refuses_a_valid_identity() -> None:
    svc = f"spiffe://{TD}/svc"
    policy = Policy.parse(
        f"""
        deny = ["{svc}/retired", "{svc}/legacy/*"]
        [[grant]]
        identity = "{svc}/*"
        read = ["*"]
        """,
        "policy.toml",
    )
    retired = caller_from_auth_context(_auth((f"spiffe://{TD}/svc/retired",)), PEER, TD).identity
    assert policy.denied(retired) and policy.grants_for(retired) is None
    assert policy.denied(f"spiffe://{TD}/svc/legacy/batch")
    assert not policy.denied(WEB) and policy.grants_for(WEB) is not None
