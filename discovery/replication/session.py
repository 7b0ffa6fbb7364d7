"""Leader election for the replicators: one lease per server, one key per origin.

The winner's key lives on its server's lease, so it goes when the server dies (after the
lease TTL) or stops cleanly (at once: the lease is revoked). Every write a leader makes is
fenced on the key's create revision (``Store.fenced``): a leader that lost its lease while
hung, and wakes up believing it still leads, has its first write refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

from discovery.errors import NotFound, StoreUnavailable
from discovery.store import Fenced, Store, Write

log = logging.getLogger(__name__)

Fence = tuple[bytes, int]  # (election key, its create revision when we won it)
Lead = Callable[[Fence], Coroutine[Any, Any, None]]


class Resign(Exception):
    """Raised by a leader that should hand over: the election key is deleted and this server
    waits before campaigning again, so a standby wins."""


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


class Election:
    """Campaign for ``key`` until won, lead, and campaign again after losing it."""

    def __init__(
        self,
        store: Store,
        session: Session,
        key: bytes,
        identity: str,
        *,
        poll: float = 1.0,
        resign_pause: float = 5.0,
    ) -> None:
        self._store = store
        self._session = session
        self._key = key
        self._identity = identity.encode()
        self._poll = poll
        self._resign_pause = resign_pause  # after stepping down, long enough for a standby to win
        self.leading = False

    async def run(self, lead: Lead) -> None:
        while True:
            pause = self._poll
            try:
                lease = await self._session.lease()
                lost = self._session.lost
                created, _ = await self._store.create(self._key, self._identity, lease)
                if created and not await self._lead(lead, (self._key, created), lost):
                    pause = self._resign_pause
            except StoreUnavailable as exc:
                log.debug("election %s: %s", self._key.decode(), exc)
            except Exception:  # never die quietly: this origin would go unreplicated here
                log.exception("election %s: unexpected failure", self._key.decode())
            # Standbys poll: a failed create writes nothing, and takeover within a second of
            # the key's expiry is all we need.
            await asyncio.sleep(pause * random.uniform(0.8, 1.2))

    async def _lead(self, lead: Lead, fence: Fence, lost: asyncio.Event) -> bool:
        """Lead until the lease is lost or ``lead`` ends; False when it resigned."""
        log.info("election %s: leading (fence %d)", self._key.decode(), fence[1])
        self.leading = True
        task = asyncio.create_task(lead(fence), name=f"lead {self._key.decode()}")
        watch = asyncio.create_task(lost.wait())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                log.warning("election %s: lease lost, stepping down", self._key.decode())
            else:
                try:
                    task.result()
                except Fenced as exc:
                    log.warning("election %s: deposed (%s)", self._key.decode(), exc)
                except Resign as exc:
                    log.warning("election %s: stepping down: %s", self._key.decode(), exc)
                    with contextlib.suppress(StoreUnavailable, Fenced):
                        await self._store.fenced(fence, [Write(self._key, None)])
                    return False
                except Exception:
                    log.exception("election %s: leader failed; campaigning again", self._key.decode())
        finally:
            self.leading = False
            for t in (task, watch):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        return True
