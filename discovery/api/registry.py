"""Registry servicer: Register, Heartbeat, Deregister, each behind the guard (docs/security.md):
the caller's grant on the service, its ownership of the record, its limits, then the audit line."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc.aio

from discovery.api.admission import Admission
from discovery.api.errors import abort, status_for
from discovery.api.streams import OpenStreams
from discovery.errors import Conflict, DiscoveryError, InvalidArgument, NotFound, ShuttingDown, StoreUnavailable
from discovery.health.spec import keep_result
from discovery.keys import InstanceKey, KeySchema
from discovery.model import validate_instance_id, validate_service
from discovery.registry import CONFLICT_ATTEMPTS, MAX_BATCH, Registered, Registry
from discovery.security.guard import Guard
from discovery.security.identity import Caller
from discovery.security.policy import Grants
from discovery.store import KeyValue
from discovery.telemetry import Instruments
from discovery.view import Record, View
from discovery_pb.v1 import registry_pb2 as pb
from discovery_pb.v1.registry_pb2_grpc import RegistryServicer as _Base
from discovery_pb.v1.types_pb2 import Instance, Session

_SHUTTING_DOWN = "the server is shutting down; send heartbeats to another server of the region"
HEARTBEAT_SLACK = 2.0  # heartbeats may go past the write limit this many times over
_CATCH_UP_SECONDS = 2.0  # a lease not in the view yet: how long to wait for the view to reach etcd's head


class RegistryServicer(_Base):
    def __init__(
        self,
        registry: Registry,
        keys: KeySchema,
        view: View,
        instruments: Instruments,
        *,
        guard: Guard,
        admission: Admission,
        head_revision: Callable[[], Awaitable[int]],
    ) -> None:
        self._registry = registry
        self._keys = keys
        self._view = view
        self._region = registry.region
        self._m = instruments
        self._guard = guard
        self._admission = admission
        self._head_revision = head_revision
        self.streams = OpenStreams(_SHUTTING_DOWN)

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterResponse:
        guard = self._guard
        with self._m.timed(self._m.registrations, self._m.register_duration) as labels:
            try:
                caller, grants = guard.caller(context, "Register")
                record = self._registry.prepare(request.instance, caller.identity)
                guard.require_register(caller, grants, "Register", record.service, record.instance_id)
                guard.charge_write(caller, grants, "Register", record.service)  # denied attempts cost too
                existing = self._owned_by(
                    caller, grants, "Register", record.service, record.instance_id, what="replace"
                )
                if existing is not None and record.HasField("check"):
                    keep_result(record, existing.instance)  # the checker's verdict stays
                guard.check_quota(caller, grants, "Register", record.service, 0 if existing is not None else 1)
                guard.before_write()
            except DiscoveryError as exc:
                labels["outcome"] = type(exc).__name__
                await abort(context, exc)
            try:
                if request.session_id:
                    session = await self._require_session(caller, grants, "Register", request.session_id)
                    record.ttl_seconds = session.ttl_seconds
                with self._admission.write("Register"):
                    done = await self._put(
                        caller, grants, record, existing.mod_revision if existing else 0, request.session_id
                    )
            except DiscoveryError as exc:
                labels["outcome"] = type(exc).__name__
                self._audit(caller, "Register", record.service, record.instance_id, error=exc)
                await abort(context, exc)
            self._audit(caller, "Register", record.service, record.instance_id, revision=done.revision)
        return pb.RegisterResponse(
            instance_id=done.instance.instance_id,
            revision=done.revision,
            lease_id=done.lease_id,
            ttl_seconds=done.instance.ttl_seconds,
        )

    def _owned_by(
        self, caller: Caller, grants: Grants, method: str, service: str, instance_id: str, *, what: str
    ) -> Record | None:
        """The instance as the view has it, if the caller may ``what`` it (PERMISSION_DENIED
        if it is another identity's and the caller no admin); None when there is none."""
        existing = self._view.get(InstanceKey(self._region, service, instance_id))
        if existing is not None:
            self._require_owner(caller, grants, method, existing.instance, what)
        return existing

    def _require_owner(self, caller: Caller, grants: Grants, method: str, record: Instance, what: str) -> None:
        self._guard.require_owner(
            caller,
            grants,
            method,
            owner=record.owner,
            what=f"{what} instance {record.instance_id!r} of {record.service!r}",
            service=record.service,
            instance=record.instance_id,
        )

    async def _put(
        self, caller: Caller, grants: Grants, record: Instance, expected: int, session: int = 0
    ) -> Registered:
        """Write only over the record that was authorized: the view may lag etcd by a moment,
        and another identity's registration in that moment must not be replaced unchecked.
        An admin (every caller of an insecure server) may replace anything: no condition."""
        if grants.admin:
            return await self._registry.register(record, session=session)
        for _ in range(CONFLICT_ATTEMPTS):
            try:
                return await self._registry.register(record, session=session, expect_mod_revision=expected)
            except Conflict as exc:
                current = exc.current
                expected = self._reauthorize(
                    caller, grants, "Register", record, current if isinstance(current, KeyValue) else None
                )
        raise StoreUnavailable(
            f"instance {record.instance_id!r} of {record.service!r} kept changing while being registered: retry"
        )

    def _reauthorize(
        self, caller: Caller, grants: Grants, method: str, record: Instance, current: KeyValue | None
    ) -> int:
        """A record written meanwhile (through another server) is authorized again, as if it
        had been there at first: its owner, the checker's verdict it carries, and the quota
        when the instance is now a new one. Raises to refuse; returns the revision to expect."""
        found = Instance.FromString(current.value) if current is not None else None
        if found is not None:
            self._require_owner(caller, grants, method, found, "replace")
        keep_result(record, found)
        self._guard.check_quota(caller, grants, method, record.service, 0 if found is not None else 1)
        return current.mod_revision if current is not None else 0

    async def Heartbeat(
        self, request_iterator: AsyncIterator[pb.HeartbeatRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.HeartbeatResponse]:
        if self.streams.closing:
            await abort(context, ShuttingDown(_SHUTTING_DOWN))
        try:
            caller, grants = self._guard.caller(context, "Heartbeat")
            slot = self._guard.open_stream(caller, grants, "Heartbeat")
        except DiscoveryError as exc:
            await abort(context, exc)
        task = self.streams.add(context)
        self.streams.guard(task, lambda: self._guard.still_allowed(caller, "Heartbeat", None))
        self._guard.event("stream_start", caller, "Heartbeat")
        allowed: set[int] = set()  # leases this stream has shown it may keep alive
        try:
            with slot:
                async for request in request_iterator:
                    try:
                        if request.lease_id not in allowed:
                            await self._authorize_lease(caller, grants, request.lease_id)
                            allowed.add(request.lease_id)
                        with self._admission.write("a heartbeat", slack=HEARTBEAT_SLACK):
                            ttl = await self._registry.heartbeat(request.lease_id)
                    except DiscoveryError as exc:
                        allowed.discard(request.lease_id)
                        await abort(context, exc)
                    yield pb.HeartbeatResponse(lease_id=request.lease_id, ttl_seconds=ttl)
        finally:
            self.streams.discard(task)
            self._guard.event("stream_end", caller, "Heartbeat", leases=len(allowed))

    def _session_in_view(self, session_id: int) -> Session | None:
        data = self._view.meta(self._keys.session(self._region, session_id))
        return Session.FromString(data) if data is not None else None

    async def _session(self, session_id: int) -> Session | None:
        """This region's session ``session_id``: from the view, else (opened a moment ago
        through another server) from etcd."""
        return self._session_in_view(session_id) or await self._registry.session(session_id)

    async def _require_session(self, caller: Caller, grants: Grants, method: str, session_id: int) -> Session:
        session = await self._session(session_id) if session_id > 0 else None
        if session is None:
            raise NotFound(f"session {session_id} has expired or was closed: open a new one (OpenSession)")
        self._guard.require_owner(caller, grants, method, owner=session.owner, what=f"use session {session_id:x}")
        return session

    async def _authorize_lease(self, caller: Caller, grants: Grants, lease_id: int) -> None:
        """Heartbeat keeps alive only this region's sessions and leases of its instance
        records that the caller owns (an admin: any such), never another lease in etcd: a
        replicator's election lease kept alive by a stranger would block the region's
        replication failover."""
        if lease_id <= 0:
            return  # the registry says why
        # The view first (no etcd read for the common case, an instance's own lease); etcd
        # only for what the view may not have yet: a session opened a moment ago elsewhere.
        session = self._session_in_view(lease_id)
        records = [] if session is not None else self._records_on(lease_id)
        if session is None and not records:
            session = await self._registry.session(lease_id)
        if session is not None:
            self._guard.require_owner(
                caller, grants, "Heartbeat", owner=session.owner, what=f"heartbeat session {lease_id:x}"
            )
            return
        if not records:
            # Registered a moment ago through another server: let the view reach etcd's head.
            try:
                head = await self._head_revision()
                await self._view.wait_for(head, _CATCH_UP_SECONDS)
            except (DiscoveryError, TimeoutError):
                raise StoreUnavailable(
                    f"cannot tell what lease {lease_id} holds yet: retry, or heartbeat through another server"
                ) from None
            records = self._records_on(lease_id)
        if not records:
            self._guard.audit.record("denied", caller=caller, method="Heartbeat", outcome="NotFound", code="NOT_FOUND")
            raise NotFound(
                f"lease {lease_id} holds no instance of region {self._region}: "
                "Heartbeat keeps registrations alive (register again for a new lease)"
            )
        for record in records:
            if record.owner != caller.identity:  # decoded only when it may be refused
                self._require_owner(caller, grants, "Heartbeat", record.instance, "heartbeat")

    def _records_on(self, lease_id: int) -> list[Record]:
        return [r for r in self._view.on_lease(lease_id) if r.region == self._region]

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        guard = self._guard
        try:
            caller, grants = guard.caller(context, "OpenSession")
            if not grants.register_patterns and not grants.admin:
                guard.require_register(caller, grants, "OpenSession", "*")
            guard.charge_write(caller, grants, "OpenSession")
            guard.before_write()
            with self._admission.write("OpenSession"):
                session, revision = await self._registry.open_session(
                    request.ttl_seconds, caller.identity, request.name
                )
        except DiscoveryError as exc:
            await abort(context, exc)
        guard.audit.record(
            "session_opened",
            caller=caller,
            method="OpenSession",
            revision=revision,
            message=f"session {session.session_id:x} ttl {session.ttl_seconds}s {request.name}",
        )
        return pb.OpenSessionResponse(session_id=session.session_id, ttl_seconds=session.ttl_seconds, revision=revision)

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        guard = self._guard
        try:
            caller, grants = guard.caller(context, "CloseSession")
            await self._require_session(caller, grants, "CloseSession", request.session_id)
            guard.before_write()
            with self._admission.write("CloseSession"):
                revision = await self._registry.close_session(request.session_id)
        except DiscoveryError as exc:
            await abort(context, exc)
        guard.audit.record(
            "session_closed",
            caller=caller,
            method="CloseSession",
            revision=revision,
            message=f"session {request.session_id:x}",
        )
        return pb.CloseSessionResponse(revision=revision)

    async def RegisterBatch(
        self, request: pb.RegisterBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterBatchResponse:
        """Every instance is authorized as a Register would be (grant, owner, quota); the batch
        counts once against the write rate. Leased instances need the session: a batch grants
        no lease per instance."""
        guard = self._guard
        try:
            caller, grants = guard.caller(context, "RegisterBatch")
            if len(request.instances) > MAX_BATCH:
                raise InvalidArgument("instances", f"at most {MAX_BATCH} per batch (got {len(request.instances)})")
            records = []
            seen: set[tuple[str, str]] = set()
            for i, item in enumerate(request.instances):
                if item.ttl_seconds and not request.session_id:
                    raise InvalidArgument(
                        f"instances[{i}].ttl_seconds",
                        "a batch registers static instances or a session's: open a session",
                    )
                record = self._registry.prepare(item, caller.identity)
                if (record.service, record.instance_id) in seen:
                    raise InvalidArgument(
                        f"instances[{i}]", f"{record.service}/{record.instance_id} is in the batch twice"
                    )
                seen.add((record.service, record.instance_id))
                guard.require_register(caller, grants, "RegisterBatch", record.service, record.instance_id)
                records.append(record)
            guard.charge_write(caller, grants, "RegisterBatch")
            new: dict[str, int] = {}
            expected: list[int] = []
            for record in records:
                existing = self._owned_by(
                    caller, grants, "RegisterBatch", record.service, record.instance_id, what="replace"
                )
                expected.append(existing.mod_revision if existing is not None else 0)
                if existing is None:
                    new[record.service] = new.get(record.service, 0) + 1
                elif record.HasField("check"):
                    keep_result(record, existing.instance)  # the checker's verdict stays
            for service, count in new.items():
                guard.check_quota(caller, grants, "RegisterBatch", service, count)
            if request.session_id:
                session = await self._require_session(caller, grants, "RegisterBatch", request.session_id)
                for record in records:
                    record.ttl_seconds = session.ttl_seconds
            guard.before_write()

            def recheck(record: Instance, current: KeyValue | None) -> None:
                self._reauthorize(caller, grants, "RegisterBatch", record, current)

            with self._admission.write("RegisterBatch"):
                # As Register: an admin (every caller of an insecure server) writes unconditionally.
                revision, done = await self._registry.register_batch(
                    records,
                    request.session_id,
                    expected=None if grants.admin else expected,
                    recheck=None if grants.admin else recheck,
                )
        except DiscoveryError as exc:
            await abort(context, exc)
        guard.audit.record(
            "write",
            caller=caller,
            method="RegisterBatch",
            outcome="ok",
            code="OK",
            revision=revision,
            message=f"{len(done)} instances",
        )
        return pb.RegisterBatchResponse(
            revision=revision,
            results=[
                pb.RegisterResponse(
                    instance_id=d.instance.instance_id,
                    revision=d.revision,
                    lease_id=d.lease_id,
                    ttl_seconds=d.instance.ttl_seconds,
                )
                for d in done
            ],
        )

    async def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterResponse:
        guard = self._guard
        try:
            caller, grants = guard.caller(context, "Deregister")
            validate_service(request.service)
            validate_instance_id(request.instance_id)
            guard.require_register(caller, grants, "Deregister", request.service, request.instance_id)
            self._owned_by(caller, grants, "Deregister", request.service, request.instance_id, what="deregister")
            guard.charge_write(caller, grants, "Deregister", request.service)
            guard.before_write()
        except DiscoveryError as exc:
            self._m.deregistrations.add(1, {"outcome": type(exc).__name__})
            await abort(context, exc)
        try:
            with self._admission.write("Deregister"):
                revision = await self._registry.deregister(request.service, request.instance_id)
        except DiscoveryError as exc:
            self._m.deregistrations.add(1, {"outcome": type(exc).__name__})
            self._audit(caller, "Deregister", request.service, request.instance_id, error=exc)
            await abort(context, exc)
        self._m.deregistrations.add(1, {"outcome": "ok"})
        self._audit(caller, "Deregister", request.service, request.instance_id, revision=revision)
        return pb.DeregisterResponse(revision=revision)

    def _audit(
        self,
        caller: Caller,
        method: str,
        service: str,
        instance: str,
        *,
        revision: int = 0,
        error: DiscoveryError | None = None,
    ) -> None:
        code = "OK" if error is None else status_for(error).name
        self._guard.wrote(caller, method, service=service, instance=instance, revision=revision, error=error, code=code)
