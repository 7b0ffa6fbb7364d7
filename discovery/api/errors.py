"""The one table from domain errors to gRPC status codes (as etcd's v3rpc/util.go)."""

from __future__ import annotations

from typing import NoReturn

import grpc
import grpc.aio

from discovery.errors import (
    AuditFailed,
    DiscoveryError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RevisionNotReached,
    ShuttingDown,
    StoreUnavailable,
    Unauthenticated,
)

_TABLE: dict[type[DiscoveryError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    RevisionNotReached: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    AuditFailed: grpc.StatusCode.UNAVAILABLE,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(exc: DiscoveryError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in _TABLE:
            return _TABLE[cls]
    return grpc.StatusCode.INTERNAL


def trailers_for(exc: DiscoveryError) -> tuple[tuple[str, str], ...]:
    """What a client needs to back off without parsing text: the limit's name and how long."""
    if isinstance(exc, ResourceExhausted):
        return (("retry-after-ms", str(max(1, round(exc.retry_after * 1000)))), ("discovery-limit", exc.limit))
    return ()


async def abort(context: grpc.aio.ServicerContext, exc: DiscoveryError) -> NoReturn:
    trailers = trailers_for(exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(status_for(exc), str(exc))
    raise AssertionError("unreachable")  # context.abort raises
