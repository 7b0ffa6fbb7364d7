"""Writes: register (leased, on a session, or static), batches, sessions, heartbeat, deregister
(docs/architecture.md, write path).

A registration is acknowledged only once etcd has committed it, and its revision is
returned so the caller can read its own write back (Resolve ``min_revision``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from discovery.errors import Conflict, InvalidArgument, NotFound, StoreUnavailable
from discovery.health.spec import MIN_INTERVAL_MS, validate_registration
from discovery.keys import KeySchema
from discovery.model import MAX_TTL, MIN_TTL, normalize_registration, validate_instance_id, validate_service
from discovery.store import KeyValue, Store
from discovery_pb.v1.types_pb2 import Instance, Session

log = logging.getLogger(__name__)

BATCH_CHUNK = 100  # puts per etcd transaction: under etcd's default --max-txn-ops of 128
MAX_BATCH = 1000  # instances per RegisterBatch
CONFLICT_ATTEMPTS = 3  # conditional writes of one record or chunk before giving up (written concurrently)
MAX_SESSION_NAME = 128


def _session_of(value: bytes) -> int:
    try:
        return Instance.FromString(value).session_id
    except Exception:  # not ours to judge here: treat as a lease of its own
        return 0


@dataclass(frozen=True, slots=True)
class Registered:
    instance: Instance
    revision: int
    lease_id: int


class Registry:
    def __init__(self, store: Store, keys: KeySchema, region: str) -> None:
        self._store = store
        self._keys = keys
        self.region = region
        self.min_check_interval_ms = MIN_INTERVAL_MS  # the server's health_min_interval_seconds

    def prepare(self, request: Instance, owner: str) -> Instance:
        """The record a registration would store (validated; region and owner filled in; its
        health check validated, and no check verdict: that is the checker's)."""
        record = normalize_registration(request, self.region, owner=owner)
        validate_registration(record, min_interval_ms=self.min_check_interval_ms)
        return record

    async def register(
        self, record: Instance, *, session: int = 0, expect_mod_revision: int | None = None
    ) -> Registered:
        """Put a prepared record: on ``session``'s lease when given, else on a fresh lease when
        ttl > 0, else on none. Idempotent on (service, instance_id): a second registration
        replaces the first. With ``expect_mod_revision`` only if the record is still the one
        that was authorized against (0: none), else ``Conflict``."""
        if session:
            record.session_id = session
        key = self._keys.instance(self.region, record.service, record.instance_id)
        revision, lease_id, previous = await self._store.put(
            key,
            record.SerializeToString(),
            0 if session else record.ttl_seconds,
            lease=session,
            expect_mod_revision=expect_mod_revision,
        )
        await self._release(previous, lease_id)
        return Registered(record, revision, lease_id)

    async def register_batch(
        self,
        records: list[Instance],
        session: int = 0,
        *,
        expected: list[int] | None = None,
        recheck: Callable[[Instance, KeyValue | None], None] | None = None,
    ) -> tuple[int, list[Registered]]:
        """Put prepared records, static or on ``session``'s lease, one transaction per chunk of
        ``BATCH_CHUNK`` (each all or nothing). Returns the last revision and a result each.

        With ``expected`` (a mod_revision per record, 0: absent) a chunk is written only over
        the records that were authorized: when one changed meanwhile, ``recheck(record, what
        is there now)`` decides again (raising to refuse) and the chunk is tried again over
        what is there now, a few times at most, as Register does."""
        done: list[Registered] = []
        revision = 0
        for start in range(0, len(records), BATCH_CHUNK):
            chunk = records[start : start + BATCH_CHUNK]
            keys = [self._keys.instance(self.region, r.service, r.instance_id) for r in chunk]
            if session:
                for record in chunk:
                    record.session_id = session
            wanted = expected[start : start + BATCH_CHUNK] if expected is not None else None
            for attempt in range(CONFLICT_ATTEMPTS):
                items = [(key, record.SerializeToString()) for key, record in zip(keys, chunk, strict=True)]
                try:
                    revision, previous = await self._store.put_many(items, lease=session, expected=wanted)
                    break
                except Conflict as exc:
                    if recheck is None or attempt == CONFLICT_ATTEMPTS - 1:
                        raise StoreUnavailable(
                            "instances of this batch kept changing while it was being registered: retry"
                        ) from None
                    wanted = []
                    for record, current in zip(chunk, exc.currents, strict=True):
                        found = current if isinstance(current, KeyValue) else None
                        recheck(record, found)
                        wanted.append(found.mod_revision if found is not None else 0)
            for record, before in zip(chunk, previous, strict=True):
                await self._release(before, session)
                done.append(Registered(record, revision, session))
        return revision, done

    async def _release(self, previous: KeyValue | None, lease_id: int) -> None:
        """Revoke the lease the record had before if it was the record's own: the key moved
        off it, and it would only linger until its TTL. A session's lease holds other
        instances and is never revoked here."""
        if previous is None or not previous.lease or previous.lease == lease_id:
            return
        if _session_of(previous.value):
            return
        try:
            await self._store.revoke(previous.lease)
        except StoreUnavailable as exc:
            log.info("registry: could not revoke replaced lease %x: %s", previous.lease, exc)

    async def open_session(self, ttl: int, owner: str, name: str) -> tuple[Session, int]:
        """A new session: a lease of ``ttl`` seconds and its record on it (which says whose it
        is). Returns the record and the revision that wrote it."""
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise InvalidArgument("ttl_seconds", f"{ttl} must be from {MIN_TTL} to {MAX_TTL} seconds")
        if len(name) > MAX_SESSION_NAME:
            raise InvalidArgument("name", f"at most {MAX_SESSION_NAME} characters")
        lease = await self._store.grant(ttl)
        session = Session(
            session_id=lease,
            region=self.region,
            owner=owner,
            name=name,
            ttl_seconds=ttl,
            opened_at_ms=int(time.time() * 1000),
        )
        revision, _, _ = await self._store.put(
            self._keys.session(self.region, lease), session.SerializeToString(), lease=lease
        )
        return session, revision

    async def session(self, session_id: int) -> Session | None:
        """The session's record as etcd has it now (None: expired, closed or never opened)."""
        kv = await self._store.get(self._keys.session(self.region, session_id))
        return Session.FromString(kv.value) if kv is not None else None

    async def close_session(self, session_id: int) -> int:
        """Revoke the session's lease: its record and every instance on it go at once."""
        await self._store.revoke(session_id)
        health = await self._store.health()
        return health.revision

    async def heartbeat(self, lease_id: int) -> int:
        """Refresh a registration's lease; returns the seconds it now has left."""
        if lease_id <= 0:
            raise InvalidArgument("lease_id", f"{lease_id} is not a lease: pass the lease_id Register returned")
        try:
            return await self._store.keep_alive(lease_id)
        except NotFound:
            raise NotFound(f"lease {lease_id} has expired or was revoked: register again") from None

    async def deregister(self, service: str, instance_id: str) -> int:
        validate_service(service)
        validate_instance_id(instance_id)
        try:
            revision, previous = await self._store.delete(self._keys.instance(self.region, service, instance_id))
        except NotFound:
            raise NotFound(
                f"instance {instance_id!r} of service {service!r} is not registered in region {self.region!r}"
            ) from None
        await self._release(previous, 0)
        return revision
