"""Replication servicer: this region's own records, for other regions' replicators.

Served from the view like Watch (no etcd read per stream), filtered to the records whose
origin is this region: replicas of third regions are never passed on, so each record has
one path from its origin to every other region.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc.aio

from discovery.api.errors import abort
from discovery.api.streams import OpenStreams
from discovery.errors import DiscoveryError, InvalidArgument, RevisionNotReached, ShuttingDown, StoreUnavailable
from discovery.security.guard import Guard
from discovery.store import StoreHealth
from discovery.view import SNAPSHOT_CHUNK, Changes, Snapshot, View, updates
from discovery_pb.v1 import replication_pb2 as pb
from discovery_pb.v1.replication_pb2_grpc import ReplicationServicer as _Base
from discovery_pb.v1.types_pb2 import Change, Instance

CATCH_UP_SECONDS = 2.0  # a receiver ahead of this server's view waits this long before a snapshot
_SHUTTING_DOWN = "the server is shutting down; replicate from another server of this region"
_STALE = "this server has lost contact with its etcd; replicate from another server of this region"


class ReplicationServicer(_Base):
    def __init__(
        self,
        view: View,
        region: str,
        etcd_health: Callable[[], Awaitable[StoreHealth]],
        *,
        heartbeat: float,
        guard: Guard,
        recovered_at_ms: Callable[[], int] = lambda: 0,
    ) -> None:
        self._view = view
        self._guard = guard
        self._recovered_at_ms = recovered_at_ms
        self._region = region
        self._etcd_health = etcd_health
        self._heartbeat = heartbeat
        self.streams = OpenStreams(_SHUTTING_DOWN)

    async def Stream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        body = self.streams.follow(context, lambda task: self._stream(request, context, task))
        async with contextlib.aclosing(body) as messages:
            async for message in messages:
                yield message

    async def _stream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext, task: asyncio.Task[Any]
    ) -> AsyncGenerator[pb.StreamResponse, None]:
        view, region = self._view, self._region
        try:
            caller, grants = self._guard.caller(context, "Replication.Stream")
            self._guard.require_replicate(caller, grants, "Replication.Stream", request.requester)
            since = await self._resume_point(request)
        except DiscoveryError as exc:
            if self.streams.ended(task):
                return
            await abort(context, exc)
        self.streams.guard(task, lambda: self._guard.still_replicating(caller, "Replication.Stream", request.requester))
        self._guard.event("stream_start", caller, "Replication.Stream", requester=request.requester)
        try:
            async for message in self._follow(view, region, since, context, task):
                yield message
        finally:
            self._guard.event("stream_end", caller, "Replication.Stream", requester=request.requester)

    async def _follow(
        self, view: View, region: str, since: int, context: grpc.aio.ServicerContext, task: asyncio.Task[Any]
    ) -> AsyncGenerator[pb.StreamResponse, None]:
        batches = updates(view, "", region, since=since, idle=self._heartbeat, chunk=SNAPSHOT_CHUNK)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                if isinstance(batch, Snapshot):
                    for message in self._snapshot(batch):
                        yield message
                elif batch.closing:
                    break
                elif batch.resumed:  # sent even when empty: it tells the receiver where it stands
                    yield self._message(pb.StreamResponse.CHANGES, batch, changes=batch.changes)
                else:
                    if batch.stale:  # what follows could not be vouched for: let the receiver move on
                        await abort(context, StoreUnavailable(_STALE))
                    kind = pb.StreamResponse.CHANGES if batch.changes else pb.StreamResponse.HEARTBEAT
                    yield self._message(kind, batch, changes=batch.changes)
            if self.streams.ended(task):
                return
            await abort(context, ShuttingDown(_SHUTTING_DOWN))

    async def _resume_point(self, request: pb.StreamRequest) -> int:
        """The revision to send changes after; 0 for a snapshot."""
        view, since = self._view, request.since_revision
        if self.streams.closing:
            raise ShuttingDown(_SHUTTING_DOWN)
        if request.origin and request.origin != self._region:
            raise InvalidArgument("origin", f"this server is region {self._region!r}, not {request.origin!r}")
        if since < 0:
            raise InvalidArgument("since_revision", "must be >= 0")
        if view.stale:
            raise StoreUnavailable(_STALE)
        if request.cluster_id and request.cluster_id != view.cluster_id:
            return 0  # the checkpoint is from another etcd cluster: its revisions mean nothing here
        if since > view.revision:
            # Another server of ours may have been ahead of this one: a bounded wait beats a
            # needless snapshot.
            with contextlib.suppress(RevisionNotReached):
                await view.wait_for(since, CATCH_UP_SECONDS)
            if since > view.revision:
                # Only etcd itself behind the checkpoint means a rebuilt cluster (snapshot);
                # a view that is merely behind would roll the receiver's replicas back.
                health = await self._etcd_health()
                if not health.healthy:
                    raise StoreUnavailable(_STALE)
                if health.revision >= since:
                    raise StoreUnavailable(
                        f"this server's view is at revision {view.revision}, behind {since}; "
                        "replicate from another server of this region"
                    )
                return 0
        return since

    def _message(
        self,
        kind: pb.StreamResponse.Kind.ValueType,
        batch: Snapshot | Changes,
        *,
        changes: list[Change] | None = None,
        instances: list[Instance] | None = None,
        more: bool = False,
    ) -> pb.StreamResponse:
        return pb.StreamResponse(
            kind=kind,
            origin=self._region,
            cluster_id=self._view.cluster_id,
            revision=batch.revision,
            time_ms=int(time.time() * 1000),
            changes=changes,
            instances=instances,
            more=more,
            stale=batch.stale,
            recovered_at_ms=self._recovered_at_ms(),
            heartbeat_ms=round(self._heartbeat * 1000),
        )

    def _snapshot(self, batch: Snapshot) -> list[pb.StreamResponse]:
        last = len(batch.chunks) - 1
        return [
            self._message(pb.StreamResponse.SNAPSHOT, batch, instances=chunk, more=i < last)
            for i, chunk in enumerate(batch.chunks)
        ]
