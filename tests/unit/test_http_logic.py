"""Pure pieces of the HTTP door: the error table, parameter parsing, the per-region counts of
/v1/services, the resume revision of /v1/events, and the dev PKCS#12 bundle."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives.serialization import pkcs12

from discovery.devtools.cluster import admin_pkcs12
from discovery.errors import (
    AuditFailed,
    DiscoveryError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RevisionNotReached,
    ShuttingDown,
    StoreUnavailable,
    Unauthenticated,
)
from discovery.http.api import _counts, integer, only
from discovery.http.errors import from_error
from discovery.http.events import _since
from discovery.security.certs import CertificateAuthority
from discovery.view import Record
from discovery_pb.v1.types_pb2 import DRAINING, SERVING, Instance


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidArgument("scope", "unknown"), 400, "invalid_argument"),
        (Unauthenticated("who?"), 401, "unauthenticated"),
        (PermissionDenied("no"), 403, "permission_denied"),
        (NotFound("gone"), 404, "not_found"),
        (ResourceExhausted("streams", "too many", retry_after=2.4), 429, "resource_exhausted"),
        (RevisionNotReached("later"), 504, "revision_not_reached"),
        (ShuttingDown("bye"), 503, "shutting_down"),
        (AuditFailed("disk"), 503, "unavailable"),
        (StoreUnavailable("etcd"), 503, "unavailable"),
        (DiscoveryError("?"), 500, "internal"),
    ],
)
def test_every_error_has_its_status_and_a_json_body(error: DiscoveryError, status: int, code: str) -> None:
    response = from_error(error)
    assert response.status == status and response.content_type == "application/json"
    assert response.body is not None
    body = json.loads(bytes(response.body))  # type: ignore[arg-type]
    assert body["error"] == code and body["message"]
    if isinstance(error, ResourceExhausted):
        assert response.headers["Retry-After"] == "2" and body["limit"] == "streams"


def test_an_invalid_argument_names_the_parameter_the_caller_used() -> None:
    response = from_error(InvalidArgument("service", "'A B' is not a name"), rename={"service": "name"})
    body = json.loads(bytes(response.body))  # type: ignore[arg-type]
    assert body == {"error": "invalid_argument", "message": "name: 'A B' is not a name", "parameter": "name"}


def test_integers_and_unknown_parameters() -> None:
    request = make_mocked_request("GET", "/v1/services/web?min_revision=12&min_healthy=x&scop=all")
    assert integer(request, "min_revision", 0, 0) == 12
    assert integer(request, "absent", 7, 0) == 7
    with pytest.raises(InvalidArgument, match="min_healthy: 'x' is not a whole number"):
        integer(request, "min_healthy", 1, 1, 10)
    with pytest.raises(InvalidArgument) as raised:
        only(request, ("min_revision", "min_healthy"))
    assert raised.value.field == "scop"
    with pytest.raises(InvalidArgument, match="between 0 and 5"):
        integer(make_mocked_request("GET", "/?n=6"), "n", 0, 0, 5)


def test_the_resume_revision_comes_from_since_or_last_event_id() -> None:
    assert _since(make_mocked_request("GET", "/v1/events")) == 0
    assert _since(make_mocked_request("GET", "/v1/events?since=5")) == 5
    assert _since(make_mocked_request("GET", "/v1/events", headers={"Last-Event-ID": "9"})) == 9
    assert _since(make_mocked_request("GET", "/v1/events", headers={"Last-Event-ID": ""})) == 0
    for request, field in (
        (make_mocked_request("GET", "/v1/events?since=-1"), "since"),
        (make_mocked_request("GET", "/v1/events", headers={"Last-Event-ID": "12a"}), "Last-Event-ID"),
    ):
        with pytest.raises(InvalidArgument) as raised:
            _since(request)
        assert raised.value.field == field


def test_counts_per_region_and_status() -> None:
    def record(region: str, status: int) -> Record:
        return Record(Instance(service="web", region=region, address="10.0.0.1:80", status=status), 1, 0)

    counts = _counts([record("a", SERVING), record("a", DRAINING), record("b", SERVING), record("a", SERVING)])
    assert counts == {
        "instances": 4,
        "regions": {
            "a": {"instances": 3, "statuses": {"SERVING": 2, "DRAINING": 1}},
            "b": {"instances": 1, "statuses": {"SERVING": 1}},
        },
    }
    assert _counts([]) == {"instances": 0, "regions": {}}


def test_the_dev_admin_bundle_opens_with_its_password_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ca = CertificateAuthority.create(tmp_path / "ca")
    admin = ca.issue(spiffe_id="spiffe://t.local/admin")
    data = admin_pkcs12(admin.cert, admin.key, ca.pem, b"discovery")
    bundle = pkcs12.load_pkcs12(data, b"discovery")
    assert bundle.cert is not None and bundle.key is not None and len(bundle.additional_certs) == 1
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(data, b"wrong")
