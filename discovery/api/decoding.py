"""Requests that are not valid protobuf get INVALID_ARGUMENT naming the method.

grpc.aio decodes a request before any handler runs, and a decoding error there reaches the
caller as UNKNOWN ("Unexpected <class 'DecodeError'>"), which reads as a server fault. This
interceptor takes decoding over for every service on the port (Registry, Lookup, Admin,
Replication, xDS, health, reflection alike): the handler is given the raw bytes decoded by
a wrapper, and a payload that does not decode ends the call as bad input.

A streamed request that does not decode raises ``Undecodable`` into the handler, and the
wrapper answers it once the handler has ended, in the handler's own task: the ADS handler
reads requests in a task of its own while it writes responses, and an abort from the reading
task can meet a write in progress (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS: no status is sent
and the client waits out its deadline).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError


class Undecodable(Exception):
    """A request's bytes are not a message of the method's request type."""


class DecodeRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        # Every call asks; the wrapping is made once per method (the server's handler for a
        # method is one object), not once per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        known = self._wrapped.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _wrap(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    decode: Callable[[bytes], Any] = handler.request_deserializer
    detail = f"{method}: the request is not a valid protobuf message of the method's type"

    def one(raw: bytes) -> Any:
        try:
            return decode(raw)
        except DecodeError:
            raise Undecodable(detail) from None

    async def many(raws: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in raws:
            yield one(raw)

    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _guarded(handler.unary_unary, one, detail), response_serializer=serialize
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _guarded(handler.unary_stream, one, detail), response_serializer=serialize
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _guarded(handler.stream_unary, many, detail), response_serializer=serialize
        )
    return grpc.stream_stream_rpc_method_handler(
        _guarded(handler.stream_stream, many, detail), response_serializer=serialize
    )


def _guarded(behaviour: Callable[..., Any], requests: Callable[[Any], Any], detail: str) -> Callable[..., Any]:
    """``behaviour`` on decoded ``requests(raw)``; Undecodable ends the call as INVALID_ARGUMENT.
    Streaming handlers are async generators (ours) or coroutines that write through
    ``context.write`` (grpc's health servicer); both keep their kind."""
    if inspect.isasyncgenfunction(behaviour):

        async def generator(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in behaviour(requests(raw), context):
                    yield response
            except Undecodable:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)

        return generator

    async def coroutine(raw: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(requests(raw), context)
        except Undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)

    return coroutine
