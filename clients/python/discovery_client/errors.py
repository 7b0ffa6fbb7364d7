"""The client's exceptions, and the one table from gRPC status codes to them.

::

    DiscoveryClientError            anything this library raises on purpose
    ├── ConfigError                 a bad ClientConfig or environment variable (also a ValueError)
    ├── Unavailable                 no configured server answered within the deadline, and no
    │   │                           cached or file view of the service exists to answer from
    │   └── Unreachable             ... and no connection to any of them could even be made
    ├── InvalidArgument             a server refused the request as malformed (bad service name, ...)
    ├── NotFound                    a server does not know the thing asked about (instance, lease)
    │   └── NoEndpoints             pick() or grpc_channel() found no endpoint to use
    ├── AccessDenied                the server refused this client's identity or request
    │   ├── Unauthenticated         UNAUTHENTICATED: its certificate names no identity the server knows
    │   └── PermissionDenied        PERMISSION_DENIED: the identity lacks the grant
    ├── ResourceExhausted           RESOURCE_EXHAUSTED: over a limit (``limit``, ``retry_after``)
    └── ServerError                 any other status a server answered with

Callers usually catch ``DiscoveryClientError`` or ``Unavailable``. An error that comes from a
call carries its gRPC status: ``code``, ``details`` and the ``server`` that answered (or that
the call was made to), so nothing needs to parse the message. ``hint`` is advice when the status alone would
mislead: a refused TLS handshake reaches the client as UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
from typing import Any

import grpc


class DiscoveryClientError(Exception):
    """Base of every exception the client raises on purpose.

    Attributes:
        code: the ``grpc.StatusCode`` the call ended with (for ``Unavailable`` after several
            attempts, the last one's); None when the client gave up by itself (its own
            deadline, a closed client, a bad setting).
        details: the status details, as the server (or gRPC) wrote them.
        server: the server that answered, or the last one tried; "" when none was.
        attempts: for ``Unavailable`` after several attempts, each attempt's error in order
            (whether any of them timed out, so may have been applied, is in their codes).
        hint: what probably went wrong and what to check, when the code does not say
            (a TLS handshake the server refused); "" otherwise.
    """

    def __init__(
        self,
        message: str = "",
        *,
        code: grpc.StatusCode | None = None,
        details: str = "",
        server: str = "",
        attempts: tuple[DiscoveryClientError, ...] = (),
        hint: str = "",
    ) -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.code = code
        self.details = details
        self.server = server
        self.attempts = attempts
        self.hint = hint


class ConfigError(DiscoveryClientError, ValueError):
    """Raised by ``ClientConfig.validate()`` and ``ClientConfig.from_env()`` for a bad setting."""


class Unavailable(DiscoveryClientError):
    """Raised when every server was tried (with retries) within the deadline and none answered."""


class Unreachable(Unavailable):
    """Raised when no connection could be made to any server tried: refused, no route, a name
    that does not resolve, a handshake refused. ``code`` is UNAVAILABLE."""


class InvalidArgument(DiscoveryClientError):
    """Raised when a server answers INVALID_ARGUMENT: the request itself is wrong; not retried."""


class NotFound(DiscoveryClientError):
    """Raised when a server answers NOT_FOUND (an unknown instance on deregister, a lost lease)."""


class NoEndpoints(NotFound):
    """Raised by ``pick()`` and ``grpc_channel()`` when the service has no endpoint matching the query."""


class AccessDenied(DiscoveryClientError):
    """Base of the refusals of this client's identity: not retried, as another server applies
    the same policy."""


class Unauthenticated(AccessDenied):
    """Raised when a server answers UNAUTHENTICATED: the certificate's identity is not in its policy."""


class PermissionDenied(AccessDenied):
    """Raised when a server answers PERMISSION_DENIED: the identity may not do this (the
    details name the grant it lacks)."""


class ResourceExhausted(DiscoveryClientError):
    """Raised when a server answers RESOURCE_EXHAUSTED: this identity (or the region) is over
    a limit.

    Attributes:
        limit: the limit's name from the trailing metadata ``discovery-limit``
            (``writes_per_second``, ``overload``, ...); "" when the server sent none.
        retry_after: seconds to wait before trying again, from ``retry-after-ms``; 0 when
            unknown. Unary calls wait it out by themselves within their deadline.
    """

    def __init__(self, message: str = "", *, limit: str = "", retry_after: float = 0.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.limit = limit
        self.retry_after = retry_after


class ServerError(DiscoveryClientError):
    """Raised for any other gRPC status a server answers with."""


# Codes worth trying the next server for: the server is down, hung, shutting down or overloaded.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_TABLE: dict[Any, type[DiscoveryClientError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}

LIMIT_KEY = "discovery-limit"
RETRY_AFTER_KEY = "retry-after-ms"


def from_rpc_error(exc: Any, server: str, channel: Any = None, tls: Any = None) -> DiscoveryClientError:
    """The client exception for a ``grpc.RpcError`` of a call to ``server`` over ``channel``
    secured by ``tls`` (a ``TlsConfig``: an UNAVAILABLE that looks like a refused handshake
    then carries a ``hint``).

    The one place that tells "no connection could be made" from "a server answered
    UNAVAILABLE" (its etcd is down, it is shutting down). gRPC gives both the same code and
    says which only in its message text, so the text is not read: the channel's state is.
    A call fails for want of a connection only while its channel is in TRANSIENT_FAILURE
    (gRPC keeps it there until a connection succeeds), and a server can only answer over a
    READY one. Without ``channel`` the error is a plain ``Unavailable``.
    """
    code = exc.code()
    details = exc.details() or ""
    cls = _TABLE.get(code, ServerError)
    message = f"{server}: {code.name}: {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        limit, retry_after = _limit(exc)
        return ResourceExhausted(
            message, code=code, details=details, server=server, limit=limit, retry_after=retry_after
        )
    hint = ""
    if code == grpc.StatusCode.UNAVAILABLE:
        from discovery_client.tls import handshake_hint  # tls imports this module

        hint = handshake_hint(details, tls)
        if channel is not None and not _connected(channel):
            cls = Unreachable
    return cls(message, code=code, details=details, server=server, hint=hint)


def _limit(exc: Any) -> tuple[str, float]:
    """The limit's name and the seconds to wait, from the call's trailing metadata."""
    trailers = getattr(exc, "trailing_metadata", None)
    items = (trailers() if callable(trailers) else None) or ()
    limit, retry_after = "", 0.0
    for key, value in items:
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if key == LIMIT_KEY:
            limit = text
        elif key == RETRY_AFTER_KEY:
            with contextlib.suppress(ValueError):  # a malformed hint is no hint
                retry_after = max(0.0, int(text) / 1000)
    return limit, retry_after


def _connected(channel: Any) -> bool:
    return bool(channel.get_state(try_to_connect=False) != grpc.ChannelConnectivity.TRANSIENT_FAILURE)


def is_retryable(exc: Any) -> bool:
    return bool(exc.code() in RETRYABLE)


_LOST_STATUS = "Internal error from Core"


def is_lost_status(exc: Any) -> bool:
    """A write on a stream met the server's end of it, and grpc.aio answered INTERNAL "Internal
    error from Core" in place of the status the server sent (seen with grpcio up to 1.85 when a
    server ends many streams at once, as after a freeze: docs/capacity.md). No server of ours
    sends INTERNAL; what it did send is lost, so the stream is to be opened again, where the
    server's answer is heard."""
    return bool(exc.code() == grpc.StatusCode.INTERNAL and (exc.details() or "").startswith(_LOST_STATUS))
