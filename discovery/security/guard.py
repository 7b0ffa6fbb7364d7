"""The one door every listener's calls pass: who is calling, may they, are they within their
limits, and the audit line that says what happened (docs/security.md).

Servicers ask the guard before they touch the view or etcd, so nothing denied reaches etcd.
On an insecure server every caller is ``anonymous`` and allowed everything, without limits:
the same code path, so a development cluster exercises what production runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import NoReturn, Protocol

import grpc.aio

from discovery.errors import AuditFailed, DiscoveryError, PermissionDenied, ResourceExhausted, Unauthenticated
from discovery.security.audit import AuditLog, AuditUnavailable
from discovery.security.certs import server_id
from discovery.security.identity import ANONYMOUS, Caller, IdentityError, anonymous_caller, caller_from_auth_context
from discovery.security.limits import RateLimiter, StreamLimiter, StreamSlot
from discovery.security.policy import (
    Grants,
    Policy,
    denial_message,
    denied_identity_message,
    unknown_identity_message,
)

log = logging.getLogger(__name__)

# The status each denial reaches the caller with (discovery.api.errors maps them; the audit
# line names it too, and this package sits below the api).
_DENIAL_CODES: dict[type[DiscoveryError], str] = {
    Unauthenticated: "UNAUTHENTICATED",
    PermissionDenied: "PERMISSION_DENIED",
    ResourceExhausted: "RESOURCE_EXHAUSTED",
}


class CallContext(Protocol):
    """What the guard reads of a call: a gRPC ServicerContext, or the HTTP listener's view of
    its request (discovery/http/), so both doors decide by the same code."""

    def peer(self) -> str: ...

    def auth_context(self) -> Mapping[str, Sequence[bytes]]: ...


class PolicySource(Protocol):
    @property
    def current(self) -> Policy: ...


class InstanceCounts(Protocol):
    def owned(self, region: str, owner: str, service: str = "") -> int: ...

    def region_count(self, region: str) -> int: ...


class _Fixed:
    def __init__(self, policy: Policy) -> None:
        self.current = policy


class Guard:
    """Authorization, limits and audit for one server.

    ``secure`` False: no certificates, every caller is ``anonymous`` with every grant and no
    limits (``discovery serve --insecure``)."""

    def __init__(
        self,
        *,
        region: str,
        trust_domain: str,
        policy: PolicySource | None,
        audit: AuditLog,
        counts: InstanceCounts,
    ) -> None:
        self.region = region
        self.secure = policy is not None
        self._trust_domain = trust_domain
        self._policy: PolicySource = policy if policy is not None else _Fixed(Policy.allow_all())
        self.audit = audit
        self._counts = counts
        self._rates = RateLimiter()
        self._streams = StreamLimiter()

    @property
    def policy(self) -> Policy:
        return self._policy.current

    # --- who ------------------------------------------------------------------------------

    def caller(self, context: CallContext | grpc.aio.ServicerContext, method: str) -> tuple[Caller, Grants]:
        """The caller and its grants; UNAUTHENTICATED (audited) when the certificate names no
        identity the policy knows, or one on its deny list."""
        peer = context.peer() or ""
        if not self.secure:
            return anonymous_caller(peer), self._grants(ANONYMOUS)
        try:
            caller = caller_from_auth_context(context.auth_context(), peer, self._trust_domain)
        except IdentityError as exc:
            self._deny(Caller("", "", peer), method, Unauthenticated(str(exc)))
        policy = self.policy
        if policy.denied(caller.identity):
            self._deny(caller, method, Unauthenticated(denied_identity_message(caller.identity)))
        grants = policy.grants_for(caller.identity)
        if grants is None:
            self._deny(caller, method, Unauthenticated(unknown_identity_message(caller.identity)))
        return caller, grants

    def _grants(self, identity: str) -> Grants:
        grants = self.policy.grants_for(identity)
        assert grants is not None  # allow_all grants everyone
        return grants

    # --- may they --------------------------------------------------------------------------

    def require_register(self, caller: Caller, grants: Grants, method: str, service: str, instance: str = "") -> None:
        if not grants.may_register(service):
            self._deny(
                caller,
                method,
                PermissionDenied(denial_message(caller.identity, "register", service, grants)),
                service=service,
                instance=instance,
            )

    def require_read(self, caller: Caller, grants: Grants, method: str, service: str) -> None:
        """``service`` "" means every service: Watch of all needs read on ``*``."""
        if not (grants.may_read(service) if service else grants.may_read_all):
            self._deny(
                caller,
                method,
                PermissionDenied(denial_message(caller.identity, "read", service or "*", grants)),
                service=service,
            )

    def still_allowed(self, caller: Caller, method: str, service: str | None) -> DiscoveryError | None:
        """Whether ``caller`` may still hold an open stream of ``method`` under the policy in
        force now (asked after a reload): None, or the error to end the stream with, audited
        as a denial. ``service``: what a reading stream follows ("" every service); None for
        a stream that reads nothing (Heartbeat: only the identity must still be known)."""
        if not self.secure:
            return None
        policy = self.policy
        grants = policy.grants_for(caller.identity)
        error: DiscoveryError
        if policy.denied(caller.identity):
            error = Unauthenticated(denied_identity_message(caller.identity))
        elif grants is None:
            error = Unauthenticated(unknown_identity_message(caller.identity))
        elif service is not None and not (grants.may_read(service) if service else grants.may_read_all):
            error = PermissionDenied(denial_message(caller.identity, "read", service or "*", grants))
        else:
            return None
        with contextlib.suppress(DiscoveryError):
            self._deny(caller, method, error, service=service or "")
        return error

    def still_replicating(self, caller: Caller, method: str, requester: str) -> DiscoveryError | None:
        """``still_allowed`` for a replication feed: the identity must still be known and
        still pass ``require_replicate`` as region ``requester`` (the error the feed's open
        would get now, audited)."""
        if not self.secure:
            return None
        error = self.still_allowed(caller, method, None)
        if error is not None:
            return error
        grants = self.policy.grants_for(caller.identity)
        assert grants is not None  # still_allowed found it
        try:
            self.require_replicate(caller, grants, method, requester)
        except DiscoveryError as exc:
            return exc
        return None

    def may_read_now(self, caller: Caller, service: str) -> bool:
        """Whether ``caller`` may read ``service`` under the policy in force now (not the one
        its stream opened under), for streams that ask per resource (ADS)."""
        if not self.secure:
            return True
        grants = self.policy.grants_for(caller.identity)
        return grants is not None and grants.may_read(service)

    def may_read(self, grants: Grants, service: str) -> bool:
        return grants.may_read(service)

    def dns_visible(self, service: str) -> bool:
        """DNS names no caller: it may show only what the policy makes visible to anyone."""
        return self.policy.dns_visible(service)

    def require_admin(self, caller: Caller, grants: Grants, method: str) -> None:
        if not grants.admin:
            self._deny(
                caller,
                method,
                PermissionDenied(f"{caller.identity} may not call {method}: it needs the admin grant"),
            )

    def require_region_server(self, caller: Caller, grants: Grants, method: str) -> None:
        """Only the servers of this region (their identity, with the replicate grant that
        servers hold) may make server-to-server calls inside it (HealthChecks.Recheck)."""
        expected = server_id(self._trust_domain, self.region)
        if self.secure and not grants.admin and (caller.identity != expected or not grants.replicate):
            self._deny(
                caller,
                method,
                PermissionDenied(
                    f"{caller.identity} may not call {method}: only servers of region {self.region} "
                    f"may ({expected}, with the replicate grant)"
                ),
            )

    def require_replicate(self, caller: Caller, grants: Grants, method: str, requester: str) -> None:
        if not grants.replicate:
            self._deny(
                caller,
                method,
                PermissionDenied(
                    f"{caller.identity} may not replicate: only servers of a peer region may "
                    "(the replicate grant; their identity is spiffe://<trust_domain>/discovery/server/<region>)"
                ),
            )
        expected = server_id(self._trust_domain, requester)
        if self.secure and caller.identity != expected and not grants.admin:
            self._deny(
                caller,
                method,
                PermissionDenied(
                    f"{caller.identity} asked to replicate as region {requester!r}, whose servers are {expected}"
                ),
            )

    def require_owner(
        self,
        caller: Caller,
        grants: Grants,
        method: str,
        *,
        owner: str,
        what: str,
        service: str = "",
        instance: str = "",
    ) -> None:
        """Another identity's record or session (``owner``) needs admin; ``what`` says what the
        caller tried ("replace instance 'w1' of 'web'"). A record with no owner was written
        before servers knew identities: whoever may register the service may take it."""
        if owner and owner != caller.identity and not grants.admin:
            self._deny(
                caller,
                method,
                PermissionDenied(f"{caller.identity} may not {what}: it belongs to {owner} (an admin may)"),
                service=service,
                instance=instance,
            )

    # --- limits ----------------------------------------------------------------------------

    def charge_write(self, caller: Caller, grants: Grants, method: str, service: str = "") -> None:
        """One write against the caller's rate (a batch is one). Insecure servers have none."""
        if not self.secure:
            return
        wait = self._rates.take(caller.identity, grants.limits)
        if wait > 0:
            limit = grants.limits.writes_per_second
            self._deny(
                caller,
                method,
                ResourceExhausted(
                    "writes_per_second",
                    f"{caller.identity} is over its limit of {limit:g} writes per second on this server "
                    f"(burst {grants.limits.write_burst}); retry in {wait * 1000:.0f} ms",
                    retry_after=wait,
                ),
                service=service,
            )

    def check_quota(self, caller: Caller, grants: Grants, method: str, service: str, new: int) -> None:
        """``new`` instances about to be created (re-registrations are 0)."""
        if not self.secure or new <= 0:
            return
        limits = grants.limits
        checks = (
            (
                "instances_per_service",
                limits.instances_per_service,
                self._counts.owned(self.region, caller.identity, service),
                f"{caller.identity} holds {{have}} instances of {service!r} in region {self.region}",
            ),
            (
                "instances",
                limits.instances,
                self._counts.owned(self.region, caller.identity),
                f"{caller.identity} holds {{have}} instances in region {self.region}",
            ),
            (
                "region_instances",
                self.policy.region_max_instances,
                self._counts.region_count(self.region),
                f"region {self.region} holds {{have}} instances",
            ),
        )
        for name, cap, have, text in checks:
            if cap and have + new > cap:
                self._deny(
                    caller,
                    method,
                    ResourceExhausted(
                        name,
                        f"{text.format(have=have)}, its limit is {cap} ({name}): deregister some first",
                        retry_after=5.0,
                    ),
                    service=service,
                )

    def open_stream(self, caller: Caller, grants: Grants, method: str, service: str = "") -> StreamSlot:
        """One of the caller's concurrent streams, held until the slot is released (``with``)."""
        slot = self._streams.acquire(caller.identity, grants.limits.streams if self.secure else 0)
        if slot is None:
            self._deny(
                caller,
                method,
                ResourceExhausted(
                    "streams",
                    f"{caller.identity} has {grants.limits.streams} streams open on this server, its limit: "
                    "close some (one Watch of several services, or one Heartbeat stream per process)",
                    retry_after=1.0,
                ),
                service=service,
            )
        return slot

    # --- audit ------------------------------------------------------------------------------

    def before_write(self) -> None:
        """Fail closed when the audit log cannot be written: a write nobody could account for
        is refused (UNAVAILABLE, naming the log), unless the server runs with audit_fail_open."""
        try:
            self.audit.ensure_writable()
        except AuditUnavailable as exc:
            raise AuditFailed(f"{exc} [audit log {self.audit.target}]") from None

    def wrote(
        self,
        caller: Caller,
        method: str,
        *,
        service: str = "",
        instance: str = "",
        revision: int = 0,
        error: DiscoveryError | None = None,
        code: str = "OK",
    ) -> None:
        self.audit.record(
            "write",
            caller=caller,
            method=method,
            service=service,
            instance=instance,
            outcome="ok" if error is None else type(error).__name__,
            code=code,
            revision=revision,
        )

    def event(self, event: str, caller: Caller, method: str, **fields: str | int) -> None:
        """A stream's start or end; extra ``fields`` go into its message as key=value."""
        message = " ".join(f"{k}={v}" for k, v in fields.items()) or None
        self.audit.record(event, caller=caller, method=method, message=message)

    def _deny(
        self, caller: Caller, method: str, error: DiscoveryError, *, service: str = "", instance: str = ""
    ) -> NoReturn:
        self.audit.record(
            "denied",
            caller=caller,
            method=method,
            service=service or None,
            instance=instance or None,
            outcome=type(error).__name__,
            code=_DENIAL_CODES[type(error)],
            limit=error.limit if isinstance(error, ResourceExhausted) else None,
        )
        raise error
