"""The etcd follow loop: list the prefix at revision R, watch from R+1, and keep doing so.
A watch that falls behind a compaction re-lists; one that loses etcd marks the view stale and
reconnects with backoff, resuming after the last revision it applied, so no event is skipped
(docs/architecture.md, read path)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Protocol, cast

from discovery.errors import Compacted, StoreUnavailable
from discovery.store import Event, KeyValue, WatchBatch
from discovery.view.recovery import Recovery
from discovery_client import RetryPolicy

log = logging.getLogger("discovery.view")  # one logger for the whole view, whichever part speaks


class WatchSource(Protocol):
    """The part of the store the loop reads: a listing, and a watch that ends by raising
    (``Compacted`` or ``StoreUnavailable``)."""

    async def list_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]: ...

    def watch(self, prefix: bytes, start_revision: int) -> AsyncGenerator[WatchBatch, None]: ...


class PagedSource(WatchSource, Protocol):
    """A source that can also list a page at a time (``discovery.store.Store``)."""

    def list_pages(self, prefix: bytes) -> AsyncGenerator[tuple[int, list[KeyValue]], None]: ...


class Listing(Protocol):
    """Takes a listing in a page at a time: ``page`` for each (all at one revision), then
    ``done`` once the last has come. Dropped unfinished when the listing fails."""

    def page(self, revision: int, items: list[KeyValue]) -> None: ...

    def done(self, revision: int) -> None: ...


Listed = Callable[[int, list[KeyValue]], None]  # (revision, every key-value under the prefix)
# A listing taken in a page at a time, when the view can (None: all at once, through Listed).
Paged = Callable[[], Listing | None]
Applied = Callable[[list[Event], int], None]  # (events, the revision everything is delivered up to)
Progressed = Callable[[int], None]  # etcd's answer to a progress request, still unconfirmed


def _has_pages(source: object) -> bool:
    return callable(getattr(source, "list_pages", None))


class Follower:
    """Runs the loop and says whether it is following etcd now (``watching``); what it reads
    goes to the view through the three callbacks."""

    def __init__(
        self,
        source: WatchSource,
        prefix: bytes,
        recovery: Recovery,
        *,
        listed: Listed,
        applied: Applied,
        progressed: Progressed,
        paged: Paged | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._source = source
        self._prefix = prefix
        self._recovery = recovery
        self._listed = listed
        self._applied = applied
        self._progressed = progressed
        self._paged = paged
        # Only the backoff fields apply: the watch reconnects until the server stops it.
        self.retry = retry or RetryPolicy()
        self.watching = False
        self.last_contact = 0.0  # time.monotonic() of the last word from etcd
        self.last_error = ""
        self._resume = 0  # the watch resumes after this: the last event's or listing's revision
        self._failures = 0  # in a row, for the reconnect backoff

    async def run(self) -> None:
        """List, then watch; re-list on compaction; reconnect with backoff when etcd fails."""
        must_list = True
        while True:
            try:
                if must_list:
                    await self._load()
                    must_list = False
                async with contextlib.aclosing(self._source.watch(self._prefix, self._resume + 1)) as batches:
                    await self._follow(batches)
            except Compacted as exc:
                log.warning("view: watch fell behind a compaction (%s); re-listing", exc)
                must_list = True
            except StoreUnavailable as exc:
                self._lost(str(exc))
                await self._backoff()
            except Exception as exc:  # a bug must not freeze the view while it claims to be fresh
                log.exception("view: unexpected failure; re-listing")
                self._lost(f"unexpected {type(exc).__name__}: {exc}")
                must_list = True
                await self._backoff()

    async def _backoff(self) -> None:
        await asyncio.sleep(self.retry.delay(self._failures))
        self._failures += 1

    async def _load(self) -> None:
        listing = self._paged() if self._paged is not None and _has_pages(self._source) else None
        if listing is None:
            revision, items = await self._source.list_prefix(self._prefix)
            self._listed(revision, items)
        else:
            # Each page taken in (decoded, kept compactly) before the next is read: the
            # listing as etcd sent it is never all in memory at once.
            revision = 0
            source = cast(PagedSource, self._source)
            async with contextlib.aclosing(source.list_pages(self._prefix)) as pages:
                async for revision, page in pages:
                    listing.page(revision, page)
            listing.done(revision)
        self._resume = revision
        self._contact()

    async def _follow(self, batches: AsyncIterator[WatchBatch]) -> None:
        """Apply a watch's batches until it ends (it always ends by raising)."""
        async for batch in batches:
            if not self.watching:
                log.info("view: watching etcd from revision %d", self._resume + 1)
            self._contact()
            if batch.created:
                continue
            if batch.requested:  # never a point to resume from: see WatchBatch
                self._progressed(batch.revision)
                continue
            self._applied(batch.events, batch.revision)
            self._resume = max(self._resume, batch.revision)

    def _contact(self) -> None:
        if not self.watching:
            self._recovery.back()
        self.watching, self.last_contact, self._failures = True, time.monotonic(), 0

    def _lost(self, error: str) -> None:
        self.last_error = error
        if self.watching:
            log.warning("view: lost etcd (%s); serving the last view, marked stale", error)
            # The watch was alive (keep-alive answered) until about now, events or not.
            self.last_contact = time.monotonic()
            self._recovery.lost()
        self.watching = False
