"""Admin servicer: Status, from state the server already holds (never waits on etcd)."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc.aio

from discovery.api.errors import abort
from discovery.errors import DiscoveryError
from discovery.replication.state import OriginState, RegionStates
from discovery.security.guard import Guard
from discovery.store import StoreHealth
from discovery.view import View
from discovery_pb.v1 import admin_pb2 as pb
from discovery_pb.v1.admin_pb2_grpc import AdminServicer as _Base


class AdminServicer(_Base):
    def __init__(
        self,
        view: View,
        states: RegionStates,
        etcd_endpoints: list[str],
        health: Callable[[], StoreHealth],
        version: str,
        *,
        guard: Guard,
        health_checks: Callable[[], pb.HealthCheckerStatus | None] = lambda: None,
    ) -> None:
        self._view = view
        self._guard = guard
        self._states = states
        self._region = states.region
        self._endpoints = etcd_endpoints
        self._health = health
        self._version = version
        self._started = time.monotonic()
        self._health_checks = health_checks

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        try:
            caller, grants = self._guard.caller(context, "Status")
            self._guard.require_admin(caller, grants, "Status")
        except DiscoveryError as exc:
            await abort(context, exc)
        return self.status()

    def status(self) -> pb.StatusResponse:
        """The answer to an authorized Status, whichever door asked."""
        view, health = self._view, self._health()
        contact = time.monotonic() - view.last_contact if view.last_contact else 0.0
        return pb.StatusResponse(
            region=self._region,
            revision=view.revision,
            instance_count=view.instance_count,
            service_count=view.service_count,
            etcd=pb.EtcdStatus(
                endpoints=self._endpoints,
                healthy=health.healthy and not view.stale,
                error=health.error or (view.last_error if view.stale else ""),
                last_contact_seconds=0.0 if not view.stale else contact,
            ),
            stale=view.stale,
            server_version=self._version,
            uptime_seconds=time.monotonic() - self._started,
            origins=[_origin_status(o) for o in self._states.origins()],
            health_checks=self._health_checks(),
        )


def _origin_status(o: OriginState) -> pb.OriginStatus:
    return pb.OriginStatus(
        origin=o.origin,
        connected=o.connected,
        leader=o.leader,
        checkpoint_revision=o.checkpoint_revision,
        head_revision=o.head_revision,
        lag_revisions=o.lag_revisions,
        lag_seconds=o.lag_seconds,
        last_contact_seconds=o.last_contact_seconds,
        source=o.source,
        replicas=o.replicas,
        heartbeat_seconds=o.heartbeat_seconds,
        warning=o.warning,
    )
