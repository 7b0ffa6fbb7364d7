"""Which servers of the region run checks, and which of them runs each check.

Each checking server keeps a key ``<prefix>health/members/<region>/<identity>`` on a lease of
its own (value: the address other servers reach it at). Every server lists those keys each
``poll`` seconds (and at once when a write says the list moved) and gives each check to the
member that ranks highest for it by rendezvous hashing: a server joining takes only its share,
a server leaving (stopped: its lease revoked; dead: its lease expired) gives only its own
checks away, spread over the others. Verdicts are fenced on this list (``Store.put_fenced``):
a writer whose key is gone, or who has not yet seen a member that joined, cannot write."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence

from discovery.errors import Fenced, StoreUnavailable
from discovery.replication import Session
from discovery.store import Store

log = logging.getLogger(__name__)


def rank(member: str, check: str) -> bytes:
    return hashlib.blake2b(f"{member}\0{check}".encode(), digest_size=8).digest()


def owner(members: Sequence[str], check: str) -> str:
    """The member that runs ``check`` (rendezvous hashing); "" when there is none."""
    return max(members, key=lambda m: rank(m, check), default="")


class Membership:
    def __init__(self, store: Store, prefix: bytes, identity: str, *, ttl: int, poll: float = 1.0) -> None:
        self._store = store
        self.prefix = prefix
        self.identity = ""
        self.key = b""
        self.set_identity(identity)
        self._session = Session(store, ttl)
        self._poll = poll
        self.members: tuple[str, ...] = ()
        self.addresses: dict[str, str] = {}
        self.listed_at = 0
        self.fence: tuple[bytes, int] | None = None  # our key and its create revision
        self.changed = asyncio.Event()  # set whenever ``members`` or ``fence`` change
        self.listeners: list[Callable[[], None]] = []  # called then too
        self._refresh = asyncio.Event()
        self.ready = asyncio.Event()  # tried to join, and listed, once
        self._blocked = False

    def set_identity(self, identity: str) -> None:
        """Before ``run``: the address the others reach this server at (known once it listens)."""
        self.identity = identity
        self.key = self.prefix + identity.encode()

    @property
    def joined(self) -> bool:
        return self.fence is not None and self.identity in self.members

    def peers(self) -> list[str]:
        """The other members' addresses."""
        return [self.addresses[m] for m in self.members if m != self.identity and m in self.addresses]

    def refresh(self) -> None:
        """List again now (a fenced write failed: the list moved)."""
        self._refresh.set()

    async def run(self) -> None:
        keeper = asyncio.create_task(self._session.run(), name="health membership lease")
        try:
            while True:
                try:
                    if self.fence is None or self._session.lost.is_set():
                        await self._join()
                    await self._list()
                except (StoreUnavailable, Fenced) as exc:
                    log.info("health checks: membership: %s", exc)
                except Exception:  # never die quietly: this server's checks would stop
                    log.exception("health checks: membership failed unexpectedly")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll):
                        await self._refresh.wait()
                self._refresh.clear()
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _join(self) -> None:
        if self.fence is not None:
            log.warning("health checks: membership lease lost: joining again")
            self.fence = None
            self._moved()
        lease = await self._session.lease()
        created, held = await self._store.create(self.key, self.identity.encode(), lease)
        if not created:
            if held is not None and not self._blocked:
                # Never deleted: two servers with one address (listening on 0.0.0.0 without
                # `advertise`) would take the key from each other forever.
                log.warning(
                    "health checks: %s is held on another lease (an earlier run of this server, or another "
                    "server with the same address: give each its own `advertise`); joining once it expires",
                    self.key.decode(),
                )
            self._blocked = held is not None
            return
        self._blocked = False
        self.fence = (self.key, created)
        log.info("health checks: %s joined the region's checkers (fence %d)", self.identity, created)
        self._moved()

    async def _list(self) -> None:
        revision, kvs = await self._store.list_prefix(self.prefix)
        addresses = {kv.key[len(self.prefix) :].decode(): kv.value.decode() for kv in kvs}
        members = tuple(sorted(addresses))
        moved = members != self.members
        self.members, self.addresses, self.listed_at = members, addresses, revision
        self.ready.set()
        if moved:
            log.info("health checks: the region's checkers are now %s", ", ".join(members) or "none")
            self._moved()

    def _moved(self) -> None:
        self.changed.set()
        for listener in self.listeners:
            listener()

    async def leave(self) -> None:
        """Revoke the lease: the key goes at once and the others take this server's checks."""
        self.fence = None
        await self._session.close()
