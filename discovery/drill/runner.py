"""One drill from start to verdict: load and observe every region, take a baseline, inject
the fault, hold it, heal it, keep loading, then read every region's final view and judge.

Whatever happens (an error, Ctrl-C), a fault that went in is healed before the drill ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field

import grpc

from discovery.drill.analysis import Bounds, expected_state, judge, phase_figures, verdict
from discovery.drill.cluster import ClusterFile, Control, FaultError, run_hook
from discovery.drill.history import AFTER, BEFORE, DURING, History, Op, Outcome, Timeline
from discovery.drill.load import InstanceKey, LoadSettings, Observer, Presence, RegionLoad
from discovery.drill.report import Report
from discovery.drill.saturation import HostMonitor, Strain, Thresholds
from discovery.drill.scenarios import SCENARIOS, FaultContext, LinkSettings, Scenario, region_status
from discovery.errors import StoreUnavailable
from discovery_client import TlsConfig
from discovery_pb.v1 import lookup_pb2, lookup_pb2_grpc, types_pb2


class Progress:
    """Where a drill reports while it runs: ``event`` lines (a fault went in) to keep, and a
    ``live`` line (rates of the last seconds) that replaces the previous one. Silent here."""

    def event(self, line: str) -> None:
        pass

    def live(self, line: str) -> None:
        pass


class DrillError(RuntimeError):
    """The drill could not run (bad settings, a cluster that does not answer, a fault that
    could not be injected); no verdict about the cluster. ``usage``: the settings or the
    cluster file are at fault, not the cluster."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True)
class DrillSettings:
    scenario: str
    target: str | None = None  # default: the farthest region (last in the file)
    hold: float | None = None  # default: the scenario's
    baseline: float = 5.0
    after: float = 10.0
    load: LoadSettings = field(default_factory=LoadSettings)
    bounds: Bounds = field(default_factory=Bounds)
    link: LinkSettings = field(default_factory=LinkSettings)
    saturation: Thresholds = field(default_factory=Thresholds)
    inject_command: str | None = None
    heal_command: str | None = None
    service: str | None = None  # default: drill-<random>, so drills never see each other's instances
    start_timeout: float = 10.0

    def validate(self) -> Scenario:
        scenario = SCENARIOS.get(self.scenario)
        if scenario is None:
            raise DrillError(f"unknown scenario {self.scenario!r} (one of: {', '.join(SCENARIOS)})", usage=True)
        if (self.inject_command is None) != (self.heal_command is None):
            raise DrillError("--inject and --heal go together", usage=True)
        if self.baseline <= 0 or self.after <= 0 or (self.hold is not None and self.hold <= 0):
            raise DrillError("--baseline, --duration and --after must be > 0", usage=True)
        try:
            self.load.validate()
            self.bounds.validate()
            self.link.validate()
            self.saturation.validate()
        except ValueError as exc:
            raise DrillError(str(exc), usage=True) from None
        return scenario


async def run_drill(cluster: ClusterFile, settings: DrillSettings, progress: Progress | None = None) -> Report:
    scenario = settings.validate()
    target = settings.target or cluster.names[-1]
    try:
        cluster.region(target)
    except ValueError as exc:
        raise DrillError(str(exc), usage=True) from None
    hooks = settings.inject_command is not None
    if not hooks:
        if not cluster.control:
            raise DrillError(
                f"{cluster.path} names no control endpoint (only `discovery dev` writes one): "
                "give the fault as --inject and --heal commands",
                usage=True,
            )
        reason = scenario.needs(cluster, target)
        if reason:
            raise DrillError(f"{scenario.name}: {reason}", usage=True)
    try:
        tls = cluster.client_tls()
    except ValueError as exc:
        raise DrillError(str(exc), usage=True) from None
    drill = _Drill(cluster, settings, scenario, target, progress or Progress(), tls=tls)
    return await drill.run()


class _Drill:
    def __init__(
        self,
        cluster: ClusterFile,
        settings: DrillSettings,
        scenario: Scenario,
        target: str,
        progress: Progress,
        *,
        tls: TlsConfig,
    ) -> None:
        self.cluster, self.settings, self.scenario, self.target = cluster, settings, scenario, target
        self.tls = tls  # the cluster file's, or the environment's
        self.hold = settings.hold if settings.hold is not None else scenario.hold
        self.service = settings.service or f"drill-{secrets.token_hex(4)}"
        self.history = History()
        self.timeline = Timeline()
        self.events: list[tuple[float, str]] = []
        self.progress = progress
        self.ctx = FaultContext(cluster, Control(cluster), target, self.hold, settings.link, self.event)
        self.observers: dict[str, Observer] = {}
        self.loads: dict[str, RegionLoad] = {}
        self.heal_took: float | None = None
        self.host = HostMonitor()

    def event(self, what: str) -> None:
        self.events.append((self.timeline.now(), what))
        self.progress.event(f"[{self.timeline.now():6.1f}s] {what}")

    async def run(self) -> Report:
        injected = False
        ticker = asyncio.create_task(self._tick())
        self.host.start()
        try:
            await self._start()
            self.event(f"baseline: {self.settings.baseline:g}s of load in every region")
            await asyncio.sleep(self.settings.baseline)
            self.timeline.fault_at = time.monotonic()
            injected = True
            await self._inject()
            await self._hold()
            healing = time.monotonic()
            await self._heal()
            injected = False
            # The phase after, and convergence, start once the heal is done (a restarted
            # server serves, a resumed region runs): the heal's own time belongs to the fault.
            self.timeline.heal_at = time.monotonic()
            self.heal_took = self.timeline.heal_at - healing
            self.event(f"after: {self.settings.after:g}s of load")
            await asyncio.sleep(self.settings.after)
            return await self._finish()
        finally:
            ticker.cancel()
            await self.host.stop()
            if injected:  # an error or Ctrl-C between inject and heal: never leave the fault in
                try:
                    await asyncio.shield(self._heal())
                except BaseException as exc:  # the first error is the one raised
                    self.progress.event(f"THE FAULT MAY STILL BE IN: {exc}")
            await self._close()

    async def _start(self) -> None:
        regions = self.cluster.regions
        self.event(
            f"{self.scenario.name} on {self.target}; service {self.service}; regions {', '.join(self.cluster.names)}"
        )
        timeout = self.settings.start_timeout
        op_timeout = self.settings.load.op_timeout
        await self._check_names()
        for region in regions:
            observer = Observer(region.name, region.servers, self.service, op_timeout, tls=self.tls)
            self.observers[region.name] = observer
            try:
                await observer.start(timeout)
            except Exception as exc:
                raise DrillError(
                    f"{region.name}'s servers ({', '.join(region.servers)}) do not answer: {exc}"
                ) from None
        for index, region in enumerate(regions):
            # The other regions' servers as this region reaches them (through the fault
            # proxy), in the file's order: the order its resolves fail over in.
            failover = tuple(
                address
                for o in regions
                if o.name != region.name
                for address in self.cluster.servers_seen_from(region.name, o.name)
            )
            load = RegionLoad(
                region=region.name,
                index=index,
                servers=region.servers,
                failover=failover,
                service=self.service,
                history=self.history,
                settings=self.settings.load,
                tls=self.tls,
            )
            self.loads[region.name] = load
            try:
                async with asyncio.timeout(timeout):
                    await load.start()
            except Exception as exc:
                raise DrillError(f"cannot start the load in {region.name}: {exc!r}") from None

    async def _check_names(self) -> None:
        """Each region's servers must call themselves by the file's name: the checks match
        instances to regions by it (a typo would make every registration look lost)."""
        for region in self.cluster.regions:
            answer = await region_status(region.servers, self.settings.start_timeout, self.tls)
            if isinstance(answer, str):
                raise DrillError(f"{region.name}'s servers ({', '.join(region.servers)}) do not answer: {answer}")
            if answer.region != region.name:
                raise DrillError(
                    f"{self.cluster.path}: region {region.name!r} lists {', '.join(region.servers)}, "
                    f"which serve region {answer.region!r}",
                    usage=True,
                )

    async def _inject(self) -> None:
        self.event(f"fault: {self.scenario.summary}")
        try:
            if self.settings.inject_command is not None:
                out = await run_hook(self.settings.inject_command, "--inject")
                self.event(f"--inject done{': ' + out[-200:] if out else ''}")
            else:
                await self.scenario.inject(self.ctx)
        except (FaultError, StoreUnavailable) as exc:
            raise DrillError(f"could not inject the fault: {exc}") from None

    async def _hold(self) -> None:
        self.event(f"holding the fault for {self.hold:g}s")
        tasks = [asyncio.create_task(asyncio.sleep(self.hold))]
        if self.scenario.during is not None:
            tasks.append(asyncio.create_task(self.scenario.during(self.ctx)))
        try:
            await asyncio.gather(*tasks)
        except (FaultError, StoreUnavailable) as exc:
            raise DrillError(f"{self.scenario.name}: {exc}") from None
        finally:
            for task in tasks:
                task.cancel()
            # Nothing of the fault's work may still run when the heal goes in.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _heal(self) -> None:
        try:
            if self.settings.heal_command is not None:
                out = await run_hook(self.settings.heal_command, "--heal")
                self.event(f"--heal done{': ' + out[-200:] if out else ''}")
            else:
                await self.scenario.heal(self.ctx)
        except FaultError as exc:
            raise DrillError(f"could not heal the fault: {exc} (heal it by hand)") from None

    async def _finish(self) -> Report:
        self.timeline.ended = time.monotonic()
        await asyncio.gather(*(load.stop_calls() for load in self.loads.values()))
        await self.host.stop()  # the samples cover every call
        self.event("load stopped; waiting for every region to hold every acknowledged change")
        presences = {name: o.presence for name, o in self.observers.items()}
        assert self.timeline.heal_at is not None
        # Convergence is judged on the changes acknowledged before the heal; the final check
        # waits as long for the ones made after it (held deletions take the resume grace).
        deadline = max(self.timeline.heal_at, self.timeline.ended) + self.settings.bounds.converge_within
        await self._settle(presences, deadline)
        finals, unread = await self._finals()
        v = verdict(self.history, presences, finals, self.timeline.heal_at)
        figures = phase_figures(self.history, presences, self.timeline)
        judged = [n for n in self.cluster.names if n != self.target or self.scenario.judge_target]
        ticks = [tick for load in self.loads.values() for tick in load.ticks]
        strain = Strain.of(self.host.samples, ticks, self.settings.saturation, self.host.cpus)
        judgement = judge(
            self.history,
            self.timeline,
            judged,
            v,
            bounds=self.settings.bounds,
            healed=True,
            strain=strain,
            stall=self.settings.load.op_timeout / 4,
        )
        judgement.broken += [f"could not read {name}'s final view: {why}" for name, why in unread.items()]
        for name in judged:
            skips = self.loads[name].skips
            if not skips:
                continue
            line = f"{name}: {len(skips)} calls not made, too many in flight (the region could not keep up)"
            if all(strain.met(t, t) for t in skips):
                judgement.inconclusive.append(f"{line}, each while saturated ({strain.describe(skips[0], skips[-1])})")
            else:
                judgement.broken.append(line)
        t = self.timeline
        assert t.fault_at is not None and t.heal_at is not None and t.ended is not None
        spans = {BEFORE: (t.started, t.fault_at), DURING: (t.fault_at, t.heal_at), AFTER: (t.heal_at, t.ended)}
        return Report(
            scenario=self.scenario.name,
            target=self.target,
            service=self.service,
            hold=self.hold,
            baseline=self.settings.baseline,
            after=self.settings.after,
            heal_took=self.heal_took,
            regions=self.cluster.names,
            judged=tuple(judged),
            figures=figures,
            verdict=v,
            bounds=self.settings.bounds,
            broken=judgement.broken,
            inconclusive=judgement.inconclusive,
            latency=tuple(judgement.latency),
            host={phase: strain.figures(a, b) for phase, (a, b) in spans.items()},
            saturation=self.settings.saturation,
            events=self.events,
            notes=self.ctx.notes,
            skipped={n: load.skipped for n, load in self.loads.items()},
        )

    async def _settle(self, presences: dict[str, Presence], deadline: float) -> None:
        """Until every region's view shows every change whose outcome is known, or the
        convergence bound passes (then the verdict says what was missing)."""
        fate = expected_state(self.history)[0]
        while time.monotonic() < deadline:
            if all(all((k in p.current) == present for k, present in fate.items()) for p in presences.values()):
                return
            for observer in self.observers.values():
                observer.changed.clear()
            waits = [asyncio.create_task(o.changed.wait()) for o in self.observers.values()]
            await asyncio.wait(
                waits, timeout=min(0.5, max(0.0, deadline - time.monotonic())), return_when="FIRST_COMPLETED"
            )
            for task in waits:
                task.cancel()

    async def _finals(self) -> tuple[dict[str, frozenset[InstanceKey]], dict[str, str]]:
        """Each region's view of the service read from its own servers (every status)."""
        finals: dict[str, frozenset[InstanceKey]] = {}
        unread: dict[str, str] = {}
        request = lookup_pb2.ResolveRequest(
            service=self.service,
            scope=lookup_pb2.ALL,
            statuses=[types_pb2.SERVING, types_pb2.DRAINING, types_pb2.NOT_SERVING],
        )
        for region in self.cluster.regions:
            errors = []
            for address in region.servers:
                async with self.tls.aio_channel(address) as channel:
                    try:
                        resp = await lookup_pb2_grpc.LookupStub(channel).Resolve(request, timeout=3)
                    except grpc.aio.AioRpcError as exc:
                        errors.append(f"{address}: {exc.code().name}")
                        continue
                finals[region.name] = frozenset((e.instance.region, e.instance.instance_id) for e in resp.endpoints)
                break
            else:
                finals[region.name] = self.observers[region.name].presence.current
                unread[region.name] = "; ".join(errors)
        return finals, unread

    async def _close(self) -> None:
        for load in self.loads.values():
            with contextlib.suppress(Exception):
                await load.close()
        for observer in self.observers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(observer.close(), 5)

    async def _tick(self) -> None:
        """A progress line a second: phase, time, and each region's last two seconds."""
        while True:
            await asyncio.sleep(1.0)
            self.progress.live(self.status_line())

    def status_line(self) -> str:
        now = time.monotonic()
        if self.timeline.ended is not None:
            return f"settling {now - self.timeline.ended:4.1f}s: waiting for every region's view to show every change"
        phase = self.timeline.phase(now)
        start = {BEFORE: self.timeline.started, DURING: self.timeline.fault_at, AFTER: self.timeline.heal_at}[phase]
        length = {BEFORE: self.settings.baseline, DURING: self.hold, AFTER: self.settings.after}[phase]
        recent: list[Op] = []
        for op in reversed(self.history.ops):  # newest first; calls end within the op timeout
            if now - op.invoked > self.settings.load.op_timeout + 2:
                break
            if op.outcome is not None and now - op.completed < 2:
                recent.append(op)
        parts = [
            f"{name} reg {_rate(recent, name, 'register')} res {_rate(recent, name, 'resolve')}"
            for name in self.cluster.names
        ]
        return f"{phase} {now - (start or now):4.1f}/{length:g}s  " + " | ".join(parts)


def _rate(ops: list[Op], region: str, kind: str) -> str:
    mine = [o for o in ops if o.kind == kind and o.region == region]
    if not mine:
        return "  -  "
    return f"{sum(o.outcome is Outcome.OK for o in mine) / len(mine):4.0%}"
