"""Lookup servicer: Resolve and Watch, answered from the view."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import grpc.aio

from discovery.api.errors import abort
from discovery.api.streams import OpenStreams
from discovery.errors import DiscoveryError, InvalidArgument, ShuttingDown
from discovery.model import SERVING_STATUSES, served, validate_service
from discovery.query import Query, select
from discovery.replication.state import Freshness, RegionStates
from discovery.security.guard import Guard
from discovery.security.identity import Caller
from discovery.security.policy import Grants
from discovery.telemetry import Instruments
from discovery.view import SNAPSHOT_CHUNK, Changes, Snapshot, View, updates
from discovery_pb.v1 import lookup_pb2 as pb
from discovery_pb.v1.lookup_pb2_grpc import LookupServicer as _Base
from discovery_pb.v1.types_pb2 import CheckResult, Endpoint, Status

log = logging.getLogger(__name__)

_SHUTTING_DOWN = "the server is shutting down; resume the watch on another server from the last revision"


class LookupServicer(_Base):
    def __init__(
        self,
        view: View,
        states: RegionStates,
        instruments: Instruments,
        guard: Guard,
        *,
        max_wait: float,
        watch_keepalive: float,
    ) -> None:
        self._view = view
        self._states = states
        self._region = states.region
        self._m = instruments
        self._guard = guard
        self._max_wait = max_wait
        self._keepalive = watch_keepalive
        self._cache: dict[str, tuple[int, bytes]] = {}
        self.streams = OpenStreams(_SHUTTING_DOWN)

    @property
    def max_wait(self) -> float:
        return self._max_wait

    def _wait_budget(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self._max_wait if remaining is None else max(0.0, min(self._max_wait, remaining - 0.05))

    async def Resolve(  # type: ignore[override]  # returns pre-serialized bytes: see add_to_server
        self, request: pb.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        with self._m.timed(self._m.lookups, self._m.resolve_duration) as labels:
            try:
                caller, grants = self._guard.caller(context, "Resolve")
                query = await self.admit(request, caller, grants, self._wait_budget(context))
            except DiscoveryError as exc:
                labels["outcome"] = type(exc).__name__
                await abort(context, exc)
            return self.answer(query)

    async def admit(self, request: pb.ResolveRequest, caller: Caller, grants: Grants, wait: float) -> Query:
        """What every door does before it answers a Resolve: validate, authorize, and wait
        (at most ``wait`` seconds) for ``min_revision``; raises the DiscoveryError to send."""
        query = _query(request)
        self._guard.require_read(caller, grants, "Resolve", query.service)
        if request.min_revision:
            await self._view.wait_for(request.min_revision, wait)
        return query

    def answer(self, query: Query) -> bytes:
        """The serialized ResolveResponse to an admitted ``query``."""
        view = self._view
        stale = view.stale
        header = pb.ResolveResponse(
            service=query.service, revision=view.revision, stale=stale, stale_seconds=view.stale_seconds()
        ).SerializeToString()
        return header + self._endpoints(query, stale)

    def _endpoints(self, query: Query, stale: bool) -> bytes:
        """The ``endpoints`` and ``regions`` fields of a ResolveResponse, serialized.
        Protobuf messages concatenate, so they follow the header as is. The common query
        (serving, local, no filter) is cached per service until the view changes that
        service: copying every instance into every response was most of Resolve's cost."""
        view, states = self._view, self._states
        key = view.service_generation(query.service)
        cacheable = query.is_default and not stale  # a stale answer carries a growing age
        if cacheable:
            hit = self._cache.get(query.service)
            if hit is not None and hit[0] == key:
                return hit[1]
        # Each endpoint is written out around the record's stored bytes (no decode, no copy):
        # Endpoint is instance (1), mod_revision (2), then stale (3) and age_seconds (4), which
        # are the same for every endpoint of a region.
        parts: list[bytes] = []
        tails: dict[str, bytes] = {}
        counts: dict[str, int] = {}
        fresh: dict[str, Freshness] = {}
        chosen = select(view.service(query.service), query, self._region, states.peers, states.servable)
        for record in chosen:
            region = record.region
            tail = tails.get(region)
            if tail is None:
                state = fresh[region] = states.freshness(region)
                tail = tails[region] = Endpoint(stale=state.stale, age_seconds=_seconds(state)).SerializeToString()
                counts[region] = 0
            counts[region] += 1
            value = record.value
            if record.check == CheckResult.CRITICAL:  # a later field wins: the status it is served as
                value += _STATUS_TAG + _SMALL[record.status]
            endpoint = b"".join(
                (_INSTANCE_TAG, _varint(len(value)), value, _MOD_REVISION_TAG, _varint(record.mod_revision), tail)
                if record.mod_revision
                else (_INSTANCE_TAG, _varint(len(value)), value, tail)
            )
            parts += (_ENDPOINTS_TAG, _varint(len(endpoint)), endpoint)
        body = pb.ResolveResponse()
        for region, count in counts.items():
            state = fresh[region]
            body.regions.add(
                region=region,
                endpoints=count,
                stale=state.stale,
                stale_seconds=_seconds(state),
                local=region == self._region,
            )
        parts.append(body.SerializeToString())
        data = b"".join(parts)
        if cacheable:
            if len(self._cache) > 2 * view.service_count + 1024:  # services come and go
                self._cache.clear()
            self._cache[query.service] = (key, data)
        return data

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchResponse]:
        body = self.streams.follow(context, lambda task: self._watch(request, context, task))
        async with contextlib.aclosing(body) as messages:
            async for message in messages:
                yield message

    async def _watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext, task: asyncio.Task[Any]
    ) -> AsyncGenerator[pb.WatchResponse, None]:
        try:
            if self.streams.closing:
                raise ShuttingDown(_SHUTTING_DOWN)
            caller, grants = self._guard.caller(context, "Watch")
            _check_watch(request)
            self._guard.require_read(caller, grants, "Watch", request.service)
            slot = self._guard.open_stream(caller, grants, "Watch", request.service)
        except DiscoveryError as exc:
            if self.streams.ended(task):
                return  # shutdown has sent the status already
            await abort(context, exc)
        self.streams.guard(task, lambda: self._guard.still_allowed(caller, "Watch", request.service))
        with slot:
            async for message in self._follow(request, context, task):
                yield message

    async def _follow(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext, task: asyncio.Task[Any]
    ) -> AsyncGenerator[pb.WatchResponse, None]:
        view = self._view
        try:
            if request.since_revision > view.revision:
                await view.wait_for(request.since_revision, self._wait_budget(context))
        except DiscoveryError as exc:
            if self.streams.ended(task):
                return
            await abort(context, exc)
        self._m.watch_streams.add(1)
        try:
            batches = updates(
                view, request.service, since=request.since_revision, idle=self._keepalive, chunk=SNAPSHOT_CHUNK
            )
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    if isinstance(batch, Snapshot):
                        for message in snapshot_messages(batch):
                            yield message
                    elif batch.closing:
                        break
                    else:
                        yield _changes(batch)
                if self.streams.ended(task):
                    return
                await abort(context, ShuttingDown(_SHUTTING_DOWN))
        finally:
            self._m.watch_streams.add(-1)


def _check_watch(request: pb.WatchRequest) -> None:
    if request.service:
        validate_service(request.service)
    if request.since_revision < 0:
        raise InvalidArgument("since_revision", "must be >= 0")


_SCOPES = frozenset(pb.Scope.values())
_STATUSES = frozenset(Status.values()) - {Status.STATUS_UNSPECIFIED}


def _query(request: pb.ResolveRequest) -> Query:
    validate_service(request.service)
    if request.scope not in _SCOPES:
        raise InvalidArgument("scope", f"unknown scope {request.scope}; use LOCAL, FAILOVER or ALL")
    for status in request.statuses:
        if status not in _STATUSES:
            raise InvalidArgument("statuses", f"unknown status {status}")
    if request.min_healthy > 10_000:
        raise InvalidArgument("min_healthy", "at most 10000")
    return Query(
        service=request.service,
        scope=request.scope or pb.LOCAL,
        statuses=frozenset(request.statuses) or SERVING_STATUSES,
        tags=frozenset(request.tags),
        zone=request.zone,
        min_healthy=request.min_healthy or 1,
    )


# Tags (field number << 3 | wire type 2 or 0) of the fields _endpoints writes by hand.
_ENDPOINTS_TAG = bytes([3 << 3 | 2])  # ResolveResponse.endpoints
_INSTANCE_TAG = bytes([1 << 3 | 2])  # Endpoint.instance
_MOD_REVISION_TAG = bytes([2 << 3 | 0])  # Endpoint.mod_revision
_STATUS_TAG = bytes([9 << 3 | 0])  # Instance.status


def _varint(n: int) -> bytes:
    """A protobuf varint of ``n`` >= 0."""
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes([n]) for n in range(0x80)]


def _seconds(state: Freshness) -> float:
    """Seconds stale, for the wire: 0 when fresh; a region never heard from reports -1."""
    if not state.stale:
        return 0.0
    return -1.0 if math.isinf(state.age) else state.age


def add_to_server(servicer: LookupServicer, server: grpc.aio.Server) -> None:
    """Register the Lookup service as the generated ``add_LookupServicer_to_server`` does,
    except that Resolve's handler returns its response already serialized."""
    handlers = {
        "Resolve": grpc.unary_unary_rpc_method_handler(
            servicer.Resolve,
            request_deserializer=pb.ResolveRequest.FromString,
            response_serializer=_passthrough,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch,
            request_deserializer=pb.WatchRequest.FromString,
            response_serializer=pb.WatchResponse.SerializeToString,
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["Lookup"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _passthrough(data: bytes) -> bytes:
    return data


def snapshot_messages(batch: Snapshot) -> list[pb.WatchResponse]:
    """A snapshot as Watch sends it (and /v1/events): its chunks, instances as served."""
    last = len(batch.chunks) - 1
    messages = [
        pb.WatchResponse(
            kind=pb.WatchResponse.SNAPSHOT, revision=batch.revision, instances=chunk, stale=batch.stale, more=i < last
        )
        for i, chunk in enumerate(batch.chunks)
    ]
    for message in messages:  # the response holds copies: the view's messages stay as stored
        for instance in message.instances:
            if instance.check_result.state == CheckResult.CRITICAL:
                served(instance)
    return messages


def _changes(batch: Changes) -> pb.WatchResponse:
    kind = pb.WatchResponse.CHANGES if batch.changes else pb.WatchResponse.KEEPALIVE
    message = pb.WatchResponse(kind=kind, revision=batch.revision, changes=batch.changes, stale=batch.stale)
    for change in message.changes:
        if change.instance.check_result.state == CheckResult.CRITICAL:
            served(change.instance)
    return message
