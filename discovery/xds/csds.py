"""Client Status Discovery Service, served by the management server (as istiod does): one
``ClientConfig`` per connected ADS stream, saying per resource what the client was sent,
what it ACKed, and what it NACKed and why.

Per resource, ``client_status`` is the client's side (REQUESTED: asked, nothing answered
yet; DOES_NOT_EXIST: answered as unknown; ACKED; NACKED) and ``config_status`` ours (SYNCED:
the client ACKed the latest we sent; STALE: it has not answered the latest yet; ERROR: it
NACKed the latest; NOT_SENT). ``xds_config`` is the last version the client ACKed, which is
the one it uses; a NACKed one is in ``error_state.failed_configuration``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio
from envoy.admin.v3.config_dump_shared_pb2 import ClientResourceStatus, UpdateFailureState
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from envoy.service.status.v3.csds_pb2 import ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp

from discovery.api.errors import abort
from discovery.errors import DiscoveryError
from discovery.security.guard import Guard
from discovery.xds import resources as rs
from discovery.xds.hub import XdsHub
from discovery.xds.stream import Delivered, Nack, StreamState, TypeState

SERVICE_NAME = csds_pb2.DESCRIPTOR.services_by_name["ClientStatusDiscoveryService"].full_name


def client_config(stream: StreamState, *, contents: bool = True) -> ClientConfig:
    """What one stream's client subscribes to and holds. The node is the client's own, with
    ``discovery.peer``, ``discovery.stream`` and ``discovery.connected_at`` added to its
    metadata, since many clients share one bootstrap and so one node id."""
    config = ClientConfig()
    config.node.CopyFrom(stream.node)
    extra = config.node.metadata.fields
    extra["discovery.peer"].CopyFrom(Value(string_value=stream.peer))
    extra["discovery.stream"].CopyFrom(Value(number_value=stream.id))
    extra["discovery.connected_at"].CopyFrom(Value(number_value=round(stream.connected_at, 3)))
    for type_url in rs.TYPE_URLS:
        state = stream.types[type_url]
        for name in sorted(state.names):
            config.generic_xds_configs.append(_resource(type_url, name, state, contents))
    return config


def _resource(type_url: str, name: str, state: TypeState, contents: bool) -> Message:
    item = ClientConfig.GenericXdsConfig(type_url=type_url, name=name)
    sent, acked, nack = state.sent.get(name), state.acked.get(name), state.nacked.get(name)
    if acked is not None:
        version, resource, at = acked
        item.version_info = version
        item.last_updated.CopyFrom(_timestamp(at))
        if resource is None:
            item.client_status = ClientResourceStatus.DOES_NOT_EXIST
        else:
            item.client_status = ClientResourceStatus.ACKED
            if contents:
                item.xds_config.CopyFrom(resource.packed)
    else:
        item.client_status = ClientResourceStatus.REQUESTED
    if nack is not None:
        item.client_status = ClientResourceStatus.NACKED
        item.error_state.CopyFrom(
            UpdateFailureState(details=nack.details, version_info=nack.version, last_update_attempt=_timestamp(nack.at))
        )
        if contents and nack.resource is not None:
            item.error_state.failed_configuration.CopyFrom(nack.resource.packed)
    item.config_status = _config_status(sent, acked, nack)
    generic: Message = item
    return generic


def _config_status(sent: Delivered | None, acked: Delivered | None, nack: Nack | None) -> int:
    if sent is None:
        return int(ConfigStatus.NOT_SENT)
    if nack is not None and nack.version == sent[0]:
        return int(ConfigStatus.ERROR)
    if acked is not None and acked[0] == sent[0]:
        return int(ConfigStatus.SYNCED)
    return int(ConfigStatus.STALE)


def _timestamp(at: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(at * 1e9))
    return stamp


def status(hub: XdsHub, request: ClientStatusRequest) -> ClientStatusResponse:
    """Every connected client, or those whose node id matches ``node_matchers`` exactly or
    by prefix (the matchers' other forms are not supported and match nothing)."""
    response = ClientStatusResponse()
    streams = sorted((s for s in hub.streams if isinstance(s, StreamState)), key=lambda s: s.id)
    for stream in streams:
        if request.node_matchers and not any(_matches(m, stream.node.id) for m in request.node_matchers):
            continue
        response.config.append(client_config(stream, contents=not request.exclude_resource_contents))
    return response


def _matches(matcher: object, node_id: str) -> bool:
    id_matcher = matcher.node_id  # type: ignore[attr-defined]
    kind = id_matcher.WhichOneof("match_pattern")
    if kind == "exact":
        return bool(node_id == id_matcher.exact)
    if kind == "prefix":
        return node_id.startswith(id_matcher.prefix)
    return kind is None


class CsdsServicer(csds_pb2_grpc.ClientStatusDiscoveryServiceServicer):  # type: ignore[misc]
    """CSDS shows every client's config: admin only."""

    def __init__(self, hub: XdsHub, guard: Guard) -> None:
        self.hub = hub
        self._guard = guard

    async def _admit(self, context: grpc.aio.ServicerContext, method: str) -> None:
        try:
            caller, grants = self._guard.caller(context, method)
            self._guard.require_admin(caller, grants, method)
        except DiscoveryError as exc:
            await abort(context, exc)

    async def FetchClientStatus(
        self, request: ClientStatusRequest, context: grpc.aio.ServicerContext
    ) -> ClientStatusResponse:
        await self._admit(context, "FetchClientStatus")
        return status(self.hub, request)

    async def StreamClientStatus(
        self, requests: AsyncIterator[ClientStatusRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ClientStatusResponse]:
        await self._admit(context, "StreamClientStatus")
        async for request in requests:
            yield status(self.hub, request)


def add_to_server(servicer: CsdsServicer, server: grpc.aio.Server) -> None:
    csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(servicer, server)
