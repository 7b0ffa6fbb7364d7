"""The one table from domain errors to gRPC status codes (as etcd's v3rpc/util.go)."""

from __future__ import annotations

from typing import NoReturn

import grpc
import grpc.aio

from discovery.errors import (
    DiscoveryError,
    InvalidArgument,
    NotFound,
    RevisionNotReached,
    ShuttingDown,
    StoreUnavailable,
)

_TABLE: dict[type[DiscoveryError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    RevisionNotReached: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: DiscoveryError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in _TABLE:
            return _TABLE[cls]
    return grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, exc: DiscoveryError) -> NoReturn:
    await context.abort(status_for(exc), str(exc))
    raise AssertionError("unreachable")  # context.abort raises
