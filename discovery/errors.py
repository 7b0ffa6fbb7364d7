"""Domain exceptions. The gRPC adapters map them to status codes in one table
(``discovery.api.errors``); nothing matches on message text.

    DiscoveryError
     +-- InvalidArgument     a request breaks a validation rule (names the field and the rule)
     +-- NotFound            the instance or lease named does not exist (any more)
     +-- StoreUnavailable    etcd did not answer in time or refused the connection
     |    +-- StoreForbidden etcd refused this server's own identity (its RBAC role)
     +-- RevisionNotReached  the view did not reach a requested revision before the deadline
     +-- ShuttingDown        the server is stopping and takes no new work
     +-- Unauthenticated     the caller's certificate names no identity this server's policy knows
     +-- PermissionDenied    the identity lacks the grant (or etcd refused this server's own identity)
     +-- AuditFailed         the audit log cannot be written, so writes are refused (fail closed)
     +-- ResourceExhausted   over a limit (``limit`` names it; ``retry_after`` seconds, 0 when unknown)
     +-- Fenced              a replicator's fenced write found it no longer leads
     +-- Compacted           the view's watch asked for a revision etcd has compacted away
     +-- Conflict            a conditional put found the key changed since the caller looked

The last three never reach a caller: the election, the view and the registry handle them.
"""

from __future__ import annotations


class DiscoveryError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidArgument(DiscoveryError):
    """Raised by validation before anything is written; ``field`` names the culprit."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class NotFound(DiscoveryError):
    """Raised when a deregistration or heartbeat names something that is not there."""


class StoreUnavailable(DiscoveryError):
    """Raised when etcd is unreachable, hung or refuses a write within the write timeout."""


class StoreForbidden(StoreUnavailable):
    """Raised when etcd refuses the server's own etcd user: callers see UNAVAILABLE (nothing
    they did wrong, and another region's server may serve them); the server refuses to start."""


class RevisionNotReached(DiscoveryError):
    """Raised when a read asked for ``min_revision`` and the view did not get there in time."""


class ShuttingDown(DiscoveryError):
    """Raised for new work that arrives after shutdown has begun."""


class Unauthenticated(DiscoveryError):
    """Raised when a caller's certificate carries no usable identity, or one the policy lacks."""


class PermissionDenied(DiscoveryError):
    """Raised when a known identity asks for something its grants do not cover."""


class AuditFailed(DiscoveryError):
    """Raised for a write while the audit log cannot be written (and the server fails closed)."""


class ResourceExhausted(DiscoveryError):
    """Raised when a caller (or the region) is over a limit. ``limit`` is the limit's name as
    clients see it in ``discovery-limit`` (``writes_per_second``, ``etcd_space``, ...)."""

    def __init__(self, limit: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after


class Fenced(DiscoveryError):
    """Raised by ``Store.fenced`` when the fence key (the writer's election key) is gone or
    was re-created: a deposed replicator's late write must not land, so the election steps down."""


class Compacted(DiscoveryError):
    """Raised by ``Store.watch`` when its start revision has been compacted away: the view
    re-lists and watches from there, since skipping ahead would lose events."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


class Conflict(DiscoveryError):
    """Raised by ``Store.put`` with ``expect_mod_revision`` when the key changed meanwhile;
    ``current`` is what is there now (None: nothing). From ``Store.put_many`` with expected
    revisions: ``currents`` holds every key of the transaction as it is now."""

    def __init__(self, current: object, currents: list[object] | None = None) -> None:
        super().__init__("the key changed since it was read")
        self.current = current
        self.currents = currents or []
