"""Writes: register (leased or static), heartbeat, deregister (docs/architecture.md, write path).

A registration is acknowledged only once etcd has committed it, and its revision is
returned so the caller can read its own write back (Resolve ``min_revision``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from discovery.errors import InvalidArgument, NotFound, StoreUnavailable
from discovery.keys import KeySchema
from discovery.model import normalize_registration, validate_instance_id, validate_service
from discovery.store import Store
from discovery_pb.v1.types_pb2 import Instance

log = logging.getLogger(__name__)


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

    def prepare(self, request: Instance, owner: str) -> Instance:
        """The record a registration would store (validated; region and owner filled in)."""
        return normalize_registration(request, self.region, owner=owner)

    async def register(self, record: Instance, *, expect_mod_revision: int | None = None) -> Registered:
        """Put a prepared record (on a fresh lease when ttl > 0). Idempotent on
        (service, instance_id): a second registration replaces the first. With
        ``expect_mod_revision`` only if the record is still the one that was authorized
        against (0: none), else ``Conflict``."""
        key = self._keys.instance(self.region, record.service, record.instance_id)
        revision, lease_id, previous = await self._store.put(
            key, record.SerializeToString(), record.ttl_seconds, expect_mod_revision=expect_mod_revision
        )
        if previous and previous != lease_id:
            # The key moved to the new lease; the old one would only linger until its TTL.
            try:
                await self._store.revoke(previous)
            except StoreUnavailable as exc:
                log.info("registry: could not revoke replaced lease %x: %s", previous, exc)
        return Registered(record, revision, lease_id)

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
            revision, lease_id = await self._store.delete(self._keys.instance(self.region, service, instance_id))
        except NotFound:
            raise NotFound(
                f"instance {instance_id!r} of service {service!r} is not registered in region {self.region!r}"
            ) from None
        if lease_id:
            try:
                await self._store.revoke(lease_id)
            except StoreUnavailable as exc:
                log.info("registry: could not revoke lease %x of a deregistered instance: %s", lease_id, exc)
        return revision
