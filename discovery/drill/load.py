"""The steady load a drill drives in every region, and what every region sees.

Built on the client library, as our users are: each region's load is a client of that
region (its servers first, then the other regions through the fault proxy's routes), so a
cut-off region's clients are cut off too. Calls are open-loop (a fixed rate whatever the
answers take), so a hung region cannot slow its own load down and hide the outage.

Per region: static registrations of new instances (``churn-N``), deregistration of every
few of them, Resolve calls, a handful of leased instances kept alive by the library's
``Registration`` (these are the ones that can flap), and an observer: a Watch on that
region's servers only, whose every change is recorded with its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

from discovery.drill.history import History, Op, Outcome
from discovery_client import ClientConfig, DiscoveryClient, GuardPolicy, RegionServers, RetryPolicy, Scope
from discovery_client.errors import DiscoveryClientError
from discovery_client.model import InstanceKey
from discovery_client.servers import ServerPool, Stubs
from discovery_pb.v1 import lookup_pb2, registry_pb2, types_pb2

log = logging.getLogger("discovery.drill")

CHURN, LEASED = "churn-", "leased-"


@dataclass(frozen=True)
class LoadSettings:
    """Per region. The defaults are gentle enough for a whole dev cluster on two cores."""

    register_rate: float = 10.0  # new static instances per second
    deregister_every: int = 3  # one of every this many acknowledged registrations is deregistered
    resolve_rate: float = 20.0
    leased: int = 4  # leased instances kept alive by heartbeats
    lease_ttl: int = 5
    op_timeout: float = 1.0  # a call still unanswered then is recorded unknown
    max_in_flight: int = 200  # per region; beyond it a tick is skipped (and counted)

    def validate(self) -> None:
        if self.register_rate <= 0 or self.resolve_rate <= 0:
            raise ValueError("rates must be > 0")
        if self.deregister_every < 1 or self.leased < 0 or not 1 <= self.lease_ttl <= 3600:
            raise ValueError("deregister-every >= 1, leased >= 0, lease TTL 1..3600")
        if self.op_timeout <= 0:
            raise ValueError("op timeout must be > 0")


def client_config(
    region: str, servers: tuple[str, ...], failover: tuple[RegionServers, ...], op_timeout: float
) -> ClientConfig:
    """Fast failure detection: the drill wants to see an outage within its op timeout."""
    return ClientConfig(
        region=region,
        servers=servers,
        failover=failover,
        call_timeout=op_timeout / 2,
        retry=RetryPolicy(attempts=2, deadline=op_timeout, base_delay=0.05, max_delay=0.5),
        keepalive_seconds=1.0,
        watch_idle_timeout=3.0,
        home_retry_seconds=2.0,
        # The observer must see what the servers say, not what the guard lets through.
        guard=GuardPolicy(enabled=False),
    ).validate()


@dataclass
class Presence:
    """One region's view of the drill's service over time: per instance, its appearances and
    disappearances (monotonic time, present?)."""

    region: str
    changes: dict[InstanceKey, list[tuple[float, bool]]] = field(default_factory=dict)
    current: frozenset[InstanceKey] = frozenset()
    updates: int = 0

    def apply(self, now: frozenset[InstanceKey], at: float) -> None:
        for key in now - self.current:
            self.changes.setdefault(key, []).append((at, True))
        for key in self.current - now:
            self.changes.setdefault(key, []).append((at, False))
        self.current = now
        self.updates += 1


class Observer:
    """A Watch on one region's servers only (no failover: a region's view is its own)."""

    def __init__(self, region: str, servers: tuple[str, ...], service: str, op_timeout: float) -> None:
        self.presence = Presence(region)
        self.service = service
        self.changed = asyncio.Event()
        self._client = DiscoveryClient(client_config(region, servers, (), op_timeout))

    async def start(self, timeout: float) -> None:
        await self._client.resolve(self.service, scope=Scope.ALL, timeout=timeout)
        watch = self._client.watch_of(self.service)
        assert watch is not None
        cache = watch.cache

        def on_change() -> None:
            self.presence.apply(frozenset(cache.instances), time.monotonic())
            self.changed.set()

        cache.listeners.append(on_change)
        on_change()

    async def close(self) -> None:
        await self._client.close()


class RegionLoad:
    """Open-loop registrations, deregistrations and resolves for one region, plus its leased
    instances. Every call goes into ``history``."""

    def __init__(
        self,
        *,
        region: str,
        index: int,
        config: ClientConfig,
        service: str,
        history: History,
        settings: LoadSettings,
    ) -> None:
        self.region, self.index, self.service = region, index, service
        self.history, self.settings = history, settings
        self.skipped = 0
        # Every tick of the open-loop schedule: (when it was due, how late it ran, seconds),
        # the load generator's own punctuality (a starved drill process runs its ticks late).
        self.ticks: list[tuple[float, float]] = []
        self.skips: list[float] = []  # when a tick was skipped (too many calls in flight)
        self._pool = ServerPool(config)
        self._client = DiscoveryClient(config)
        self._next = 0
        self._acked: list[str] = []  # registered, not yet picked for deregistration
        self._left: set[str] = set()  # may be registered: removed when the drill ends
        self._in_flight: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._leases = contextlib.AsyncExitStack()

    async def start(self) -> None:
        for i in range(self.settings.leased):
            registration = self._client.register(
                self.service,
                f"10.{200 + self.index}.0.{i + 1}:80",
                instance_id=f"{LEASED}{i}",
                ttl=self.settings.lease_ttl,
                drain_seconds=0,
            )
            await self._leases.enter_async_context(registration)
        self._loops = [
            asyncio.create_task(self._every(1 / self.settings.register_rate, self._register)),
            asyncio.create_task(self._every(1 / self.settings.resolve_rate, self._resolve)),
        ]

    async def stop_calls(self) -> None:
        """Stop making calls and wait for those in flight (a tick makes at most two calls of
        the op timeout each); any left are cancelled, their outcome unknown."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=2 * self.settings.op_timeout + 1)
        left = list(self._in_flight)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    async def close(self) -> None:
        """Each part on its own deadline, so one that hangs does not leak the others."""
        await self.stop_calls()
        for part in (self._leases.aclose(), self._clean_up(), self._client.close(), self._pool.close()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(part, self.settings.op_timeout + 5)

    async def _every(self, interval: float, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # Ticks are scheduled on a fixed grid (with a random phase per region), so a slow call
        # never delays the next one: the rate offered is the rate asked for.
        loop = asyncio.get_running_loop()
        due = loop.time() + random.uniform(0, interval)
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            self.ticks.append((due, max(0.0, loop.time() - due)))
            due += interval
            if len(self._in_flight) >= self.settings.max_in_flight:
                self.skipped += 1
                self.skips.append(loop.time())
                continue
            task = asyncio.create_task(make())
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _register(self) -> None:
        n = self._next
        self._next += 1
        if self._acked and n % self.settings.deregister_every == 0:
            await self._deregister(self._acked.pop(0))
        iid = f"{CHURN}{n}"
        instance = types_pb2.Instance(
            service=self.service,
            instance_id=iid,
            address=f"10.{self.index}.{n // 250 % 250}.{n % 250 + 1}:{80 + n // 62500}",
            ttl_seconds=0,
        )
        op = self.history.invoke("register", self.region, iid)
        self._left.add(iid)
        if await self._call(op, lambda s: s.registry.Register, registry_pb2.RegisterRequest(instance=instance), True):
            self._acked.append(iid)

    async def _deregister(self, iid: str) -> None:
        op = self.history.invoke("deregister", self.region, iid)
        request = registry_pb2.DeregisterRequest(service=self.service, instance_id=iid)
        if await self._call(op, lambda s: s.registry.Deregister, request, True):
            self._left.discard(iid)

    async def _clean_up(self) -> None:
        """Deregister every static instance the drill may have left (a drill leaves nothing
        behind), a few at a time, after the checks: these calls are not recorded."""
        limit = asyncio.Semaphore(16)

        async def remove(iid: str) -> None:
            request = registry_pb2.DeregisterRequest(service=self.service, instance_id=iid)
            async with limit:
                with contextlib.suppress(DiscoveryClientError):
                    await self._pool.call(lambda s: s.registry.Deregister, request, home_only=True)

        await asyncio.gather(*(remove(iid) for iid in sorted(self._left)))

    async def _resolve(self) -> None:
        op = self.history.invoke("resolve", self.region)
        request = lookup_pb2.ResolveRequest(service=self.service, scope=lookup_pb2.FAILOVER)
        await self._call(op, lambda s: s.lookup.Resolve, request, False)

    async def _call(self, op: Op, method: Callable[[Stubs], Any], request: Any, home_only: bool) -> bool:
        """One call through the client library's failover; registrations stay in the region."""
        try:
            async with asyncio.timeout(self.settings.op_timeout):
                _, entry = await self._pool.call(method, request, home_only=home_only)
        except TimeoutError:
            self.history.complete(op, Outcome.UNKNOWN, "timeout")
            return False
        except DiscoveryClientError as exc:
            self.history.complete(op, _outcome_of(str(exc)), _short(str(exc)))
            return False
        except grpc.RpcError as exc:  # pragma: no cover - the pool turns these into client errors
            self.history.complete(op, Outcome.FAILED, _short(str(exc)))
            return False
        self.history.complete(op, Outcome.OK, served_by=entry.region)
        return True


def _outcome_of(message: str) -> Outcome:
    # A deadline inside the pool is as unknown as ours: the request may have been applied.
    return Outcome.UNKNOWN if "DEADLINE_EXCEEDED" in message or "deadline" in message else Outcome.FAILED


def _short(message: str) -> str:
    """Error texts grouped in the report: drop addresses and details after the status."""
    for name in ("DEADLINE_EXCEEDED", "UNAVAILABLE", "NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION"):
        if name in message:
            return name
    return message[:80]
