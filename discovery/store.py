"""The only module that talks to etcd.

Every call has a deadline: a hung etcd (SIGSTOP) accepts TCP and never answers, so only
deadlines and gRPC keep-alive notice it. Failures surface as ``StoreUnavailable`` with a
message that names etcd; compaction under a watch surfaces as ``Compacted`` so the view can
re-list (skipping ahead would lose events).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from etcd3aio import EtcdError
from etcd3aio._protobuf import (  # the generated etcd API that etcd3aio ships
    KVStub,
    LeaseKeepAliveRequest,
    LeaseStub,
    RangeRequest,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio._protobuf import rpc_pb2 as _rpc  # type: ignore[attr-defined]  # not re-exported
from etcd3aio.connections import ConnectionManager
from etcd3aio.kv import KVService, prefix_range_end
from etcd3aio.lease import LeaseService

from discovery.errors import Compacted, Fenced, NotFound, StoreUnavailable
from discovery.tasks import stop_task

log = logging.getLogger(__name__)

_PAGE = 1000
_EVENT_DELETE = 1  # mvccpb.Event.DELETE
_REQUIRE_LEADER = (("hasleader", "true"),)  # etcd ends the watch when its member loses the leader


@dataclass(frozen=True, slots=True)
class Write:
    """One operation of a fenced transaction: a put, or a delete when ``value`` is None."""

    key: bytes
    value: bytes | None


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Event:
    deleted: bool
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response.

    ``events`` are in revision order and ``revision`` says everything up to it has been
    delivered (for a progress notification, ``events`` is empty). ``created``: the watch has
    just been established (revision 0, no events): etcd is answering. ``requested``: the
    answer to ``request_progress``, which etcd before 3.5.8 may send ahead of events still
    due (issue 15220): to be confirmed before it counts, and never a point to resume from.
    """

    revision: int
    events: list[Event] = field(default_factory=list)
    created: bool = False
    requested: bool = False


@dataclass(frozen=True, slots=True)
class StoreHealth:
    healthy: bool
    revision: int
    error: str


class Store:
    """An etcd cluster, as the rest of the server needs it.

    Args:
        endpoints: ``IP:PORT`` (or ``localhost:PORT``) of every member; requests rotate.
        op_timeout: deadline of one operation, retries included (seconds).
        keepalive: gRPC keep-alive interval and timeout (seconds); a hung member is noticed
            in about twice this. etcd must permit it (``--grpc-keepalive-min-time``).
    """

    def __init__(self, endpoints: Sequence[str], *, op_timeout: float = 3.0, keepalive: float = 1.0) -> None:
        self.endpoints = list(endpoints)
        self._op_timeout = op_timeout
        ms = int(keepalive * 1000)
        self._manager = ConnectionManager(self.endpoints, keepalive_time_ms=ms, keepalive_timeout_ms=ms)
        options = dict(self._manager.grpc_options)
        options.update(
            {
                # Keep pinging while a call is open even when no data flows: an idle watch on a
                # hung etcd sends nothing, and by default gRPC stops pinging after two pings.
                "grpc.http2.max_pings_without_data": 0,
                # What bounds the wait for a ping's answer in current gRPC (the keep-alive
                # timeout alone does not: a SIGSTOPped etcd went unnoticed for good).
                "grpc.http2.ping_timeout_ms": ms,
                # No pings without a call: etcd allows none (three earn a GOAWAY, after which
                # gRPC pings this channel half as often for good).
                "grpc.keepalive_permit_without_calls": 0,
                # Reconnect within a second of etcd coming back, not after gRPC's default
                # backoff that grows to two minutes while it is down.
                "grpc.initial_reconnect_backoff_ms": 100,
                "grpc.max_reconnect_backoff_ms": max(1000, ms),
            }
        )
        self._manager.grpc_options = list(options.items())
        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService | None = None
        self._lease: LeaseService | None = None
        self._keepalive = _LeaseKeepAliveStream(self)
        self._watch_requests: asyncio.Queue[Any] | None = None  # of the current watch, once created
        self.cluster_id = 0  # of the etcd cluster, from the last listing (a rebuilt cluster has a new one)
        # etcd's raft term, from the last response header that had one: a new term means a new
        # leader, and a new leader extends every lease (none expires because of the change).
        self.raft_term = 0

    async def __aenter__(self) -> Store:
        self._channel = self._manager.get_channel()
        self._kv = KVService(self._channel)
        self._lease = LeaseService(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._keepalive.close()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            raise StoreUnavailable("etcd client is closed")
        return self._channel

    @contextlib.asynccontextmanager
    async def _call(self, what: str, timeout: float | None = None) -> AsyncIterator[None]:
        """Bound an operation by the op timeout and turn every etcd failure into StoreUnavailable."""
        limit = timeout or self._op_timeout
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            raise StoreUnavailable(
                f"etcd at {','.join(self.endpoints)} did not answer {what} within {limit:g}s"
            ) from None
        except (EtcdError, grpc.aio.AioRpcError) as exc:
            raise StoreUnavailable(f"etcd at {','.join(self.endpoints)} failed {what}: {_describe(exc)}") from None

    # --- writes -----------------------------------------------------------------------

    async def put(self, key: bytes, value: bytes, ttl: int = 0) -> tuple[int, int, int]:
        """Put ``key`` (with a new lease of ``ttl`` seconds when ttl > 0), committed.

        Returns (revision, lease id or 0, lease id the key had before or 0). The previous
        lease is returned so the caller can revoke it: re-registration moves the key to a
        fresh lease.
        """
        assert self._kv is not None and self._lease is not None
        async with self._call("a put"):
            lease_id = 0
            if ttl > 0:
                lease_id = (await self._lease.grant(ttl, timeout=self._op_timeout)).ID
            resp = await self._kv.put(key, value, lease=lease_id, prev_kv=True, timeout=self._op_timeout)
        previous = resp.prev_kv.lease if resp.HasField("prev_kv") else 0
        return resp.header.revision, lease_id, previous

    async def delete(self, key: bytes) -> tuple[int, int]:
        """Delete ``key``; returns (revision, its lease). NotFound when it did not exist."""
        assert self._kv is not None
        async with self._call("a delete"):
            # Not retried: a retry after a delete that did commit would answer NotFound.
            resp = await self._kv.delete(key, prev_kv=True, timeout=self._op_timeout, max_attempts=1)
        if resp.deleted == 0:
            raise NotFound(key.decode(errors="replace"))
        return resp.header.revision, resp.prev_kvs[0].lease

    async def revoke(self, lease_id: int) -> None:
        assert self._lease is not None
        async with self._call("a lease revoke"):
            with contextlib.suppress(EtcdError, grpc.aio.AioRpcError):  # already gone is fine
                await self._lease.revoke(lease_id, timeout=self._op_timeout)

    async def keep_alive(self, lease_id: int, timeout: float | None = None) -> int:
        """Refresh a lease once; returns its remaining TTL. NotFound when it has expired."""
        try:
            async with self._call("a lease keep-alive", timeout):
                ttl = await self._keepalive.refresh(lease_id)
        except StoreUnavailable:
            # A hung stream would swallow every later refresh: the next one opens a new stream.
            await self._keepalive.close()
            raise
        if ttl <= 0:
            raise NotFound(f"lease {lease_id:x} has expired")
        return ttl

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (etcd grants at least about 2 s)."""
        assert self._lease is not None
        async with self._call("a lease grant"):
            return int((await self._lease.grant(ttl, timeout=self._op_timeout)).ID)

    async def create(self, key: bytes, value: bytes, lease: int) -> tuple[int, KeyValue | None]:
        """Create ``key`` on ``lease`` unless it exists: an election campaign.

        Returns (the key's create revision if this call created it else 0, the key as it is).
        """
        assert self._kv is not None
        kv = self._kv
        async with self._call("a create"):
            resp = await kv.txn(
                [kv.txn_compare_create_revision(key, 0)],
                [kv.txn_op_put(key, value, lease=lease)],
                [kv.txn_op_get(key)],
                timeout=self._op_timeout,
            )
        if resp.succeeded:
            return int(resp.header.revision), KeyValue(key, value, resp.header.revision, lease)
        found = resp.responses[0].response_range.kvs
        if not found:
            return 0, None
        held = found[0]
        # Ours already: a retry of a create that did commit (its answer was lost).
        created = int(held.create_revision) if held.lease == lease and held.value == value else 0
        return created, KeyValue(held.key, held.value, held.mod_revision, held.lease)

    async def fenced(self, fence: tuple[bytes, int], writes: Sequence[Write]) -> int:
        """Apply ``writes`` in one transaction if the key ``fence[0]`` still has create
        revision ``fence[1]``: a deposed writer's late write fails with ``Fenced``.

        Retries (inside the op deadline) are safe: puts and deletes of fixed values apply the
        same twice. Returns the transaction's revision.
        """
        assert self._kv is not None
        kv = self._kv
        ops = [kv.txn_op_delete(w.key) if w.value is None else kv.txn_op_put(w.key, w.value) for w in writes]
        async with self._call("a fenced write"):
            resp = await kv.txn([kv.txn_compare_create_revision(fence[0], fence[1])], ops, timeout=self._op_timeout)
        if not resp.succeeded:
            raise Fenced(f"{fence[0].decode(errors='replace')} is no longer ours (created at {fence[1]})")
        return int(resp.header.revision)

    async def get(self, key: bytes) -> KeyValue | None:
        assert self._kv is not None
        async with self._call("a read"):
            resp = await self._kv.get(key, timeout=self._op_timeout)
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease)

    async def compact(self, revision: int) -> None:
        assert self._kv is not None
        async with self._call("a compaction"):
            await self._kv.compact(revision, physical=True, timeout=self._op_timeout)

    # --- reads ------------------------------------------------------------------------

    async def list_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` at one revision (paged, so any size fits a message)."""
        assert self._kv is not None
        end = prefix_range_end(prefix)
        items: list[KeyValue] = []
        revision, start = 0, prefix
        while True:
            async with self._call("a range read"):
                resp = await self._kv.get(start, end, revision=revision, limit=_PAGE, timeout=self._op_timeout)
            revision = revision or resp.header.revision
            self.cluster_id, self.raft_term = resp.header.cluster_id, resp.header.raft_term
            items.extend(KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return revision, items
            start = resp.kvs[-1].key + b"\0"

    async def health(self) -> StoreHealth:
        """A linearizable read of one key: fails when etcd is down, hung or without quorum."""
        assert self._kv is not None
        try:
            async with self._call("a health read"):
                resp = await self._kv.get(b"/discovery/health", timeout=self._op_timeout)
            self.raft_term = resp.header.raft_term
            return StoreHealth(True, resp.header.revision, "")
        except StoreUnavailable as exc:
            return StoreHealth(False, 0, str(exc))

    async def unchanged_since(self, prefix: bytes, revision: int, count: int, at: int) -> bool:
        """Whether the keys under ``prefix`` at revision ``at`` are exactly the ``count`` keys
        that were there at ``revision``: none modified after it and none gone. Two reads, used
        to trust a progress answer (never on a Resolve's own path). etcd applies
        ``min_mod_revision`` to the keys returned, not to ``count``: hence keys_only."""
        stub = KVStub(self.channel)
        end = prefix_range_end(prefix)
        async with self._call("a range count"):
            modified = await stub.Range(
                RangeRequest(key=prefix, range_end=end, revision=at, keys_only=True, min_mod_revision=revision + 1),
                timeout=self._op_timeout,
            )
            total = await stub.Range(
                RangeRequest(key=prefix, range_end=end, revision=at, count_only=True), timeout=self._op_timeout
            )
        return not modified.kvs and total.count == count

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncGenerator[WatchBatch, None]:
        """Events under ``prefix`` from ``start_revision`` on, never skipping one.

        Raises ``Compacted`` when the start revision is gone and ``StoreUnavailable`` when the
        stream breaks; the caller re-lists or resumes. The first batch says the watch is
        created; progress notifications (etcd's own and answers to ``request_progress``)
        arrive as batches without events.
        """
        requests: asyncio.Queue[Any] = asyncio.Queue()
        create = WatchCreateRequest(
            key=prefix, range_end=prefix_range_end(prefix), start_revision=start_revision, progress_notify=True
        )
        requests.put_nowait(WatchRequest(create_request=create))
        call = WatchStub(self.channel).Watch(metadata=_REQUIRE_LEADER)
        writer = asyncio.create_task(_pump(requests, call), name="etcd-watch-writer")
        try:
            while (resp := await call.read()) is not grpc.aio.EOF:
                self.raft_term = resp.header.raft_term or self.raft_term
                if resp.compact_revision > 0:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    raise StoreUnavailable(
                        f"etcd at {','.join(self.endpoints)} cancelled the watch: {resp.cancel_reason or 'no reason'}"
                    )
                if resp.created:
                    self._watch_requests = requests
                    yield WatchBatch(0, created=True)
                    if not resp.events:
                        continue
                events = [
                    Event(ev.type == _EVENT_DELETE, KeyValue(ev.kv.key, ev.kv.value, ev.kv.mod_revision, ev.kv.lease))
                    for ev in resp.events
                ]
                # A batch's header may run ahead of its events while etcd catches up an
                # unsynced watcher, so the position is the last event's revision; only an
                # empty (progress) response vouches for its header revision.
                if events:
                    yield WatchBatch(events[-1].kv.mod_revision, events)
                else:  # watch_id -1: an answer to a progress request, sent to every watch
                    yield WatchBatch(resp.header.revision, requested=resp.watch_id == -1)
            raise StoreUnavailable(f"etcd at {','.join(self.endpoints)} closed the watch stream")
        except grpc.aio.AioRpcError as exc:
            raise StoreUnavailable(f"etcd watch at {','.join(self.endpoints)} broke: {_describe(exc)}") from None
        finally:
            if self._watch_requests is requests:
                self._watch_requests = None
            call.cancel()
            await stop_task(writer)

    def request_progress(self) -> None:
        """Ask the current watch to report the revision it has delivered everything up to
        (a no-op while no watch is established). etcd before 3.5.8 may answer ahead of events
        it has still to send (etcd issue 15220): check the answer with ``unchanged_since``."""
        if self._watch_requests is not None:
            self._watch_requests.put_nowait(WatchRequest(progress_request=_rpc.WatchProgressRequest()))


class _LeaseKeepAliveStream:
    """One LeaseKeepAlive stream shared by every heartbeat of this server.

    Responses carry the lease id, so waiters are matched by id. A stream that errors or
    times out is dropped and the next refresh opens a new one.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._requests: asyncio.Queue[Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}

    async def refresh(self, lease_id: int) -> int:
        if self._reader is None or self._reader.done():
            self._open()
        assert self._requests is not None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(lease_id, []).append(fut)
        self._requests.put_nowait(LeaseKeepAliveRequest(ID=lease_id))
        try:
            return await fut
        finally:
            waiting = self._waiters.get(lease_id)
            if waiting and fut in waiting:
                waiting.remove(fut)

    def _open(self) -> None:
        self._requests = asyncio.Queue()
        call = LeaseStub(self._store.channel).LeaseKeepAlive()
        self._reader = asyncio.create_task(self._read(call, self._requests), name="etcd-keepalive-reader")

    async def _read(self, call: Any, requests: asyncio.Queue[Any]) -> None:
        writer = asyncio.create_task(_pump(requests, call), name="etcd-keepalive-writer")
        try:
            while (resp := await call.read()) is not grpc.aio.EOF:
                for fut in self._waiters.pop(resp.ID, []):
                    if not fut.done():
                        fut.set_result(resp.TTL)
        except grpc.aio.AioRpcError as exc:
            self._fail(StoreUnavailable(f"etcd lease keep-alive stream broke: {_describe(exc)}"))
        finally:
            call.cancel()
            await stop_task(writer)
            self._fail(StoreUnavailable("etcd lease keep-alive stream ended"))

    def _fail(self, exc: Exception) -> None:
        waiters, self._waiters = self._waiters, {}
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(exc)

    async def close(self) -> None:
        if self._reader is not None:
            await stop_task(self._reader)
            self._reader = None


async def _pump(requests: asyncio.Queue[Any], call: Any) -> None:
    """Write queued requests to a bidirectional stream. A task the stream's owner starts and
    stops: gRPC's own consumer of a request iterator is left pending when the call ends."""
    try:
        while True:
            await call.write(await requests.get())
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        call.cancel()  # the call is over; its reader sees why


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        details = exc.details() or ""
        if "too_many_pings" in details:  # etcd's default allows a ping every 5 s only
            details += " (etcd refuses our keep-alive pings: start it with --grpc-keepalive-min-time=1s or lower)"
        return f"{exc.code().name}: {details}"
    return str(exc) or type(exc).__name__
