"""A raw ADS client for tests: speaks state of the world the way gRPC's xDS client does
(subscribe, then ACK every response with the names and its nonce), and folds what it gets
into ``resources``. ``nack`` makes it reject responses, to exercise the server's side."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from envoy.config.core.v3.base_pb2 import Locality, Node
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.rpc.status_pb2 import Status

from discovery.xds import CLUSTER, ENDPOINTS, LISTENER, ROUTE

_FULL_SET = (LISTENER, CLUSTER)
_TYPES: dict[str, Any] = {ENDPOINTS: ClusterLoadAssignment}


class AdsClient:
    def __init__(self, channel: grpc.aio.Channel, node_id: str = "raw-client", region: str = "") -> None:
        self.node = Node(id=node_id)
        if region:
            self.node.locality.CopyFrom(Locality(region=region))
        self.names: dict[str, list[str]] = {}
        self.responses: list[DiscoveryResponse] = []
        self.resources: dict[str, dict[str, Any]] = {}  # type -> name -> Any (or decoded CLA)
        self.nack: Callable[[DiscoveryResponse], str | None] | None = None
        self.error: grpc.aio.AioRpcError | None = None
        self._outgoing: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()
        self._progress = asyncio.Event()
        self._first = True
        self.call = AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(self._requests())
        self._task = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[DiscoveryRequest]:
        while True:
            request = await self._outgoing.get()
            if request is None:
                return
            yield request

    def _send(self, request: DiscoveryRequest) -> None:
        if self._first:  # like gRPC: the node goes out on the first request only
            request.node.CopyFrom(self.node)
            self._first = False
        self._outgoing.put_nowait(request)

    def subscribe(self, type_url: str, names: list[str], nonce: str = "") -> None:
        self.names[type_url] = list(names)
        self._send(DiscoveryRequest(type_url=type_url, resource_names=names, response_nonce=nonce))

    def subscribe_service(self, service: str) -> None:
        for type_url in (LISTENER, CLUSTER, ENDPOINTS):
            self.subscribe(type_url, [service])

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self._fold(response)
                self.responses.append(response)
                error = self.nack(response) if self.nack is not None else None
                ack = DiscoveryRequest(
                    type_url=response.type_url,
                    resource_names=self.names.get(response.type_url, []),
                    response_nonce=response.nonce,
                    version_info="" if error else response.version_info,
                )
                if error:
                    ack.error_detail.CopyFrom(Status(code=3, message=error))
                self._send(ack)
                self._progress.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self._progress.set()

    def _fold(self, response: DiscoveryResponse) -> None:
        decode = _TYPES.get(response.type_url)
        got = {}
        for packed in response.resources:
            if decode is not None:
                message = decode()
                packed.Unpack(message)
                got[message.cluster_name] = message
            else:
                got[packed.type_url + "/" + str(len(got))] = packed
        if response.type_url in _FULL_SET or response.type_url == ROUTE:
            self.resources[response.type_url] = got
        else:
            self.resources.setdefault(response.type_url, {}).update(got)

    def endpoints(self, service: str) -> dict[str, tuple[int, int, str]]:
        """address -> (priority, health status, region) in the latest assignment."""
        cla = self.resources.get(ENDPOINTS, {}).get(service)
        if cla is None:
            return {}
        return {
            f"{e.endpoint.address.socket_address.address}:{e.endpoint.address.socket_address.port_value}": (
                loc.priority,
                e.health_status,
                loc.locality.region,
            )
            for loc in cla.endpoints
            for e in loc.lb_endpoints
        }

    async def until(self, predicate: Callable[[AdsClient], object], timeout: float = 5.0) -> float:
        start = time.monotonic()
        while True:
            self._progress.clear()
            if predicate(self):
                return time.monotonic() - start
            if self._task.done():
                raise AssertionError(f"the ADS stream ended ({self.error!r}); {len(self.responses)} responses")
            remaining = start + timeout - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"condition not met within {timeout}s; {len(self.responses)} responses")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._progress.wait()

    async def ended(self, timeout: float = 15.0) -> grpc.StatusCode:
        """Wait (at most ``timeout``) for the server to end the stream; its status code."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._task)
        return self.error.code() if self.error is not None else grpc.StatusCode.OK

    async def close(self) -> None:
        self.call.cancel()
        self._outgoing.put_nowait(None)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
