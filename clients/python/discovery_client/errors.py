"""The client's exceptions, and the one table from gRPC status codes to them.

::

    DiscoveryClientError            anything this library raises on purpose
    ├── ConfigError                 a bad ClientConfig or environment variable (also a ValueError)
    ├── Unavailable                 no configured server answered within the deadline, and no
    │                               cached or file view of the service exists to answer from
    ├── InvalidArgument             a server refused the request as malformed (bad service name, ...)
    ├── NotFound                    a server does not know the thing asked about (instance, lease)
    │   └── NoEndpoints             pick() or grpc_channel() found no endpoint to use
    └── ServerError                 any other status a server answered with

Callers usually catch ``DiscoveryClientError`` or ``Unavailable``; the gRPC error a failure
came from (when there is one) is the exception's ``__cause__``.
"""

from __future__ import annotations

from typing import Any

import grpc


class DiscoveryClientError(Exception):
    """Base of every exception the client raises on purpose."""


class ConfigError(DiscoveryClientError, ValueError):
    """Raised by ``ClientConfig.validate()`` and ``ClientConfig.from_env()`` for a bad setting."""


class Unavailable(DiscoveryClientError):
    """Raised when every server was tried (with retries) within the deadline and none answered."""


class InvalidArgument(DiscoveryClientError):
    """Raised when a server answers INVALID_ARGUMENT: the request itself is wrong; not retried."""


class NotFound(DiscoveryClientError):
    """Raised when a server answers NOT_FOUND (an unknown instance on deregister, a lost lease)."""


class NoEndpoints(NotFound):
    """Raised by ``pick()`` and ``grpc_channel()`` when the service has no endpoint matching the query."""


class ServerError(DiscoveryClientError):
    """Raised for any other gRPC status a server answers with."""


# Codes worth trying the next server for: the server is down, hung, shutting down or overloaded.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_TABLE: dict[Any, type[DiscoveryClientError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
}


def from_rpc_error(exc: Any, server: str) -> DiscoveryClientError:
    """The client exception for a ``grpc.RpcError`` answered by ``server``."""
    code = exc.code()
    cls = _TABLE.get(code, ServerError)
    return cls(f"{server}: {code.name}: {exc.details()}")


def is_retryable(exc: Any) -> bool:
    return bool(exc.code() in RETRYABLE)
