"""Registry servicer: Register, Heartbeat, Deregister."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio

from discovery.api.errors import abort
from discovery.api.streams import OpenStreams
from discovery.errors import DiscoveryError, ShuttingDown
from discovery.registry import Registry
from discovery.telemetry import Instruments
from discovery_pb.v1 import registry_pb2 as pb
from discovery_pb.v1.registry_pb2_grpc import RegistryServicer as _Base

_SHUTTING_DOWN = "the server is shutting down; send heartbeats to another server of the region"


class RegistryServicer(_Base):
    def __init__(self, registry: Registry, instruments: Instruments) -> None:
        self._registry = registry
        self._m = instruments
        self.streams = OpenStreams(_SHUTTING_DOWN)

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterResponse:
        with self._m.timed(self._m.registrations, self._m.register_duration) as labels:
            try:
                done = await self._registry.register(request.instance)
            except DiscoveryError as exc:
                labels["outcome"] = type(exc).__name__
                await abort(context, exc)
        return pb.RegisterResponse(
            instance_id=done.instance.instance_id,
            revision=done.revision,
            lease_id=done.lease_id,
            ttl_seconds=done.instance.ttl_seconds,
        )

    async def Heartbeat(
        self, request_iterator: AsyncIterator[pb.HeartbeatRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.HeartbeatResponse]:
        if self.streams.closing:
            await abort(context, ShuttingDown(_SHUTTING_DOWN))
        task = self.streams.add(context)
        try:
            async for request in request_iterator:
                try:
                    ttl = await self._registry.heartbeat(request.lease_id)
                except DiscoveryError as exc:
                    await abort(context, exc)
                yield pb.HeartbeatResponse(lease_id=request.lease_id, ttl_seconds=ttl)
        finally:
            self.streams.discard(task)

    async def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterResponse:
        try:
            revision = await self._registry.deregister(request.service, request.instance_id)
        except DiscoveryError as exc:
            self._m.deregistrations.add(1, {"outcome": type(exc).__name__})
            await abort(context, exc)
        self._m.deregistrations.add(1, {"outcome": "ok"})
        return pb.DeregisterResponse(revision=revision)
