"""Pure pieces of the HTTP door fixed in review: the resume position when both
``Last-Event-ID`` and ``?since=`` are given, the peer's form for IPv6, and event-stream
instances carried with the status they are served as."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from discovery.errors import InvalidArgument
from discovery.http.auth import RequestContext, peer_of
from discovery.http.events import _as_served, _since
from discovery_pb.v1.types_pb2 import NOT_SERVING, SERVING, Change, CheckResult, Instance


def test_last_event_id_wins_over_since() -> None:
    # A page that opened ?since=5 reconnects to the same URL with its later position.
    request = make_mocked_request("GET", "/v1/events?since=5", headers={"Last-Event-ID": "9"})
    assert _since(request) == 9
    request = make_mocked_request("GET", "/v1/events?since=12", headers={"Last-Event-ID": "9"})
    assert _since(request) == 9  # the browser's position, even when it is the lower one
    assert _since(make_mocked_request("GET", "/v1/events?since=5", headers={"Last-Event-ID": ""})) == 5
    # Both are still checked: a bad since is refused even beside a good Last-Event-ID.
    with pytest.raises(InvalidArgument) as raised:
        _since(make_mocked_request("GET", "/v1/events?since=x", headers={"Last-Event-ID": "9"}))
    assert raised.value.field == "since"


class _Transport:
    def __init__(self, peername: Any) -> None:
        self._peername = peername

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peername if name == "peername" else default


@pytest.mark.parametrize(
    ("peername", "peer"),
    [
        (("10.0.0.1", 53122), "ipv4:10.0.0.1:53122"),
        (("::1", 53122, 0, 0), "ipv6:[::1]:53122"),
        (("2001:db8::7", 443, 0, 0), "ipv6:[2001:db8::7]:443"),
        (("::ffff:10.0.0.1", 80, 0, 0), "ipv6:[::ffff:10.0.0.1]:80"),
        (None, "http:unknown"),
    ],
)
def test_the_peer_has_grpcs_form(peername: Any, peer: str) -> None:
    assert peer_of(peername) == peer
    request = make_mocked_request("GET", "/v1/status", transport=_Transport(peername))
    assert RequestContext(request).peer() == peer


def test_a_change_of_a_failing_instance_is_carried_as_served() -> None:
    failing = Change(
        kind=Change.PUT,
        revision=7,
        service="db",
        instance_id="db-1",
        instance=Instance(
            service="db",
            instance_id="db-1",
            address="10.0.0.1:5432",
            status=SERVING,
            check_result=CheckResult(state=CheckResult.CRITICAL, reason="tcp connect refused"),
        ),
    )
    shown = _as_served(failing)
    assert shown.instance.status == NOT_SERVING
    assert shown.instance.check_result.reason == "tcp connect refused"
    assert failing.instance.status == SERVING  # the view's message is left as stored
    passing = Change(kind=Change.PUT, instance=Instance(status=SERVING))
    assert _as_served(passing) is passing
    deleted = Change(kind=Change.DELETE, instance_id="x")
    assert _as_served(deleted) is deleted
