"""The checker: runs this server's share of the region's health checks and writes verdicts.

It follows the view for the region's own instances that have a check (never a replica: a
check runs only in its instance's region), takes the ones rendezvous hashing gives this
server (``membership``), and probes each every interval on a fixed-rate schedule whose phase
comes from the check's key, so a server's probes spread evenly over the interval. A check
turns CRITICAL after ``failures`` consecutive failed probes and PASSING after ``successes``
consecutive good ones (a check without a verdict yet: after its first good probe). Only
transitions are written, each as one fenced etcd transaction (``Store.put_fenced``) that
changes nothing of the record but ``check_result``. Transitions to CRITICAL pass through
self-protection first (``protection``)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from discovery.errors import Conflict, DiscoveryError, Fenced
from discovery.health.membership import Membership, owner, rank
from discovery.health.probes import Outcome, probe
from discovery.health.protection import SelfProtection, Verdict
from discovery.health.spec import Spec
from discovery.keys import InstanceKey, KeySchema
from discovery.store import KeyValue, Store
from discovery.telemetry import Instruments
from discovery.view import Snapshot, View, updates
from discovery_pb.v1.types_pb2 import CheckResult, Instance

log = logging.getLogger(__name__)

PASSING, CRITICAL = CheckResult.PASSING, CheckResult.CRITICAL
# A test-only seam (docs/health-checks.md): given a target's key and address, an outcome to use
# instead of probing (None: probe). Tests cut one server's view of its targets with it.
Seam = Callable[[InstanceKey, str], Outcome | None]
_LATENESS_SAMPLES = 100_000
_WRITE_ATTEMPTS = 3


def _phase(target: Target) -> float:
    """Where in its interval a check runs, from its key: [0, 1)."""
    return int.from_bytes(rank("", "/".join(target.key)), "big") / 2**64


def _slot(target: Target, now: float) -> float:
    """The check's next slot after ``now``: slots are ``phase + k x interval`` on the
    monotonic clock, so a check runs at a fixed rate that never drifts, and the checks of a
    server (and of the region) spread evenly over the interval whenever they were registered."""
    interval = target.spec.interval
    offset = _phase(target) * interval
    return offset + (math.floor((now - offset) / interval) + 1) * interval


class Target:
    __slots__ = (
        "address",
        "failures",
        "generation",
        "key",
        "probing",
        "reason",
        "spec",
        "state",
        "successes",
        "writing",
    )

    def __init__(self, key: InstanceKey, spec: Spec, address: str, state: int) -> None:
        self.key = key
        self.spec = spec
        self.address = address
        self.state = state  # the verdict as stored (0: none yet)
        self.failures = 0
        self.successes = 0
        self.reason = ""
        self.writing = False
        self.probing = False  # a probe of it is under way
        self.generation = 0  # of its schedule: one entry in the heap is current, older ones are skipped


@dataclass
class CheckerStats:
    """Counts for status output, tests and the benchmark (the metrics carry the same)."""

    runs: int = 0
    failures: int = 0
    transitions: int = 0
    held: int = 0
    refused: int = 0
    skipped: int = 0  # slots passed over because the target's previous probe had not finished
    lateness: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENESS_SAMPLES))


class Checker:
    def __init__(
        self,
        view: View,
        store: Store,
        keys: KeySchema,
        *,
        region: str,
        membership: Membership,
        protection: SelfProtection,
        instruments: Instruments,
        concurrency: int = 512,
    ) -> None:
        self._view = view
        self._store = store
        self._keys = keys
        self.region = region
        self.membership = membership
        self._protection = protection
        self._m = instruments
        self._limit = asyncio.Semaphore(concurrency)
        self.targets: dict[InstanceKey, Target] = {}  # every checked instance of the region
        self.mine: set[InstanceKey] = set()  # the ones this server runs
        self._failing: set[InstanceKey] = set()  # mine, last probe failed, not CRITICAL yet
        self._held: dict[InstanceKey, float] = {}  # transitions to CRITICAL held (monotonic since)
        self._heap: list[tuple[float, int, Target, int]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reviewing = False
        self.stats = CheckerStats()
        self.seam: Seam | None = None
        membership.listeners.append(self._wake.set)

    # --- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        follow = asyncio.create_task(self._follow(), name="health follow")
        try:
            await self._schedule()
        finally:
            follow.cancel()
            for task in [follow, *self._tasks]:
                task.cancel()
            await asyncio.gather(follow, *self._tasks, return_exceptions=True)

    async def _follow(self) -> None:
        """The region's own instances with a check, from the view (snapshot, then changes)."""
        while True:
            try:
                async for batch in updates(self._view, "", self.region, since=0, idle=30.0):
                    if isinstance(batch, Snapshot):
                        seen = {self._upsert(i) for chunk in batch.chunks for i in chunk}
                        for key in [k for k in self.targets if k not in seen]:
                            self._remove(key)
                    else:
                        for change in batch.changes:
                            if change.HasField("instance"):
                                self._upsert(change.instance)
                            else:
                                self._remove(InstanceKey(change.region, change.service, change.instance_id))
                    if not isinstance(batch, Snapshot) and batch.closing:
                        return
            except Exception:  # never die quietly: checks would stop changing with the records
                log.exception("health checks: following the view failed; following again")
            await asyncio.sleep(1.0)

    def _upsert(self, instance: Instance) -> InstanceKey | None:
        key = InstanceKey(instance.region, instance.service, instance.instance_id)
        if not instance.HasField("check") or instance.region != self.region:
            self._remove(key)
            return None
        spec = Spec.of(instance.check)
        state = instance.check_result.state
        target = self.targets.get(key)
        if target is not None and target.spec == spec and target.address == instance.address:
            target.state = state  # perhaps written by this server's predecessor for this check
            if state == CRITICAL:
                self._failing.discard(key)  # decided: no longer a pending transition
            return key
        self._remove(key)
        target = self.targets[key] = Target(key, spec, instance.address, state)
        if self._owns(key):
            self.mine.add(key)
            self._start(target, fresh=not state)
        return key

    def _remove(self, key: InstanceKey) -> None:
        self.targets.pop(key, None)
        self.mine.discard(key)
        self._failing.discard(key)
        self._held.pop(key, None)

    def _owns(self, key: InstanceKey) -> bool:
        m = self.membership
        return m.joined and owner(m.members, "/".join(key)) == m.identity

    def _reassign(self) -> None:
        mine = {k for k in self.targets if self._owns(k)}
        for key in mine - self.mine:
            target = self.targets[key]
            target.failures = target.successes = 0
            self._start(target, fresh=not target.state)
        for key in self.mine - mine:
            self._failing.discard(key)
            self._held.pop(key, None)
        if mine != self.mine:
            log.info(
                "health checks: %s runs %d of the region's %d checks",
                self.membership.identity,
                len(mine),
                len(self.targets),
            )
        self.mine = mine

    def _start(self, target: Target, *, fresh: bool) -> None:
        """First probe: within a second for a check that has no verdict yet, else at the
        check's next slot."""
        target.generation += 1  # an entry left from when it was ours before is dropped
        if fresh:
            self._push(time.monotonic() + _phase(target) * min(target.spec.interval, 1.0), target)
        else:
            self._push(_slot(target, time.monotonic()), target)

    def _push(self, due: float, target: Target) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), target, target.generation))
        self._wake.set()

    async def _schedule(self) -> None:
        membership = self.membership
        while True:
            if membership.changed.is_set():
                membership.changed.clear()
                self._reassign()
            now = time.monotonic()
            heap = self._heap
            while heap and heap[0][0] <= now:
                due, _, target, generation = heapq.heappop(heap)
                if (
                    self.targets.get(target.key) is not target
                    or target.key not in self.mine
                    or generation != target.generation
                ):
                    continue  # gone, changed, no longer ours, or rescheduled: dropped
                self._push(_slot(target, now), target)
                if target.probing:
                    # The last probe has not finished (a slow target, or every probe slot busy):
                    # no second one beside it, which would count its failures twice.
                    self.stats.skipped += 1
                    continue
                self.stats.lateness.append(now - due)
                target.probing = True
                self._spawn(self._probe(target))
            if self._held and not self._reviewing:
                self._reviewing = True
                self._spawn(self._review())
            self._wake.clear()
            wait = min(heap[0][0] - time.monotonic(), 0.5) if heap else 0.5
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.0)):
                    await self._wake.wait()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- probing -------------------------------------------------------------------------

    async def _outcome(self, key: InstanceKey, spec: Spec, address: str) -> Outcome:
        seam = self.seam
        outcome = seam(key, address) if seam is not None else None
        if outcome is None:
            async with self._limit:
                outcome = await probe(spec, address)
        kind = {"kind": spec.name}
        self.stats.runs += 1
        self._m.checks_run.add(1, kind)
        if not outcome.healthy:
            self.stats.failures += 1
            self._m.check_failures.add(1, kind)
        return outcome

    async def _probe(self, target: Target) -> None:
        try:
            outcome = await self._outcome(target.key, target.spec, target.address)
        finally:
            target.probing = False
        if self.targets.get(target.key) is not target or not self._owns(target.key):
            return
        target.reason = outcome.reason
        spec, key = target.spec, target.key
        if outcome.healthy:
            target.successes += 1
            target.failures = 0
            self._failing.discard(key)
            self._held.pop(key, None)
            if target.state != PASSING and (not target.state or target.successes >= spec.successes):
                n = target.successes
                await self._write(target, PASSING, f"{outcome.reason}, {n} consecutive success{'es' if n > 1 else ''}")
            return
        target.failures += 1
        target.successes = 0
        if target.state == CRITICAL:
            return
        self._failing.add(key)
        if target.failures < spec.failures or key in self._held:
            return
        if self._protection.mass(len(self.mine), len(self._failing)):
            self._held[key] = time.monotonic()
            self.stats.held += 1
            self._m.check_held.add(1, {"outcome": "held"})
            return
        await self._critical(target)

    async def _critical(self, target: Target) -> None:
        n = target.failures
        await self._write(target, CRITICAL, f"{target.reason}, {n} consecutive failure{'s' if n > 1 else ''}")

    async def _review(self) -> None:
        """Decide on the held transitions (self-protection), then look again an interval later."""
        try:
            held = [k for k in self._held if k in self.mine and self.targets[k].failures > 0]
            self._held = {k: self._held[k] for k in held}
            if not held:
                return
            specs = [self.targets[k].spec for k in held]
            interval = min(s.interval for s in specs)
            confirmed: list[InstanceKey] = []
            if not self._protection.mass(len(self.mine), len(self._failing)):
                verdict: str = Verdict.APPLY  # no longer a mass failure: these are real
            else:
                since = min(self._held.values())
                verdict, confirmed = await self._protection.review(
                    held,
                    self.membership.peers(),
                    held_for=time.monotonic() - since,
                    interval=interval,
                    timeout=max(s.timeout for s in specs) + 1.0,
                )
            if verdict == Verdict.REFUSED:
                self.stats.refused += 1
                self._m.check_held.add(len(held) - len(confirmed), {"outcome": "refused"})
            if verdict == Verdict.APPLY or confirmed:
                await self._apply(held if verdict == Verdict.APPLY else confirmed)
            if verdict != Verdict.APPLY:
                await asyncio.sleep(interval)
        finally:
            self._reviewing = False
            self._wake.set()

    async def _apply(self, keys: Sequence[InstanceKey]) -> None:
        """Write the held transitions of ``keys`` that still stand (still ours, still failing)."""
        due = []
        for key in keys:
            target = self.targets.get(key)
            self._held.pop(key, None)
            if target is not None and key in self.mine and target.failures >= target.spec.failures:
                self._m.check_held.add(1, {"outcome": "applied"})
                due.append(self._critical(target))
        await asyncio.gather(*due)

    async def recheck(self, keys: Sequence[InstanceKey]) -> list[tuple[InstanceKey, bool, Outcome | None]]:
        """Probe each of this region's ``keys`` once, as its check says (for another server's
        self-protection): (key, known, outcome)."""

        async def one(key: InstanceKey) -> tuple[InstanceKey, bool, Outcome | None]:
            record = self._view.get(key) if key.region == self.region else None
            instance = record.instance if record is not None else None
            if instance is None or not instance.HasField("check"):
                return key, False, None
            return key, True, await self._outcome(key, Spec.of(instance.check), instance.address)

        return list(await asyncio.gather(*(one(k) for k in keys)))

    # --- verdicts ----------------------------------------------------------------------

    async def _write(self, target: Target, state: int, reason: str) -> None:
        if target.writing:
            return
        target.writing = True
        try:
            await self._put(target, state, reason)
        finally:
            target.writing = False

    async def _put(self, target: Target, state: int, reason: str) -> None:
        membership, key = self.membership, target.key
        now_ms = int(time.time() * 1000)
        verdict = CheckResult(
            state=CheckResult.State.ValueType(state),
            since_ms=now_ms,
            reason=reason,
            checker=membership.identity,
            checked_at_ms=now_ms,
        )
        for _ in range(_WRITE_ATTEMPTS):
            # Ownership, the fence and listed_at read together, with no await between them: a
            # retry after a Conflict must not write for a check another server has taken over
            # meanwhile (its membership list, and so the fence, may have moved past that server).
            if not self._owns(key):
                return
            fence = membership.fence
            record = self._view.get(key)
            if fence is None or record is None:
                return
            instance = record.instance
            if (
                not instance.HasField("check")
                or Spec.of(instance.check) != target.spec
                or instance.address != target.address
            ):
                return  # re-registered meanwhile: the new check starts over
            if instance.check_result.state == state:
                target.state = state
                self._failing.discard(key)
                return
            instance.check_result.CopyFrom(verdict)
            try:
                await self._store.put_fenced(
                    self._keys.instance_key(key),
                    instance.SerializeToString(),
                    lease=record.lease,
                    mod_revision=record.mod_revision,
                    fence=fence,
                    members=(membership.prefix, membership.listed_at),
                )
            except Conflict as exc:
                current = exc.current
                if not isinstance(current, KeyValue):
                    return  # deregistered
                with contextlib.suppress(DiscoveryError, TimeoutError):
                    await self._view.wait_for(current.mod_revision, 2.0)
                continue
            except Fenced as exc:
                log.info("health checks: verdict on %s not written: %s", "/".join(key), exc)
                membership.refresh()
                return
            except DiscoveryError as exc:
                # etcd unreachable, refusing this server or out of space: not recorded as
                # written, so the next probe tries again.
                log.warning("health checks: verdict on %s not written: %s", "/".join(key), exc)
                return
            target.state = state
            self.stats.transitions += 1
            self._failing.discard(key)
            self._m.check_transitions.add(1, {"state": CheckResult.State.Name(CheckResult.State.ValueType(state))})
            level = logging.WARNING if state == CRITICAL else logging.INFO
            log.log(
                level,
                "health checks: %s/%s at %s is %s: %s",
                key.service,
                key.instance_id,
                target.address,
                CheckResult.State.Name(CheckResult.State.ValueType(state)),
                reason,
            )
            return
