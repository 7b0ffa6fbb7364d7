"""Domain exceptions. The gRPC adapters map them to status codes in one table
(``discovery.api.errors``); nothing matches on message text.

    DiscoveryError
     +-- InvalidArgument     a request breaks a validation rule (names the field and the rule)
     +-- NotFound            the instance or lease named does not exist (any more)
     +-- StoreUnavailable    etcd did not answer in time or refused the connection
     +-- RevisionNotReached  the view did not reach a requested revision before the deadline
     +-- ShuttingDown        the server is stopping and takes no new work
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


class RevisionNotReached(DiscoveryError):
    """Raised when a read asked for ``min_revision`` and the view did not get there in time."""


class ShuttingDown(DiscoveryError):
    """Raised for new work that arrives after shutdown has begun."""
