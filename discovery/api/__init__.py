"""gRPC adapters: one thin servicer per proto service, converting between protobuf and the
domain, and one table mapping domain errors to status codes."""

from discovery.api.admin import AdminServicer
from discovery.api.errors import status_for
from discovery.api.lookup import LookupServicer
from discovery.api.lookup import add_to_server as add_lookup_to_server
from discovery.api.registry import RegistryServicer
from discovery.api.replication import ReplicationServicer

__all__ = [
    "AdminServicer",
    "LookupServicer",
    "RegistryServicer",
    "ReplicationServicer",
    "add_lookup_to_server",
    "status_for",
]
