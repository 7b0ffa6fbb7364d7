"""Read-your-writes: the revision the view has applied, and reads that wait for a revision
(``min_revision``, a resume ahead of this server). A write outside the prefix moves etcd's
revision with no event for the view, so a waiting read asks etcd for a progress answer, and
that answer counts only once etcd confirms it (see ``AppliedRevision._confirm``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

from discovery.errors import RevisionNotReached, ShuttingDown, StoreUnavailable

_PROGRESS_INTERVAL = 0.1  # seconds between progress requests while reads wait


class ProgressSource(Protocol):
    """The part of the store that vouches for a revision the view has seen no event at."""

    def request_progress(self) -> None: ...

    async def unchanged_since(self, prefix: bytes, revision: int, count: int, at: int) -> bool: ...


class AppliedRevision:
    def __init__(
        self,
        source: ProgressSource,
        prefix: bytes,
        *,
        key_count: Callable[[], int],
        stale: Callable[[], bool],
    ) -> None:
        self._source = source
        self._prefix = prefix
        self._key_count = key_count  # keys under the prefix the view holds, served or not
        self._stale = stale  # only to say why a wait timed out
        self.value = 0  # everything up to here is applied (a confirmed progress answer may move it)
        self.progress = 0  # the highest revision etcd answered a progress request with
        self._progress_requested = 0.0
        self._advanced = asyncio.Event()
        self._confirming: asyncio.Task[bool] | None = None
        self._confirming_at = 0
        self._closing = False

    def advance(self, revision: int) -> None:
        if revision > self.value:
            self.value = revision
            self.wake()

    def progressed(self, revision: int) -> None:
        """etcd answered a progress request: to be confirmed before it counts (_confirm)."""
        self.progress = max(self.progress, revision)
        self.wake()

    def wake(self) -> None:
        self._advanced.set()
        self._advanced = asyncio.Event()

    def close(self) -> None:
        """At shutdown: every wait ends now with ShuttingDown."""
        self._closing = True
        if self._confirming is not None:
            self._confirming.cancel()
        self.wake()

    async def wait_for(self, revision: int, timeout: float) -> None:
        """Return once ``revision`` is applied; RevisionNotReached after ``timeout``,
        ShuttingDown when the server stops meanwhile."""
        if revision <= self.value:
            return
        try:
            async with asyncio.timeout(timeout):
                while self.value < revision:
                    if self._closing:
                        raise ShuttingDown("the server is shutting down")
                    if self.progress >= revision and await self._confirmed(revision):
                        break
                    self._request_progress()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await self._advanced.wait()
        except TimeoutError:
            raise RevisionNotReached(
                f"the view is at revision {self.value} and did not reach {revision} within {timeout:.3g}s"
                + (" (etcd unreachable)" if self._stale() else "")
            ) from None

    def _request_progress(self) -> None:
        """One progress request per interval, however many reads are waiting."""
        now = time.monotonic()
        if now - self._progress_requested >= _PROGRESS_INTERVAL:
            self._progress_requested = now
            self._source.request_progress()

    async def _confirmed(self, revision: int) -> bool:
        """Share one confirmation among every read waiting for ``revision`` or less."""
        task = self._confirming
        if task is None or (task.done() and not task.result()) or self._confirming_at < revision:
            task = asyncio.create_task(self._confirm(self.progress), name="view-confirm")
            self._confirming, self._confirming_at = task, self.progress
        return await asyncio.shield(task) and self.value >= revision

    async def _confirm(self, at: int) -> bool:
        """Move to revision ``at``, which etcd answered a progress request with, if etcd
        confirms nothing under our prefix changed between our revision and it.

        etcd before 3.5.8 (3.5.1 is what tests and dev run) may send that answer ahead of
        events it still owes the watch (etcd issue 15220), so it alone would let a read with
        ``min_revision`` miss a write. Same keys, none modified since: the view is exact at ``at``.
        """
        before, count = self.value, self._key_count()
        try:
            unchanged = await self._source.unchanged_since(self._prefix, before, count, at)
        except StoreUnavailable:
            return False
        if unchanged:
            self.advance(at)
        return unchanged
