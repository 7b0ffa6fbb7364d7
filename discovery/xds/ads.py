"""The Aggregated Discovery Service (state of the world) on the server's gRPC port: a thin
adapter between a gRPC stream and its ``StreamState``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from discovery.api.errors import abort
from discovery.api.streams import OpenStreams
from discovery.errors import DiscoveryError
from discovery.security.guard import Guard
from discovery.security.identity import Caller
from discovery.xds.hub import XdsHub
from discovery.xds.stream import StreamState

log = logging.getLogger(__name__)

METHOD = "StreamAggregatedResources"
SERVICE_NAME = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name
_SHUTTING_DOWN = "the discovery server is shutting down; reconnect to another server"


class AdsServicer:
    """``StreamAggregatedResources``: one reader task applies requests to the stream's state,
    the handler writes whatever the state says is due, whenever it is woken (by a request that
    changes the subscription, or by the hub)."""

    def __init__(self, hub: XdsHub, guard: Guard) -> None:
        self.hub = hub
        self._guard = guard
        self.streams = OpenStreams(_SHUTTING_DOWN)

    async def StreamAggregatedResources(
        self, requests: AsyncIterator[DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> None:
        guard = self._guard
        try:
            caller, grants = guard.caller(context, METHOD)
            slot = guard.open_stream(caller, grants, METHOD)
        except DiscoveryError as exc:
            await abort(context, exc)
        task = self.streams.add(context)
        state = StreamState(self.hub, context.peer() or "", may_read=lambda name: guard.may_read_now(caller, name))
        self.streams.guard(task, lambda: _recheck(guard, caller, state))
        reader = asyncio.create_task(self._read(requests, state), name=f"xds-reader-{state.id}")
        try:
            if self.streams.closing:
                await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
            while True:
                await state.wake.wait()
                if reader.done():
                    reader.result()  # a bad request ends the stream with its error
                    return  # the client closed its side
                for response in state.take():
                    await context.write(response)  # pre-serialized: see add_to_server
        finally:
            try:
                reader.cancel()
                # Whatever ended the reader (a malformed request, an abort at shutdown), the
                # stream must leave the hub: a raise here used to skip the lines below.
                await asyncio.gather(reader, return_exceptions=True)
            finally:
                state.close()
                slot.release()
                self.streams.discard(task)

    async def _read(self, requests: AsyncIterator[DiscoveryRequest], state: StreamState) -> None:
        try:
            async for request in requests:
                state.handle(request)
        finally:
            state.wake.set()


def _recheck(guard: Guard, caller: Caller, state: StreamState) -> DiscoveryError | None:
    """After a policy reload: the identity must still be known, and may still read every
    resource this stream has delivered to it (a name it could never read was answered with a
    resource error, not data, and does not end the stream)."""
    error = guard.still_allowed(caller, METHOD, None)
    for name in sorted(state.held()):
        if error is not None:
            break
        error = guard.still_allowed(caller, METHOD, name)
    return error


def add_to_server(servicer: AdsServicer, server: grpc.aio.Server) -> None:
    """Register ADS as the generated code would, except that responses are written already
    encoded (a push to many streams is encoded once)."""
    handlers = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.StreamAggregatedResources,
            request_deserializer=DiscoveryRequest.FromString,
            response_serializer=_passthrough,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _passthrough(data: bytes) -> bytes:
    return data
