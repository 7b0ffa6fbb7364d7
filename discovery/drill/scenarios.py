"""The faults a drill can inject, each with how it goes in, how it comes out, and which
regions must keep their availability meanwhile.

Against ``discovery dev`` every fault goes through the cluster's control endpoint (signals,
kills and restarts of the processes it owns, the fault proxy between regions). Against any
other cluster, ``--inject``/``--heal`` commands do the fault and the heal; the drill still
drives the load, keeps the time and checks the outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

from discovery.drill.cluster import ClusterFile, Control, FaultError
from discovery.store import Store
from discovery_client import TlsConfig
from discovery_pb.v1 import admin_pb2, admin_pb2_grpc


@dataclass(frozen=True)
class LinkSettings:
    """The slow link: one-way latency, its jitter, and the share of chunks lost."""

    delay_ms: float = 150.0
    jitter_ms: float = 50.0
    loss: float = 0.05

    def validate(self) -> None:
        if self.delay_ms < 0 or not 0 <= self.jitter_ms <= self.delay_ms or not 0 <= self.loss < 1:
            raise ValueError("--delay-ms >= 0, 0 <= --jitter-ms <= --delay-ms, 0 <= --loss < 1")


@dataclass
class FaultContext:
    cluster: ClusterFile
    control: Control
    target: str
    hold: float
    link: LinkSettings
    event: Callable[[str], None]
    notes: dict[str, Any] = field(default_factory=dict)  # what the report shows of the fault


Step = Callable[[FaultContext], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    hold: float  # default seconds the fault is held
    inject: Step
    heal: Step
    judge_target: bool = False  # the faulted region, too, must stay available
    needs: Callable[[ClusterFile, str], str | None] = lambda _c, _t: None  # why it cannot run here
    during: Step | None = None  # work done while the fault is held


# --- region-hang ------------------------------------------------------------------------------


async def _pause(ctx: FaultContext) -> None:
    await ctx.control.call("pause_region", region=ctx.target)
    ctx.event(f"SIGSTOP every process of {ctx.target} (servers and etcd)")


async def _resume(ctx: FaultContext) -> None:
    await ctx.control.call("resume_region", region=ctx.target)
    ctx.event(f"SIGCONT {ctx.target}")


# --- region-partition, slow-link -------------------------------------------------------------


def _needs_proxy(cluster: ClusterFile, _target: str) -> str | None:
    if cluster.control and not cluster.routes:
        return "this cluster runs without the fault proxy: start `discovery dev` without --no-fault-proxy"
    return None


async def _cut(ctx: FaultContext) -> None:
    await ctx.control.call("set_link_fault", region=ctx.target, fault={"blackhole": True})
    ctx.event(f"{ctx.target} cut off: nothing passes between it and the other regions, either way")


async def _slow(ctx: FaultContext) -> None:
    link = ctx.link
    fault = {"delay_ms": link.delay_ms, "jitter_ms": link.jitter_ms, "loss": link.loss}
    await ctx.control.call("set_link_fault", region=ctx.target, fault=fault)
    ctx.notes["link"] = fault
    ctx.event(
        f"links of {ctx.target} slowed: {link.delay_ms:g} ms +- {link.jitter_ms:g} each way, {link.loss:.0%} loss"
    )


async def _heal_links(ctx: FaultContext) -> None:
    await ctx.control.call("heal_links")
    ctx.event("links healed")


# --- etcd-leader-kill -------------------------------------------------------------------------


def _needs_three_members(cluster: ClusterFile, target: str) -> str | None:
    members = len(cluster.region(target).etcd)
    if members < 3:
        return (
            f"{target} has {members} etcd member(s); killing the leader of a one-member etcd is an outage, "
            "not a drill: start `discovery dev --etcd-members 3`"
        )
    return None


async def _kill_etcd_leader(ctx: FaultContext) -> None:
    leader = (await ctx.control.call("etcd_leader", region=ctx.target))["index"]
    ctx.notes["etcd_member"] = leader  # before the kill: a heal must find it whatever happens next
    await ctx.control.call("kill_etcd_member", region=ctx.target, index=leader)
    ctx.event(f"SIGKILL {ctx.target} etcd member {leader} (the leader)")


async def _restart_etcd_member(ctx: FaultContext) -> None:
    index = ctx.notes["etcd_member"]
    pid = (await ctx.control.call("restart_etcd_member", region=ctx.target, index=index))["pid"]
    ctx.event(f"{ctx.target} etcd member {index} restarted (pid {pid})")


# --- server-kill ------------------------------------------------------------------------------


async def region_status(
    servers: tuple[str, ...], timeout: float = 3.0, tls: TlsConfig | None = None
) -> admin_pb2.StatusResponse | str:
    """Status from the first of ``servers`` that answers, or why none did; ``tls`` secures the
    channels (None: the environment's settings)."""
    errors = []
    dial = tls if tls is not None else TlsConfig.from_env()
    for address in servers:
        async with dial.aio_channel(address) as channel:
            try:
                status: admin_pb2.StatusResponse = await admin_pb2_grpc.AdminStub(channel).Status(
                    admin_pb2.StatusRequest(), timeout=timeout
                )
                return status
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{address}: {exc.code().name}")
    return "; ".join(errors)


async def replicator_leader(cluster: ClusterFile, region: str) -> tuple[int, str]:
    """The index and origin of a server of ``region`` that leads a replicator, from Status."""
    servers = cluster.region(region).servers
    status = await region_status(servers, tls=cluster.client_tls())
    if isinstance(status, str):
        raise FaultError(f"no server of {region} answers Status: {status}")
    for origin in status.origins:
        if origin.leader in servers:
            return servers.index(origin.leader), origin.origin
    raise FaultError(f"no replicator of {region} has a leader now")


async def _kill_server(ctx: FaultContext) -> None:
    index, origin = await replicator_leader(ctx.cluster, ctx.target)
    ctx.notes["server"] = index  # before the kill: a heal must find it whatever happens next
    await ctx.control.call("kill_server", region=ctx.target, index=index)
    ctx.event(f"SIGKILL {ctx.target} server-{index}, leader of the replicator from {origin}")
    if len(ctx.cluster.region(ctx.target).servers) == 1:
        # Then this is the region losing its servers, not a failover: its writes fail and its
        # leased instances expire until the restart. Said, so the report is not misread.
        ctx.event(
            f"{ctx.target} has one server: its clients have no other server there until the restart"
            " (for the failover case: discovery dev --servers-per-region 2)"
        )


async def _restart_server(ctx: FaultContext) -> None:
    index = ctx.notes["server"]
    pid = (await ctx.control.call("restart_server", region=ctx.target, index=index))["pid"]
    ctx.event(f"{ctx.target} server-{index} restarted (pid {pid})")


# --- compaction-during-outage -----------------------------------------------------------------


async def _compact_others(ctx: FaultContext) -> None:
    """Half-way through the outage (the churn goes on meanwhile), compact every other region's
    etcd at its head: past whatever the cut-off region had replicated from it."""
    await asyncio.sleep(ctx.hold / 2)
    checkpoints = await _checkpoints(ctx.cluster, ctx.target)
    compacted: dict[str, int] = {}
    for region in ctx.cluster.regions:
        if region.name == ctx.target:
            continue
        if not region.etcd:
            raise FaultError(f"{ctx.cluster.path} lists no etcd endpoints for {region.name}: cannot compact it")
        async with Store(region.etcd) as store:
            health = await store.health()
            if not health.healthy:
                raise FaultError(f"{region.name}'s etcd does not answer: {health.error}")
            await store.compact(health.revision)
        compacted[region.name] = health.revision
        behind = checkpoints.get(region.name)
        ctx.event(
            f"compacted {region.name}'s etcd at revision {health.revision} "
            f"({ctx.target} had replicated it up to {behind if behind is not None else 'unknown'})"
        )
    ctx.notes["compacted"] = compacted
    ctx.notes["checkpoints"] = checkpoints


async def _checkpoints(cluster: ClusterFile, region: str) -> dict[str, int]:
    """How far ``region`` had replicated each origin, from its own servers' Status."""
    status = await region_status(cluster.region(region).servers, tls=cluster.client_tls())
    return {} if isinstance(status, str) else {o.origin: o.checkpoint_revision for o in status.origins}


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "region-hang",
            "SIGSTOP every process of the region (servers and etcd) for longer than the lease TTLs, then SIGCONT",
            hold=15.0,
            inject=_pause,
            heal=_resume,
        ),
        Scenario(
            "region-partition",
            "the region keeps running but nothing passes between it and the other regions, either way",
            hold=15.0,
            inject=_cut,
            heal=_heal_links,
            needs=_needs_proxy,
        ),
        Scenario(
            "slow-link",
            "latency with jitter and loss on every link of the region; every region must stay available",
            hold=15.0,
            inject=_slow,
            heal=_heal_links,
            judge_target=True,
            needs=_needs_proxy,
        ),
        Scenario(
            "etcd-leader-kill",
            "SIGKILL the etcd leader of a three-member region, then restart it",
            hold=10.0,
            inject=_kill_etcd_leader,
            heal=_restart_etcd_member,
            needs=_needs_three_members,
        ),
        Scenario(
            "server-kill",
            "SIGKILL the server leading one of the region's replicators, then restart it",
            hold=10.0,
            inject=_kill_server,
            heal=_restart_server,
        ),
        Scenario(
            "compaction-during-outage",
            "cut the region off, let the others churn and compact their etcd past its checkpoints, heal",
            hold=15.0,
            inject=_cut,
            heal=_heal_links,
            needs=_needs_proxy,
            during=_compact_others,
        ),
    )
}
