"""Requests that are not valid protobuf get INVALID_ARGUMENT naming the method.

grpc.aio decodes a request before any handler runs, and a decoding error there reaches the
caller as UNKNOWN ("Unexpected <class 'DecodeError'>"), which reads as a server fault. This
interceptor takes decoding over for every service on the port (Registry, Lookup, Admin,
Replication, xDS, health, reflection alike): the handler is given the raw bytes, decodes them
itself, and a payload that does not decode ends the call as bad input.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

Decode = Callable[[bytes], Any]


class DecodeRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _wrap(handler, details.method)


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    decode: Decode = handler.request_deserializer
    serialize = handler.response_serializer

    async def one(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return decode(raw)
        except DecodeError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{method}: the request is not a valid protobuf message of the method's type",
            )

    async def many(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for raw in raws:
            yield await one(raw, context)

    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await unary(await one(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, one), response_serializer=serialize
        )

    async def requests(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        return many(raws, context)

    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def decoded_stream_unary(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            return await stream_unary(many(raws, context), context)

        return grpc.stream_unary_rpc_method_handler(decoded_stream_unary, response_serializer=serialize)
    return grpc.stream_stream_rpc_method_handler(
        _streaming(handler.stream_stream, requests), response_serializer=serialize
    )


def _streaming(
    behaviour: Callable[..., Any], request: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
) -> Callable[..., Any]:
    """A handler that streams responses: an async generator (ours), or a coroutine that writes
    through ``context.write`` (grpc's own health servicer)."""
    if inspect.isasyncgenfunction(behaviour):

        async def generator(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behaviour(await request(raw, context), context):
                yield response

        return generator

    async def coroutine(raw: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(await request(raw, context), context)

    return coroutine
