"""The etcd key schema (docs/architecture.md). Every key the server touches is built and parsed here.

    <prefix>instances/<origin>/<service>/<instance_id>   Instance (protobuf bytes)
    <prefix>replication/<origin>                          Checkpoint of the replicator for origin
    <prefix>election/replicator/<origin>                  the replicator leader's key (on its lease)
    <prefix>sessions/<region>/<session_id hex>            Session (on the session's own lease)
    <prefix>health/members/<region>/<address>             a health checker (on its own lease)

The prefix defaults to ``/discovery/v1/``; tests give each case its own prefix so they can
share one etcd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

DEFAULT_PREFIX = "/discovery/v1/"


class InstanceKey(NamedTuple):
    """An instance's identity, the one shape the server keys instances by in memory; its etcd
    key is ``KeySchema.instance_key``. A tuple: the view hashes one for every event it applies."""

    region: str
    service: str
    instance_id: str


@dataclass(frozen=True, slots=True)
class KeySchema:
    prefix: str = DEFAULT_PREFIX

    @property
    def root(self) -> bytes:
        """The range every server's one watch covers."""
        return self.prefix.encode()

    @property
    def instances(self) -> bytes:
        return f"{self.prefix}instances/".encode()

    def region_instances(self, region: str) -> bytes:
        return f"{self.prefix}instances/{region}/".encode()

    def checkpoint(self, origin: str) -> bytes:
        return f"{self.prefix}replication/{origin}".encode()

    def election(self, origin: str) -> bytes:
        return f"{self.prefix}election/replicator/{origin}".encode()

    def session(self, region: str, session_id: int) -> bytes:
        return f"{self.prefix}sessions/{region}/{session_id:x}".encode()

    def health_members(self, region: str) -> bytes:
        """The region's health checkers, one key each (docs/health-checks.md)."""
        return f"{self.prefix}health/members/{region}/".encode()

    def instance(self, region: str, service: str, instance_id: str) -> bytes:
        return f"{self.prefix}instances/{region}/{service}/{instance_id}".encode()

    def instance_key(self, key: InstanceKey) -> bytes:
        return self.instance(key.region, key.service, key.instance_id)

    def parse_instance(self, key: bytes) -> InstanceKey | None:
        """Split an instance key; None for a key that is not one (never raises on foreign keys)."""
        head = self.instances
        if not key.startswith(head):
            return None
        parts = key[len(head) :].decode("utf-8", "replace").split("/")
        if len(parts) != 3 or not all(parts):
            return None
        return InstanceKey(*parts)
