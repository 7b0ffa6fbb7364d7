"""discovery_client: the Python client of the multi-region discovery service.

Resolve from a local cache fed by Watch, fail over between servers and regions, keep
answering (stale) when every server is gone, register and drain, and gRPC channels that
follow a service's endpoints; ``DirectClient``, the low-level face, makes one call at a time
to servers you name. Channels are mTLS from ``TlsConfig`` (``DISCOVERY_TLS_*``), or
plaintext only with ``DISCOVERY_INSECURE=1``. Needs grpcio and protobuf only. See clients/README.md.
"""

from discovery_client.channel import AioServiceChannel, SyncServiceChannel
from discovery_client.checks import CheckState, check
from discovery_client.client import DiscoveryClient
from discovery_client.config import ClientConfig, RegionServers
from discovery_client.direct import DirectClient
from discovery_client.errors import (
    AccessDenied,
    ConfigError,
    DiscoveryClientError,
    InvalidArgument,
    NoEndpoints,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
    Unreachable,
    from_rpc_error,
)
from discovery_client.guard import GuardPolicy
from discovery_client.model import DEFAULT_WEIGHT, Endpoint, Resolution, Scope, Status
from discovery_client.picker import Strategy
from discovery_client.registration import Registration, instance_message
from discovery_client.retry import RetryPolicy
from discovery_client.session import ClientSession
from discovery_client.sync import SyncDiscoveryClient, SyncRegistration
from discovery_client.tls import TlsConfig

__all__ = [
    "DEFAULT_WEIGHT",
    "AccessDenied",
    "AioServiceChannel",
    "CheckState",
    "ClientConfig",
    "ClientSession",
    "ConfigError",
    "DirectClient",
    "DiscoveryClient",
    "DiscoveryClientError",
    "Endpoint",
    "GuardPolicy",
    "InvalidArgument",
    "NoEndpoints",
    "NotFound",
    "PermissionDenied",
    "RegionServers",
    "Registration",
    "Resolution",
    "ResourceExhausted",
    "RetryPolicy",
    "Scope",
    "ServerError",
    "Status",
    "Strategy",
    "SyncDiscoveryClient",
    "SyncRegistration",
    "SyncServiceChannel",
    "TlsConfig",
    "Unauthenticated",
    "Unavailable",
    "Unreachable",
    "check",
    "from_rpc_error",
    "instance_message",
]
