"""Active health checks (docs/health-checks.md), one module per concept: ``spec`` (a check's
rules and defaults, what a re-registration keeps), ``probes`` (TCP, gRPC health, HTTP, with
TLS), ``membership`` (the region's checkers in etcd, rendezvous hashing), ``checker`` (the
schedule, thresholds and fenced verdicts), ``protection`` (self-protection against a
checker's own network failing), and ``service`` (them together, as the server runs them)."""

from discovery.health.checker import Checker, CheckerStats, Seam
from discovery.health.membership import Membership, owner
from discovery.health.probes import Outcome, probe
from discovery.health.protection import PeerCredentials, ProtectionSettings, SelfProtection, Verdict
from discovery.health.service import HealthChecks, members_prefix
from discovery.health.spec import Spec, keep_result, validate_check, validate_registration

__all__ = [
    "Checker",
    "CheckerStats",
    "HealthChecks",
    "Membership",
    "Outcome",
    "PeerCredentials",
    "ProtectionSettings",
    "Seam",
    "SelfProtection",
    "Spec",
    "Verdict",
    "keep_result",
    "members_prefix",
    "owner",
    "probe",
    "validate_check",
    "validate_registration",
]
