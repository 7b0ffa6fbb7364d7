"""``GET /v1/events``: the view's changes as Server-Sent Events, read through the same feed
the Watch RPC reads (discovery/view/feed.py), with the same resume rule.

Each event is one Watch message in ``discovery watch --json``'s form (discovery/answers.py):
``event: snapshot`` (``more`` true until the last chunk), ``event: changes``, and
``event: keepalive`` when nothing changed for a while. Its ``id`` is the view revision it
brings the reader to, so a reconnecting ``EventSource`` (which sends ``Last-Event-ID``), or
a script passing ``?since=REVISION``, gets the changes after it from the history; an id older
than the history gets a snapshot first, as Watch does. Snapshot chunks but the last carry no
id: a reader cut off mid-snapshot resumes from before it. ``Last-Event-ID`` wins over
``since``: a page that opened ``?since=N`` reconnects to the same URL with its later id.

Instances appear with the status they are served as (``model.served``), as in Resolve and
Watch: a SERVING instance whose health check fails is NOT_SERVING here too.

A slow reader costs bounded memory (its subscription keeps the latest change per instance)
and never holds up anyone else; one that takes no bytes for ``WRITE_TIMEOUT`` is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from discovery.answers import change_dict, watch_dict
from discovery.api.lookup import snapshot_messages
from discovery.errors import DiscoveryError, InvalidArgument, ResourceExhausted, ShuttingDown
from discovery.http.api import MAX_REVISION, only
from discovery.http.auth import RequestContext
from discovery.http.errors import from_error
from discovery.http.sources import Sources
from discovery.model import served, validate_service
from discovery.view import SNAPSHOT_CHUNK, Changes, Snapshot, updates
from discovery_pb.v1 import lookup_pb2 as pb
from discovery_pb.v1.types_pb2 import Change, CheckResult

WRITE_TIMEOUT = 30.0
MAX_KEEPALIVE = 2.0  # the dashboard refreshes region freshness on every event
RETRY_MS = 1000
_ENCODED_CHANGES = 4096
_PLACEHOLDER = "\x00changes"
_PLACEHOLDER_JSON = json.dumps(_PLACEHOLDER)


class Events:
    def __init__(self, sources: Sources, max_streams: int) -> None:
        self._s = sources
        self._max = max_streams
        self._open: set[asyncio.Task[Any]] = set()
        # Per stream, whether its caller may still have it after a policy reload (``revoke``).
        self._rechecks: dict[asyncio.Task[Any], Callable[[], DiscoveryError | None]] = {}
        self._changes: dict[tuple[int, str, str, str, int], str] = {}  # encoded changes, see _send
        self.closing = False

    def __len__(self) -> int:
        return len(self._open)

    def revoke(self) -> int:
        """End the streams whose caller the policy in force no longer allows to read them
        (a reload revoked the grant or denied the identity). The connection closes; the
        reader's reconnect is authorized afresh and refused (401/403), which an EventSource
        takes as final. Returns how many were ended."""
        ended = 0
        for task, recheck in list(self._rechecks.items()):
            if recheck() is not None:
                self._rechecks.pop(task, None)
                task.cancel()
                ended += 1
        return ended

    async def handle(self, request: web.Request) -> web.StreamResponse:
        s = self._s
        try:
            only(request, ("service", "since"))
            service = request.query.get("service", "")
            if service:
                validate_service(service)
            since = _since(request)
            caller, grants = s.guard.caller(RequestContext(request), "Events")
            s.guard.require_read(caller, grants, "Events", service)
            if self.closing or s.view.closing:
                raise ShuttingDown("the server is shutting down; reconnect to another server with Last-Event-ID")
            if len(self._open) >= self._max:
                raise ResourceExhausted(
                    "http_max_streams",
                    f"this server has {self._max} event streams open, its limit: retry later or use another server",
                    retry_after=1.0,
                )
            slot = s.guard.open_stream(caller, grants, "Events", service)
        except DiscoveryError as exc:
            return from_error(exc)
        task = asyncio.current_task()
        assert task is not None
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # proxies pass events on at once
                "X-Content-Type-Options": "nosniff",
            }
        )
        # Counted from here, a wait for a future revision included: a waiting request holds a
        # connection as a stream does, so it takes a stream's place under both limits.
        self._open.add(task)
        self._rechecks[task] = lambda: s.guard.still_allowed(caller, "Events", service)
        try:
            with slot:
                if since > s.view.revision:
                    try:
                        await s.view.wait_for(since, s.lookup.max_wait)
                    except DiscoveryError as exc:
                        return from_error(exc)
                await response.prepare(request)
                await self._write(response, f"retry: {RETRY_MS}\n\n")
                await self._follow(response, service, since)
        except (ConnectionError, TimeoutError):
            pass  # the reader left or stalled; it resumes with its last id
        finally:
            self._open.discard(task)
            self._rechecks.pop(task, None)
        return response

    async def _follow(self, response: web.StreamResponse, service: str, since: int) -> None:
        idle = min(self._s.config.watch_keepalive_seconds, MAX_KEEPALIVE)
        feed = updates(self._s.view, service, since=since, idle=idle, chunk=SNAPSHOT_CHUNK)
        async with contextlib.aclosing(feed):
            async for batch in feed:
                if isinstance(batch, Snapshot):
                    messages = snapshot_messages(batch)
                    for i, message in enumerate(messages):
                        await self._send(response, "snapshot", message, with_id=i == len(messages) - 1)
                elif batch.closing or self.closing:
                    break
                else:
                    await self._send_changes(response, batch)

    async def _send(
        self, response: web.StreamResponse, event: str, message: pb.WatchResponse, *, with_id: bool = True
    ) -> None:
        data = json.dumps(watch_dict(message), separators=(",", ":"))
        head = f"id: {message.revision}\n" if with_id else ""
        await self._write(response, f"{head}event: {event}\ndata: {data}\n\n")

    async def _send_changes(self, response: web.StreamResponse, batch: Changes) -> None:
        """A batch as ``changes`` (``keepalive`` when empty). Each change is encoded once for
        every stream it goes to (a change to a watched service reaches them all), and the
        batch's messages are not copied into a WatchResponse: per stream, a join and a write."""
        if not batch.changes:
            message = pb.WatchResponse(kind=pb.WatchResponse.KEEPALIVE, revision=batch.revision, stale=batch.stale)
            await self._send(response, "keepalive", message)
            return
        shell = watch_dict(pb.WatchResponse(kind=pb.WatchResponse.CHANGES, revision=batch.revision, stale=batch.stale))
        text = json.dumps({**shell, "changes": _PLACEHOLDER}, separators=(",", ":"))
        data = text.replace(_PLACEHOLDER_JSON, self._encoded(batch.changes), 1)
        await self._write(response, f"id: {batch.revision}\nevent: changes\ndata: {data}\n\n")

    def _encoded(self, changes: Iterable[Change]) -> str:
        cache = self._changes
        parts = []
        for change in changes:
            key = (change.revision, change.region, change.service, change.instance_id, change.kind)
            text = cache.get(key)
            if text is None:
                if len(cache) >= _ENCODED_CHANGES:
                    cache.clear()
                text = cache[key] = json.dumps(change_dict(_as_served(change)), separators=(",", ":"))
            parts.append(text)
        return "[" + ",".join(parts) + "]"

    async def _write(self, response: web.StreamResponse, text: str) -> None:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await response.write(text.encode())

    def close(self) -> None:
        """No new streams; the open ones end with the view's subscriptions (shutdown), and
        their readers reconnect elsewhere with their last id."""
        self.closing = True


def _as_served(change: Change) -> Change:
    """``change`` with its instance as served (``model.served``); a copy when that differs,
    so the view's message stays as stored."""
    if change.instance.check_result.state != CheckResult.CRITICAL:
        return change
    copy = Change()
    copy.CopyFrom(change)
    served(copy.instance)
    return copy


def _since(request: web.Request) -> int:
    """The ``Last-Event-ID`` header (an EventSource reconnecting: its position), else
    ``?since=N`` (where the page or script started); 0: a snapshot first. Both are checked."""
    found = [
        _revision(name, raw)
        for name, raw in (
            ("Last-Event-ID", request.headers.get("Last-Event-ID")),
            ("since", request.query.get("since")),
        )
        if raw
    ]
    return found[0] if found else 0


def _revision(name: str, raw: str) -> int:
    try:
        value = int(raw, 10)
    except ValueError:
        raise InvalidArgument(name, f"{raw[:40]!r} is not a revision (a whole number)") from None
    if not 0 <= value <= MAX_REVISION:
        raise InvalidArgument(name, "must be a revision >= 0")
    return value
