"""One ADS stream's protocol rules, without gRPC: when to answer, ACK and NACK handling,
full sets for Listener and Cluster, unsubscribing. The builder is a small in-memory fake
here; tests/xds/test_protocol.py runs the same rules against real clients."""

from __future__ import annotations

from types import SimpleNamespace

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.rpc.status_pb2 import Status

from discovery.xds import CLUSTER, ENDPOINTS, LISTENER, Builder, StreamState, XdsHub, client_config
from discovery.xds.hub import build


class FakeBuilder:
    def __init__(self) -> None:
        self.generation: dict[str, int] = {}

    def get(self, type_url: str, name: str, perspective: str):
        if not Builder.valid(name):
            return None
        version = str(self.generation.get(name, 0))
        if type_url == LISTENER:
            return build(type_url, name, Listener(name=name))
        if type_url == CLUSTER:
            return build(type_url, name, Cluster(name=name))
        return build(type_url, name, ClusterLoadAssignment(cluster_name=name + "#" + version))


def stream() -> tuple[StreamState, FakeBuilder, XdsHub]:
    hub = XdsHub(None, SimpleNamespace(region="a"))  # type: ignore[arg-type]
    hub.builder = FakeBuilder()  # type: ignore[assignment]
    return StreamState(hub, "test"), hub.builder, hub


def responses(state: StreamState) -> list[DiscoveryResponse]:
    return [DiscoveryResponse.FromString(data) for data in state.take()]


def ack(response: DiscoveryResponse, names: list[str], error: str = "") -> DiscoveryRequest:
    request = DiscoveryRequest(
        type_url=response.type_url,
        resource_names=names,
        response_nonce=response.nonce,
        version_info=response.version_info,
    )
    if error:
        request.error_detail.CopyFrom(Status(code=3, message=error))
    return request


def names(response: DiscoveryResponse) -> list[str]:
    out = []
    for packed in response.resources:
        message = {LISTENER: Listener, CLUSTER: Cluster, ENDPOINTS: ClusterLoadAssignment}[response.type_url]()
        packed.Unpack(message)
        out.append(getattr(message, "name", "") or message.cluster_name)
    return out


def test_first_request_is_answered_and_an_ack_is_not() -> None:
    state, _, _ = stream()
    state.handle(DiscoveryRequest(type_url=LISTENER, resource_names=["web"]))
    (first,) = responses(state)
    assert first.type_url == LISTENER and names(first) == ["web"] and first.nonce and first.version_info
    state.handle(ack(first, ["web"]))
    assert not state.wake.is_set() and responses(state) == []


def test_a_push_sends_only_what_changed() -> None:
    state, builder, hub = stream()
    for type_url in (LISTENER, CLUSTER, ENDPOINTS):
        state.handle(DiscoveryRequest(type_url=type_url, resource_names=["web", "api"]))
    sent = responses(state)
    assert [r.type_url for r in sent] == [LISTENER, CLUSTER, ENDPOINTS]
    for response in sent:
        state.handle(ack(response, ["web", "api"]))
    hub.notify({"web"})  # nothing about web changed: nothing to send
    assert responses(state) == []
    builder.generation["web"] = 1
    hub.notify({"web"})
    (push,) = responses(state)
    assert push.type_url == ENDPOINTS and names(push) == ["web#1"]  # endpoints: only the changed one


def test_listeners_go_out_as_the_full_set_and_unknown_names_as_resource_errors() -> None:
    state, _, _ = stream()
    state.handle(DiscoveryRequest(type_url=LISTENER, resource_names=["web"]))
    (first,) = responses(state)
    state.handle(ack(first, ["web", "Not A Service!"]))  # a subscription change rides on an ACK
    (second,) = responses(state)
    assert names(second) == ["web"]  # the full set, not just the new name
    assert [e.resource_name.name for e in second.resource_errors] == ["Not A Service!"]
    assert second.resource_errors[0].error_detail.code == 5  # NOT_FOUND


def test_a_nack_is_recorded_and_not_answered_and_the_client_keeps_its_config() -> None:
    state, builder, hub = stream()
    state.handle(DiscoveryRequest(type_url=ENDPOINTS, resource_names=["web"]))
    (good,) = responses(state)
    state.handle(ack(good, ["web"]))
    builder.generation["web"] = 1
    hub.notify({"web"})
    (bad,) = responses(state)
    state.handle(ack(bad, ["web"], error="priority 1 >= number of localities"))
    assert responses(state) == []
    (entry,) = client_config(state).generic_xds_configs
    assert entry.client_status == 4 and entry.config_status == 4  # NACKED, ERROR
    assert entry.version_info == good.version_info and entry.error_state.version_info == bad.version_info
    assert "priority" in entry.error_state.details
    builder.generation["web"] = 2
    hub.notify({"web"})
    (fixed,) = responses(state)
    state.handle(ack(fixed, ["web"]))
    (entry,) = client_config(state).generic_xds_configs
    assert (entry.client_status, entry.config_status, entry.version_info) == (3, 1, fixed.version_info)  # ACKED


def test_empty_names_unsubscribe_and_stale_nonces_are_ignored() -> None:
    state, builder, hub = stream()
    state.handle(DiscoveryRequest(type_url=ENDPOINTS, resource_names=["web"]))
    (first,) = responses(state)
    state.handle(ack(first, []))
    assert responses(state) == [] and not client_config(state).generic_xds_configs
    builder.generation["web"] = 1
    hub.notify({"web"})
    assert responses(state) == []  # no longer watched
    state.handle(DiscoveryRequest(type_url=ENDPOINTS, resource_names=["web"], response_nonce="999"))
    assert [names(r) for r in responses(state)] == [["web#1"]]  # resubscribed; the odd nonce is ignored


def test_close_leaves_nothing_behind() -> None:
    state, _, hub = stream()
    state.handle(DiscoveryRequest(type_url=LISTENER, resource_names=["web"]))
    assert hub.streams == {state}
    state.close()
    assert not hub.streams and not hub._watchers


def test_a_change_in_the_view_touches_endpoints_only_and_late_acks_leave_no_record() -> None:
    state, builder, _ = stream()
    for type_url in (LISTENER, CLUSTER, ENDPOINTS):
        state.handle(DiscoveryRequest(type_url=type_url, resource_names=["web", "api"]))
    first = {r.type_url: r for r in responses(state)}
    assert set(first) == {LISTENER, CLUSTER, ENDPOINTS}
    builder.generation["web"] = 1
    state.touch(["web"])
    # Listener and Cluster depend on the name alone: only the changed endpoints go out.
    pushed = responses(state)
    assert [(r.type_url, len(r.resources)) for r in pushed] == [(ENDPOINTS, 1)]
    # The client drops "api", then ACKs the response that still carried it.
    state.handle(DiscoveryRequest(type_url=ENDPOINTS, resource_names=["web"], response_nonce=pushed[0].nonce))
    state.handle(ack(first[ENDPOINTS], ["web"]))
    assert set(state.types[ENDPOINTS].acked) <= {"web"}


def test_names_the_client_may_not_read_are_left_out_as_permission_denied() -> None:
    hub = XdsHub(None, SimpleNamespace(region="a"))  # type: ignore[arg-type]
    hub.builder = FakeBuilder()  # type: ignore[assignment]
    state = StreamState(hub, "test", may_read=lambda name: name != "payments")
    state.handle(DiscoveryRequest(type_url=LISTENER, resource_names=["web", "payments"]))
    (response,) = responses(state)
    assert names(response) == ["web"]
    (error,) = response.resource_errors
    assert error.resource_name.name == "payments"
    assert error.error_detail.code == 7  # PERMISSION_DENIED
    assert "may not read 'payments'" in error.error_detail.message
