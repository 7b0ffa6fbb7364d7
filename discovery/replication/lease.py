"""The server's election lease: one per server, kept alive in the background.

Every replicator this server leads keeps its election key on this one lease (``election``),
so a server that dies loses all its leaderships after one TTL, and one that stops cleanly
revokes the lease and hands them over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from discovery.errors import NotFound, StoreUnavailable
from discovery.store import Store

log = logging.getLogger(__name__)


class Session:
    """The server's election lease, kept alive in the background. ``lease()`` grants one
    when there is none; ``lost`` is set when the current one expires or cannot be refreshed
    within its TTL (then every leadership on it must stop: the keys may be gone)."""

    def __init__(self, store: Store, ttl: int) -> None:
        self._store = store
        self.ttl = ttl
        self.lease_id = 0
        self.lost = asyncio.Event()
        self._refreshed = 0.0
        self._granting = asyncio.Lock()

    async def lease(self) -> int:
        # Elections start together: without the lock each would grant a lease of its own,
        # and all but the last would expire unrefreshed, deposing their leaders.
        async with self._granting:
            if not self.lease_id:
                self.lease_id = await self._store.grant(self.ttl)
                self._refreshed = time.monotonic()
                self.lost = asyncio.Event()
            return self.lease_id

    async def run(self) -> None:
        """Refresh the lease three times per TTL; each refresh may take a third of it, so one
        slow answer (an etcd leader change) still leaves two more tries before expiry."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not self.lease_id:
                continue
            try:
                await self._store.keep_alive(self.lease_id, timeout=self.ttl / 3)
                self._refreshed = time.monotonic()
            except NotFound:
                self._drop("expired")
            except StoreUnavailable as exc:
                if time.monotonic() - self._refreshed > self.ttl:
                    self._drop(f"not refreshed for {self.ttl}s: {exc}")
            except Exception:  # never die quietly: every leadership of this server rides on it
                log.exception("election lease refresh failed unexpectedly")

    def _drop(self, why: str) -> None:
        log.warning("election lease %x lost (%s): stepping down from every replicator", self.lease_id, why)
        self.lease_id = 0
        self.lost.set()

    async def close(self) -> None:
        """Revoke the lease so standbys take over now rather than after the TTL."""
        if self.lease_id:
            lease, self.lease_id = self.lease_id, 0
            self.lost.set()
            with contextlib.suppress(StoreUnavailable):
                await self._store.revoke(lease)
