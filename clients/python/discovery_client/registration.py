"""Registering this process's instance: register, keep the lease alive over the Heartbeat
stream, register again after losing the lease, drain and deregister on exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from discovery_client.errors import DiscoveryClientError, NotFound, ResourceExhausted, from_rpc_error, is_retryable
from discovery_client.model import Status
from discovery_client.servers import ServerPool
from discovery_pb.v1 import registry_pb2 as pb
from discovery_pb.v1 import types_pb2

log = logging.getLogger(__name__)


def instance_message(
    service: str,
    address: str,
    *,
    instance_id: str = "",
    zone: str = "",
    tags: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
    weight: int = 0,
    version: str = "",
    ttl: int = 0,
    status: Status | None = None,
) -> types_pb2.Instance:
    """The Instance a Register call sends; zero values are the server's defaults (an id derived
    from the address, weight 100, SERVING)."""
    return types_pb2.Instance(
        service=service,
        address=address,
        instance_id=instance_id,
        zone=zone,
        tags=list(tags),
        metadata=dict(metadata or {}),
        weight=weight,
        version=version,
        ttl_seconds=ttl,
        status=types_pb2.Status.ValueType(int(status) if status is not None else 0),
    )


class _LeaseLost(Exception):
    pass


class _StreamBroken(Exception):
    pass


class Registration:
    """``async with client.register(...) as reg``: the instance is registered (in this
    region only: an instance belongs to the region it runs in) for the body of the block.

    Leaving the block, in this order:

    1. registers again with status DRAINING (same instance id), so clients stop picking it
       while heartbeats keep its lease;
    2. waits ``drain_seconds`` for in-flight work and for clients' caches to catch up;
    3. stops the heartbeats;
    4. deregisters (a lost lease or an unknown instance is fine: it is gone either way;
       with no server answering, the lease expires by itself, and ``deregister_error``
       says why it was not removed at once).

    Attributes:
        instance_id, lease_id, revision, ttl_seconds: from the latest Register.
        status: the status last registered.
        registrations: how many times Register succeeded (> 1 after a lease loss or drain).
        heartbeats: heartbeats the server acknowledged.
        lease_losses: how many times the server said the lease was gone.
        deregister_error: after leaving, the error that kept the deregistration from being
            acknowledged, or None.
    """

    def __init__(self, pool: ServerPool, instance: Any, *, drain_seconds: float) -> None:
        self._pool = pool
        self._instance = instance
        self._drain = drain_seconds
        self.instance_id = instance.instance_id
        self.lease_id = 0
        self.revision = 0
        self.ttl_seconds = instance.ttl_seconds
        self.status = Status(instance.status or Status.SERVING)
        self.registrations = 0
        self.heartbeats = 0
        self.lease_losses = 0
        self.deregister_error: DiscoveryClientError | None = None
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def service(self) -> str:
        return str(self._instance.service)

    async def __aenter__(self) -> Registration:
        await self._register()
        if self.ttl_seconds:
            self._keeper = asyncio.create_task(self._keep(), name=f"discovery-heartbeat-{self.instance_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def set_status(self, status: Status) -> None:
        """Register again with ``status`` (same instance id)."""
        self.status = Status(status)
        await self._register()

    async def close(self) -> None:
        """Drain, then deregister (the order is in the class docstring); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._drain > 0:
                try:
                    await self.set_status(Status.DRAINING)
                except DiscoveryClientError as exc:
                    log.warning("discovery client: could not mark %s DRAINING: %s", self.instance_id, exc)
                await asyncio.sleep(self._drain)  # the drain period itself
        finally:
            if self._keeper is not None:
                self._keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._keeper
            await self._deregister()

    async def _deregister(self) -> None:
        request = pb.DeregisterRequest(service=self.service, instance_id=self.instance_id)
        try:
            await self._pool.call(lambda s: s.registry.Deregister, request, home_only=True)
        except NotFound:
            pass
        except DiscoveryClientError as exc:
            self.deregister_error = exc
            log.warning("discovery client: could not deregister %s (its lease will expire): %s", self.instance_id, exc)

    async def _register(self) -> None:
        async with self._lock:
            instance = type(self._instance)()
            instance.CopyFrom(self._instance)
            instance.instance_id = self.instance_id
            instance.status = int(self.status)
            resp, _ = await self._pool.call(
                lambda s: s.registry.Register, pb.RegisterRequest(instance=instance), home_only=True
            )
            self.instance_id, self.lease_id, self.revision = resp.instance_id, resp.lease_id, resp.revision
            self.ttl_seconds = resp.ttl_seconds
            self.registrations += 1
            self._changed.set()  # a new lease: heartbeat it now

    # --- keep-alive -------------------------------------------------------------------

    async def _keep(self) -> None:
        attempt = 0
        while True:
            beats = self.heartbeats
            told = 0.0  # a server's retry-after, when this identity is over a limit
            try:
                await self._heartbeat_any()
            except _LeaseLost:
                self.lease_losses += 1
                log.warning("discovery client: lease of %s lost; registering again", self.instance_id)
                try:
                    await self._register()
                    attempt = 0
                    continue
                except DiscoveryClientError as exc:
                    log.warning("discovery client: could not register %s again: %s", self.instance_id, exc)
            except (_StreamBroken, DiscoveryClientError) as exc:
                log.info("discovery client: heartbeats of %s interrupted: %s", self.instance_id, exc)
                if isinstance(exc, ResourceExhausted):
                    told = exc.retry_after
            if self.heartbeats > beats:
                attempt = 0
            await asyncio.sleep(max(told, self._pool.config.retry.delay(attempt)))
            attempt += 1

    async def _heartbeat_any(self) -> None:
        reasons = []
        for entry in self._pool.order(home_only=True):
            try:
                await self._heartbeat(self._pool.stubs(entry).registry, entry.address)
            except _StreamBroken as exc:
                reasons.append(str(exc))
        raise _StreamBroken("; ".join(reasons) or "no server of this region configured")

    async def _heartbeat(self, registry: Any, address: str) -> None:
        """Heartbeat over one stream until it breaks (_StreamBroken) or the lease is gone (_LeaseLost)."""
        config = self._pool.config
        call = registry.Heartbeat(timeout=config.stream_max_seconds)
        try:
            while True:
                lease = self.lease_id
                self._changed.clear()
                try:
                    async with asyncio.timeout(config.call_timeout):
                        await call.write(pb.HeartbeatRequest(lease_id=lease))
                        answer = await call.read()
                except TimeoutError:
                    raise _StreamBroken(f"{address} did not answer a heartbeat in {config.call_timeout:g}s") from None
                except grpc.aio.AioRpcError as exc:
                    self._raise_for(exc, lease, address)
                except asyncio.InvalidStateError:  # written after the server ended the stream
                    answer = grpc.aio.EOF
                if answer is grpc.aio.EOF:
                    self._raise_for(await _status(call), lease, address)
                self.heartbeats += 1
                interval = max(0.2, self.ttl_seconds / 3)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._changed.wait()
        finally:
            call.cancel()

    def _raise_for(self, exc: Any, lease: int, address: str) -> None:
        code = exc.code()
        if code == grpc.StatusCode.NOT_FOUND:
            if lease == self.lease_id:
                raise _LeaseLost() from None
            raise _StreamBroken(f"{address}: an old lease ended the stream") from None  # replaced meanwhile
        if is_retryable(exc) or code == grpc.StatusCode.OK:
            raise _StreamBroken(f"{address}: {code.name}: {exc.details()}") from None
        raise from_rpc_error(exc, address, tls=self._pool.config.tls) from None


async def _status(call: Any) -> Any:
    """The call's final status, shaped like an AioRpcError (code(), details())."""
    async with asyncio.timeout(5):
        code = await call.code()
        details = await call.details()

    class _Status:
        def code(self) -> Any:
            return code

        def details(self) -> str:
            return str(details)

    return _Status()
