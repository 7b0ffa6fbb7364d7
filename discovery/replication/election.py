"""Leader election for the replicators: one key per origin, on the server's lease.

The winner's key lives on its server's lease (``lease.Session``), so it goes when the server
dies (after the lease TTL) or stops cleanly (at once: the lease is revoked). Every write a
leader makes is fenced on the key's create revision (``Store.fenced``): a leader that lost its
lease while hung, and wakes up believing it still leads, has its first write refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

from discovery.errors import Fenced, StoreUnavailable
from discovery.replication.lease import Session
from discovery.store import Store, Write

log = logging.getLogger(__name__)

Fence = tuple[bytes, int]  # (election key, its create revision when we won it)
Lead = Callable[[Fence], Coroutine[Any, Any, None]]


class Resign(Exception):
    """Raised by a leader that should hand over: the election key is deleted and this server
    waits before campaigning again, so a standby wins."""


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
