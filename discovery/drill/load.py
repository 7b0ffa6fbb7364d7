"""The steady load a drill drives in every region, and what every region sees.

Built on the client library's public names, as our users' tools are: each region's load
has two ``DirectClient``s, one over that region's servers for its writes (an instance
belongs to its region), one over its servers then the other regions' through the fault
proxy's routes for its resolves, so a cut-off region's clients are cut off too. Calls are
open-loop (a fixed rate whatever the answers take), so a hung region cannot slow its own
load down and hide the outage.

Per region: static registrations of new instances (``churn-N``), deregistration of every
few of them, Resolve calls, a handful of leased instances kept alive by the library's
``Registration`` (these are the ones that can flap), and an observer: a Watch on that
region's servers only, whose every change is recorded with its time.

Outcomes are told by the gRPC status codes the client's errors carry, never by their text
(``outcome_of``): a call that timed out, or any of whose attempts did, is unknown (it may
have been applied); one that got another status back, or no connection at all, failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

from discovery.drill.history import History, Op, Outcome
from discovery_client import (
    DirectClient,
    DiscoveryClientError,
    RetryPolicy,
    Scope,
    TlsConfig,
    Unavailable,
    Unreachable,
)
from discovery_pb.v1 import lookup_pb2, types_pb2

log = logging.getLogger("discovery.drill")

CHURN, LEASED = "churn-", "leased-"

InstanceKey = tuple[str, str]  # (region, instance_id): unique within a service


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


def direct_client(servers: tuple[str, ...], op_timeout: float, tls: TlsConfig | None = None) -> DirectClient:
    """Fast failure detection: the drill wants to see an outage within its op timeout (two
    attempts of half of it each, keep-alive pings every second, a silent Watch given up
    after 3 s). ``tls``: the cluster file's settings; None takes the environment's."""
    return DirectClient(
        servers,
        call_timeout=op_timeout / 2,
        retry=RetryPolicy(attempts=2, deadline=op_timeout, base_delay=0.05, max_delay=0.5),
        keepalive_seconds=1.0,
        watch_idle_timeout=3.0,
        tls=tls,
    )


# The observer never gives up on its region: between passes over its servers that got no
# message, the backoff of the load's calls, and no deadline; after this many passes the
# Watch is started again from the same revision (the backoff's exponent stays small).
_OBSERVER_RETRY = RetryPolicy(attempts=64, deadline=math.inf, base_delay=0.05, max_delay=0.5)


def outcome_of(exc: DiscoveryClientError) -> Outcome:
    """UNKNOWN when the write may have been applied: the client gave up by itself with no
    status (its deadline), or a call or any of its attempts ended DEADLINE_EXCEEDED (the
    request may have reached the server). FAILED for any other status, including UNAVAILABLE
    (no connection, or a server that said so) and NOT_FOUND / INVALID_ARGUMENT."""
    if any(a.code is None or a.code == grpc.StatusCode.DEADLINE_EXCEEDED for a in (exc, *exc.attempts)):
        return Outcome.UNKNOWN
    return Outcome.FAILED


def short(exc: DiscoveryClientError) -> str:
    """The error as grouped in the report: its status code's name (DEADLINE_EXCEEDED when any
    attempt timed out), never its text."""
    if exc.code is None:
        return "no status"
    if any(a.code == grpc.StatusCode.DEADLINE_EXCEEDED for a in exc.attempts):
        return "DEADLINE_EXCEEDED"
    if isinstance(exc, Unreachable):
        return f"{exc.code.name} (unreachable)"
    return str(exc.code.name)


def answered_by(response: lookup_pb2.ResolveResponse) -> str:
    """The region of the server that answered a Resolve: the one the answer marks local; ""
    when that region contributed no endpoint (the answer does not name it then)."""
    return next((r.region for r in response.regions if r.local), "")


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


class ViewFold:
    """The set of instances a Watch's messages describe, as ``DirectClient.watch`` yields
    them across resumed streams: a snapshot (in parts at one revision) replaces the view,
    changes edit it, keep-alives only move the revision.

    A snapshot cut off by a broken stream is dropped: the stream is resumed from the revision
    before it, so a new snapshot (a new revision, or the same one: the same instances) or
    changes follow.
    """

    def __init__(self) -> None:
        self.view: frozenset[InstanceKey] = frozenset()
        self.has_view = False
        self.revision = 0  # where to resume from: the last message's, but a snapshot's unfinished parts
        self._parts: set[InstanceKey] | None = None
        self._parts_revision = 0

    def apply(self, message: lookup_pb2.WatchResponse) -> frozenset[InstanceKey] | None:
        """The view after ``message`` when it completes a snapshot or carries changes, else None."""
        if message.kind == lookup_pb2.WatchResponse.SNAPSHOT:
            if self._parts is None or self._parts_revision != message.revision:
                self._parts, self._parts_revision = set(), message.revision
            self._parts.update((i.region, i.instance_id) for i in message.instances)
            if message.more:
                return None
            self.view, self._parts = frozenset(self._parts), None
        elif message.kind == lookup_pb2.WatchResponse.CHANGES:
            self._parts = None
            view = set(self.view)
            for change in message.changes:
                key = (change.region, change.instance_id)
                if change.kind == types_pb2.Change.DELETE:
                    view.discard(key)
                else:
                    view.add(key)
            self.view = frozenset(view)
        else:  # KEEPALIVE: nothing changed
            self._parts = None
            self.revision = message.revision
            return None
        self.revision = message.revision
        self.has_view = True
        return self.view


class Observer:
    """A Watch on one region's servers only (no failover: a region's view is its own); every
    change of the view is applied to ``presence`` with the time it arrived."""

    def __init__(
        self, region: str, servers: tuple[str, ...], service: str, op_timeout: float, tls: TlsConfig | None = None
    ) -> None:
        self.presence = Presence(region)
        self.service = service
        self.changed = asyncio.Event()
        self.error: DiscoveryClientError | None = None  # why the Watch stopped, or did not start
        self._fold = ViewFold()
        self._settled = asyncio.Event()  # a first view, or a first pass over the servers failed
        self._client = direct_client(servers, op_timeout, tls)
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float) -> None:
        """Until the first view arrives; raises the error when a first pass over the region's
        servers got nothing (or nothing came within ``timeout``)."""
        self._task = asyncio.create_task(self._follow(), name=f"drill-observer-{self.presence.region}")
        try:
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        except TimeoutError:
            raise Unavailable(f"no view of {self.service!r} within {timeout:g}s") from None
        if not self._fold.has_view:
            assert self.error is not None
            raise self.error

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.close()

    async def _follow(self) -> None:
        while True:
            watch = self._client.watch(
                self.service, since_revision=self._fold.revision, retry=_OBSERVER_RETRY, on_interrupt=self._interrupted
            )
            try:
                async with contextlib.aclosing(watch) as messages:
                    async for message in messages:
                        view = self._fold.apply(message)
                        if view is not None:
                            self.presence.apply(view, time.monotonic())
                            self.changed.set()
                            self._settled.set()
            except Unavailable as exc:  # a long outage: keep waiting for the region, from the same revision
                self._interrupted(exc)
                await asyncio.sleep(_OBSERVER_RETRY.max_delay)
            except DiscoveryClientError as exc:  # refused (INVALID_ARGUMENT, ...): retrying will not help
                log.warning("drill: the watch of %s in %s was refused: %s", self.service, self.presence.region, exc)
                self.error = exc
                self._settled.set()
                return

    def _interrupted(self, error: DiscoveryClientError) -> None:
        log.info("drill: the watch of %s in %s lost every server: %s", self.service, self.presence.region, error)
        if not self._fold.has_view:
            self.error = error
            self._settled.set()


class RegionLoad:
    """Open-loop registrations, deregistrations and resolves for one region, plus its leased
    instances. Every call goes into ``history``.

    ``servers`` are the region's own; ``failover`` the other regions' as this region reaches
    them, in failover order: resolves go to the first server that answers of both, the one
    that answered last first; writes, leases and heartbeats to the region's own only.
    """

    def __init__(
        self,
        *,
        region: str,
        index: int,
        servers: tuple[str, ...],
        failover: tuple[str, ...],
        service: str,
        history: History,
        settings: LoadSettings,
        tls: TlsConfig | None = None,
    ) -> None:
        self.region, self.index, self.service = region, index, service
        self.history, self.settings = history, settings
        self.skipped = 0
        # Every tick of the open-loop schedule: (when it was due, how late it ran, seconds),
        # the load generator's own punctuality (a starved drill process runs its ticks late).
        self.ticks: list[tuple[float, float]] = []
        self.skips: list[float] = []  # when a tick was skipped (too many calls in flight)
        self._writes = direct_client(servers, settings.op_timeout, tls)
        self._reads = direct_client((*servers, *failover), settings.op_timeout, tls)
        self._next = 0
        self._acked: list[str] = []  # registered, not yet picked for deregistration
        self._left: set[str] = set()  # may be registered: removed when the drill ends
        self._in_flight: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._leases = contextlib.AsyncExitStack()

    async def start(self) -> None:
        for i in range(self.settings.leased):
            registration = self._writes.registration(
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
        for part in (self._leases.aclose(), self._clean_up(), self._writes.close(), self._reads.close()):
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
        address = f"10.{self.index}.{n // 250 % 250}.{n % 250 + 1}:{80 + n // 62500}"

        async def register() -> str:
            await self._writes.register(self.service, address, instance_id=iid, ttl=0)
            return self.region

        op = self.history.invoke("register", self.region, iid)
        self._left.add(iid)
        if await self._call(op, register):
            self._acked.append(iid)

    async def _deregister(self, iid: str) -> None:
        async def deregister() -> str:
            await self._writes.deregister(self.service, iid)
            return self.region

        op = self.history.invoke("deregister", self.region, iid)
        if await self._call(op, deregister):
            self._left.discard(iid)

    async def _clean_up(self) -> None:
        """Deregister every static instance the drill may have left (a drill leaves nothing
        behind), a few at a time, after the checks: these calls are not recorded."""
        limit = asyncio.Semaphore(16)

        async def remove(iid: str) -> None:
            async with limit:
                with contextlib.suppress(DiscoveryClientError):
                    await self._writes.deregister(self.service, iid)

        await asyncio.gather(*(remove(iid) for iid in sorted(self._left)))

    async def _resolve(self) -> None:
        async def resolve() -> str:
            return answered_by(await self._reads.resolve(self.service, scope=Scope.FAILOVER))

        op = self.history.invoke("resolve", self.region)
        await self._call(op, resolve)

    async def _call(self, op: Op, call: Callable[[], Awaitable[str]]) -> bool:
        """One call within the op timeout; ``call`` returns the region that served it."""
        try:
            async with asyncio.timeout(self.settings.op_timeout):
                served_by = await call()
        except TimeoutError:
            self.history.complete(op, Outcome.UNKNOWN, "timeout")
            return False
        except DiscoveryClientError as exc:
            self.history.complete(op, outcome_of(exc), short(exc))
            return False
        self.history.complete(op, Outcome.OK, served_by=served_by)
        return True
