"""Who may do what: the policy file (TOML), default deny.

Schema (every key optional; an unknown key, or a value of the wrong type, is an error that
names the file, the table and the key)::

    deny = ["spiffe://example.org/svc/retired"]   # revoked identities (exact or trailing /*),
                                                  # refused at once: Python gRPC has no CRLs
    [region]
    max_instances = 100000         # the region's total instance cap (0: none)

    [dns]                          # the DNS port (docs/dns.md) carries no identity:
    visible = ["web", "pay.*"]     # services it answers for, to anyone (default: none)

    [limits]                       # defaults for every identity (0: no limit)
    writes_per_second = 50.0       # token bucket refill, per identity and per server
    write_burst = 100              # token bucket size (below 1 counts as 1)
    streams = 100                  # concurrent streams (Watch, Heartbeat, ADS) per identity
    instances_per_service = 1000   # live instances one identity owns in one service
    instances = 10000              # live instances one identity owns in all

    [[grant]]
    identity = "spiffe://example.org/svc/*"  # exact, or ending in /* (any deeper path)
    register = ["{name}", "{name}.*"]        # services it may register, deregister, heartbeat
    read = ["*"]                             # services it may Resolve, Watch, see in ADS
    replicate = false                        # may pull the Replication feed (servers)
    admin = false                            # Status, CSDS, and other identities' records
    [grant.limits]                           # optional: overrides of [limits] for these identities
    writes_per_second = 10.0

Identities: a SPIFFE ID (``spiffe://<trust domain>/<path>``) or, for certificates without a
URI SAN, a CN. A pattern ending in ``/*`` matches every identity under that path, at any depth
(``spiffe://example.org/svc/*`` matches ``.../svc/web`` and ``.../svc/web/canary``, never
``.../svc`` itself). ``*`` anywhere else is an error.

Service patterns: an exact service name (lowercase DNS labels joined by dots, as
discovery.model.validate_service says), a dotted subtree ``payments.*`` (matches ``payments.x``
and ``payments.x.y``; not ``payments`` itself, list it too; never ``payroll``), or ``*`` (every
service). Anything else with ``*`` (``pay*``, ``*.x``, ``a.*.b``) is rejected as ambiguous.
``{name}`` stands for what the identity's trailing ``/*`` matched, when that is one path segment
that makes a valid service name (``.../svc/web`` gives ``web``; ``.../svc/web/canary`` gives
nothing, so patterns using ``{name}`` grant nothing to it); ``{name}`` in a grant whose identity
has no trailing ``/*`` is an error.

Combination: every grant matching an identity applies (the union of their permissions). Each
limit comes from the most specific matching grant that sets it (an exact identity over a
pattern, a longer pattern over a shorter), else from ``[limits]``, else from the built-in
defaults above. Two grants with the same identity setting one limit to different values is an
error. An identity that no grant matches, or that ``deny`` lists, may do nothing.

DNS visibility: a DNS query names no caller, so the DNS port is read-only and answers only
for the services ``[dns] visible`` lists (service patterns as above); others are NXDOMAIN, as
if they did not exist. Whoever can reach the DNS port may read those services' addresses: list
only what every such host may see (docs/security.md, docs/dns.md). ``--insecure`` shows every
service.

Reload: PolicyFile polls the file (stat) and rereads it on SIGHUP; a bad new file keeps the
policy in force and says so (log WARNING, and the ``policy_rejected`` event for audit/metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from discovery.errors import InvalidArgument
from discovery.model import validate_service
from discovery.security.identity import split_spiffe_id, valid_common_name

log = logging.getLogger(__name__)

ANY = "*"
NAME = "{name}"
GRANTS_CACHE_SIZE = 4096


class PolicyError(Exception):
    """The policy file cannot be used; the message names the file, the table and the key."""


@dataclass(frozen=True)
class Limits:
    """Per-identity limits; 0 means no limit."""

    writes_per_second: float = 50.0
    write_burst: int = 100
    streams: int = 100
    instances_per_service: int = 1000
    instances: int = 10000


DEFAULT_LIMITS = Limits()
UNLIMITED = Limits(writes_per_second=0.0, write_burst=0, streams=0, instances_per_service=0, instances=0)
_LIMIT_TYPES: dict[str, type] = {f.name: float if f.name == "writes_per_second" else int for f in fields(Limits)}


# --- service patterns -----------------------------------------------------------------------


class _Services:
    """A set of service patterns, compiled for a fast match: exact names, subtree prefixes
    (each ending in '.'), and whether '*' is among them."""

    __slots__ = ("any", "exact", "prefixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        self.any = False
        for p in patterns:
            if p == ANY:
                self.any = True
            elif p.endswith(".*"):
                prefixes.append(p[:-1])
            else:
                exact.add(p)
        self.exact = frozenset(exact)
        self.prefixes = tuple(sorted(set(prefixes)))

    def match(self, service: str) -> bool:
        if self.any or service in self.exact:
            return True
        return any(service.startswith(p) for p in self.prefixes)


def check_service_pattern(pattern: str) -> str | None:
    """None if ``pattern`` is a valid service pattern, else why not."""
    if pattern == ANY:
        return None
    base = pattern[:-2] if pattern.endswith(".*") else pattern
    if "*" in base:
        return (
            f"pattern {pattern!r} is ambiguous: use an exact name, a dotted subtree "
            "('payments.*' matches payments.x, not payments or payroll) or '*'"
        )
    try:
        validate_service(base)
    except InvalidArgument as e:
        return f"pattern {pattern!r}: {e.rule}"
    return None


# --- identity patterns ----------------------------------------------------------------------


@dataclass(frozen=True)
class _IdentityPattern:
    text: str
    prefix: str  # for "…/*": everything before the '*' (ends in '/'); "" for an exact identity

    @property
    def wildcard(self) -> bool:
        return bool(self.prefix)

    def match(self, identity: str) -> str | None:
        """None if no match; else what the trailing /* matched ("" for an exact match)."""
        if not self.prefix:
            return "" if identity == self.text else None
        if identity.startswith(self.prefix) and len(identity) > len(self.prefix):
            return identity[len(self.prefix) :]
        return None

    @property
    def specificity(self) -> tuple[int, int]:
        return (0, len(self.prefix)) if self.prefix else (1, len(self.text))


def _identity_pattern(text: str) -> _IdentityPattern | str:
    """The compiled pattern, or why ``text`` is not one."""
    wildcard = text.endswith("/*")
    base = text[:-2] if wildcard else text
    if "*" in base:
        return f"identity {text!r}: '*' may only end a pattern, as '/*'"
    if base.startswith("spiffe:"):
        ok = split_spiffe_id(base) is not None or (wildcard and split_spiffe_id(base + "/x") is not None)
        if not ok:
            return f"identity {text!r} is not a SPIFFE ID (spiffe://<trust domain>/<path>)"
    elif not valid_common_name(base):
        return f"identity {text!r}: a CN identity is printable ASCII without spaces"
    return _IdentityPattern(text, base + "/" if wildcard else "")


# --- grants ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """One [[grant]] table, parsed."""

    identity: _IdentityPattern
    register: tuple[str, ...]
    read: tuple[str, ...]
    replicate: bool
    admin: bool
    limits: Mapping[str, float | int]


def _substitute(templates: tuple[str, ...], name: str | None) -> list[str]:
    out = []
    for template in templates:
        pattern = template
        if NAME in template:
            if not name:
                continue
            pattern = template.replace(NAME, name)
            if check_service_pattern(pattern) is not None:
                continue  # the identity's segment does not make a service name (uppercase, '_')
        out.append(pattern)
    return out


@dataclass(frozen=True)
class Grants:
    """What one identity may do: the union of every grant matching it."""

    identity: str
    identity_patterns: tuple[str, ...]
    register_patterns: tuple[str, ...]
    read_patterns: tuple[str, ...]
    replicate: bool
    admin: bool
    limits: Limits
    _register: _Services = field(repr=False, compare=False, default_factory=lambda: _Services(()))
    _read: _Services = field(repr=False, compare=False, default_factory=lambda: _Services(()))

    def __post_init__(self) -> None:
        object.__setattr__(self, "_register", _Services(self.register_patterns))
        object.__setattr__(self, "_read", _Services(self.read_patterns))

    def may_register(self, service: str) -> bool:
        """Register, deregister and heartbeat instances of ``service``."""
        return self._register.match(service)

    def may_read(self, service: str) -> bool:
        """Resolve, Watch, ADS of ``service``; ``"*"`` asks for every service (needs '*')."""
        if service == ANY:
            return self._read.any
        return self._read.match(service)

    @property
    def may_read_all(self) -> bool:
        return self._read.any


def _override(limits: Limits, values: Mapping[str, float | int]) -> Limits:
    changes: dict[str, Any] = dict(values)  # keys and types were checked when parsed
    return replace(limits, **changes)


def _union(identity: str, rules: list[tuple[_Rule, str]], defaults: Limits) -> Grants:
    register: list[str] = []
    read: list[str] = []
    for rule, tail in rules:
        name = tail if tail and "/" not in tail else None
        register += _substitute(rule.register, name)
        read += _substitute(rule.read, name)
    limits = defaults
    by_specificity = sorted(rules, key=lambda r: r[0].identity.specificity)  # least specific first
    for rule, _ in by_specificity:
        if rule.limits:
            limits = _override(limits, rule.limits)
    return Grants(
        identity=identity,
        identity_patterns=tuple(dict.fromkeys(r.identity.text for r, _ in rules)),
        register_patterns=tuple(dict.fromkeys(register)),
        read_patterns=tuple(dict.fromkeys(read)),
        replicate=any(r.replicate for r, _ in rules),
        admin=any(r.admin for r, _ in rules),
        limits=limits,
    )


# --- the policy -----------------------------------------------------------------------------


class Policy:
    """A parsed policy: immutable; PolicyFile swaps in a new one on reload."""

    def __init__(
        self,
        rules: tuple[_Rule, ...] = (),
        deny: tuple[_IdentityPattern, ...] = (),
        defaults: Limits = DEFAULT_LIMITS,
        region_max_instances: int = 0,
        source: str = "",
        *,
        allow_everything: bool = False,
        dns_visible: tuple[str, ...] = (),
    ) -> None:
        self._rules = rules
        self._deny = deny
        self.defaults = defaults
        self.region_max_instances = region_max_instances
        self.source = source
        self.allows_everything = allow_everything
        self.dns_patterns = dns_visible
        self._dns = _Services((ANY,) if allow_everything else dns_visible)
        self._cache: dict[str, Grants | None] = {}

    @classmethod
    def allow_all(cls, limits: Limits = UNLIMITED) -> Policy:
        """For servers started with ``--insecure``: everyone may do everything. No limits by
        default, as before security existed (one anonymous bucket would throttle every client)."""
        return cls(defaults=limits, source="(insecure: no policy)", allow_everything=True)

    @classmethod
    def parse(cls, text: str, source: str) -> Policy:
        return _parse(text, source)

    @classmethod
    def load(cls, path: Path | str) -> Policy:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PolicyError(f"{path}: cannot read the policy: {getattr(e, 'strerror', None) or e}") from e
        return _parse(text, str(path))

    def dns_visible(self, service: str) -> bool:
        """Whether the DNS port may answer for ``service`` (``[dns] visible``)."""
        return self._dns.match(service)

    def denied(self, identity: str) -> bool:
        return any(p.match(identity) is not None for p in self._deny)

    def grants_for(self, identity: str) -> Grants | None:
        """What ``identity`` may do; None when no grant names it or ``deny`` lists it."""
        try:
            return self._cache[identity]
        except KeyError:
            pass
        grants = self._compute(identity)
        if len(self._cache) >= GRANTS_CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[identity] = grants
        return grants

    def _compute(self, identity: str) -> Grants | None:
        if self.allows_everything:
            return Grants(identity, (ANY,), (ANY,), (ANY,), True, True, self.defaults)
        if self.denied(identity):
            return None
        matched = [(r, tail) for r in self._rules if (tail := r.identity.match(identity)) is not None]
        if not matched:
            return None
        return _union(identity, matched, self.defaults)

    def summary(self) -> str:
        if self.allows_everything:
            return "everything allowed (insecure)"
        return f"{len(self._rules)} grants, {len(self._deny)} denied identities"


# --- messages (the lead's errors use these verbatim) ----------------------------------------


def unknown_identity_message(identity: str) -> str:
    return f"certificate identity {identity} is not in this server's policy"


def denied_identity_message(identity: str) -> str:
    return f"certificate identity {identity} is revoked (listed in deny of this server's policy)"


def denial_message(identity: str, action: str, service: str, grants: Grants | None) -> str:
    """PERMISSION_DENIED text: what was refused and what the identity may do instead."""
    if action in ("register", "deregister", "heartbeat", "read"):
        allowed = () if grants is None else grants.read_patterns if action == "read" else grants.register_patterns
        what = "every service" if service == ANY else repr(service)
        return f"{identity} may not {action} {what} (allowed: {', '.join(allowed) or 'none'})"
    if service:
        return f"{identity} may not {action} {service!r} (needs {action} = true in a [[grant]])"
    return f"{identity} may not {action} (needs {action} = true in a [[grant]])"


# --- parsing --------------------------------------------------------------------------------

_TOP_KEYS = ("deny", "region", "limits", "grant", "dns")
_REGION_KEYS = ("max_instances",)
_DNS_KEYS = ("visible",)
_GRANT_KEYS = ("identity", "register", "read", "replicate", "admin", "limits")


def _parse(text: str, source: str) -> Policy:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: not valid TOML: {e}") from e
    _known(doc, _TOP_KEYS, source, "the top level")
    deny = tuple(_pattern(d, source, "deny") for d in _strings(doc.get("deny", []), source, "deny"))
    region = _table(doc.get("region", {}), source, "[region]")
    _known(region, _REGION_KEYS, source, "[region]")
    max_instances = _count(region.get("max_instances", 0), source, "[region]", "max_instances")
    defaults = _override(DEFAULT_LIMITS, _limits(doc.get("limits", {}), source, "[limits]"))
    grants = doc.get("grant", [])
    if not isinstance(grants, list):
        raise PolicyError(f"{source}: 'grant' must be an array of tables: write [[grant]]")
    rules: list[_Rule] = []
    for i, raw in enumerate(grants, 1):
        rules.append(_grant(raw, source, i))
    _check_limit_conflicts(rules, source)
    return Policy(tuple(rules), deny, defaults, max_instances, source, dns_visible=_dns(doc.get("dns", {}), source))


def _dns(value: Any, source: str) -> tuple[str, ...]:
    table = _table(value, source, "[dns]")
    _known(table, _DNS_KEYS, source, "[dns]")
    patterns = _strings(table.get("visible", []), source, "[dns] key 'visible'")
    for p in patterns:
        problem = check_service_pattern(p)
        if problem is not None:
            raise PolicyError(f"{source}: [dns] key 'visible': {problem}")
    return tuple(patterns)


def _grant(raw: Any, source: str, index: int) -> _Rule:
    where = f"[[grant]] #{index}"
    table = _table(raw, source, where)
    if "identity" not in table:
        raise PolicyError(f"{source}: {where} has no 'identity'")
    if not isinstance(table["identity"], str):
        raise PolicyError(f"{source}: {where} key 'identity' must be a string")
    where = f"[[grant]] #{index} (identity {table['identity']!r})"
    _known(table, _GRANT_KEYS, source, where)
    identity = _pattern(table["identity"], source, where)
    services: dict[str, tuple[str, ...]] = {}
    for key in ("register", "read"):
        patterns = _strings(table.get(key, []), source, f"{where} key {key!r}")
        for p in patterns:
            if NAME in p and not identity.wildcard:
                raise PolicyError(
                    f"{source}: {where} key {key!r}: {p!r} uses {NAME}, which needs an identity ending in /*"
                )
            problem = check_service_pattern(p.replace(NAME, "x"))
            if problem is not None or p.replace(NAME, "").count("{") or p.replace(NAME, "").count("}"):
                raise PolicyError(f"{source}: {where} key {key!r}: {problem or f'pattern {p!r} is not a pattern'}")
        services[key] = tuple(patterns)
    return _Rule(
        identity=identity,
        register=services["register"],
        read=services["read"],
        replicate=_bool(table.get("replicate", False), source, where, "replicate"),
        admin=_bool(table.get("admin", False), source, where, "admin"),
        limits=_limits(table.get("limits", {}), source, f"[grant.limits] of {where}"),
    )


def _check_limit_conflicts(rules: list[_Rule], source: str) -> None:
    seen: dict[tuple[str, str], float | int] = {}
    for rule in rules:
        for key, value in rule.limits.items():
            previous = seen.setdefault((rule.identity.text, key), value)
            if previous != value:
                raise PolicyError(
                    f"{source}: two grants for identity {rule.identity.text!r} set limits.{key} "
                    f"to {previous} and {value}: keep one"
                )


def _known(table: Mapping[str, Any], known: tuple[str, ...], source: str, where: str) -> None:
    for key in table:
        if key not in known:
            raise PolicyError(f"{source}: unknown key {key!r} in {where} (known: {', '.join(known)})")


def _table(value: Any, source: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{source}: {where} must be a table")
    return value


def _strings(value: Any, source: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{source}: {where} must be an array of strings")
    return value


def _pattern(text: str, source: str, where: str) -> _IdentityPattern:
    pattern = _identity_pattern(text)
    if isinstance(pattern, str):
        raise PolicyError(f"{source}: {where}: {pattern}")
    return pattern


def _bool(value: Any, source: str, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{source}: {where} key {key!r} must be true or false")
    return value


def _count(value: Any, source: str, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PolicyError(f"{source}: {where} key {key!r} must be a whole number >= 0 (0: no limit)")
    return value


def _limits(value: Any, source: str, where: str) -> dict[str, float | int]:
    table = _table(value, source, where)
    _known(table, tuple(_LIMIT_TYPES), source, where)
    out: dict[str, float | int] = {}
    for key, v in table.items():
        if _LIMIT_TYPES[key] is float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise PolicyError(f"{source}: {where} key {key!r} must be a number >= 0 (0: no limit)")
            out[key] = float(v)
        else:
            out[key] = _count(v, source, where, key)
    return out


# --- the file, reloaded ---------------------------------------------------------------------

EventSink = Callable[[str, str], None]
_Signature = tuple[int, int, int, int]
_MISSING: _Signature = (-1, -1, -1, -1)


@dataclass(frozen=True)
class _Outcome:
    signature: _Signature | None
    policy: Policy | None = None
    problem: str = ""


class PolicyFile:
    """The policy in force, from ``path``, reloaded when the file changes and on request.

    The constructor loads it and raises PolicyError for a bad file (a server must not start on
    one). Afterwards a bad file keeps the old policy: a WARNING in the log and
    ``on_event("policy_rejected", message)``, once per version of the file; a good one
    ``on_event("policy_reloaded", message)``. Events are called on the thread that calls
    ``check`` (the event loop, for ``run``)."""

    def __init__(self, path: Path | str, *, on_event: EventSink | None = None) -> None:
        self.path = Path(path)
        self._on_event = on_event
        self._forced = False
        self._wake = asyncio.Event()  # binds to a loop only when awaited: safe to make here
        self._signature: _Signature | None = self._stat()  # before the read: a write during it shows next poll
        self.current: Policy = Policy.load(self.path)
        self._rejected: _Signature | None = None

    def request_reload(self) -> None:
        """Reread the file at the next chance even if it looks unchanged (SIGHUP)."""
        self._forced = True
        self._wake.set()

    def check(self) -> bool:
        """Reload if the file changed or a reload was requested; True if a new policy is in force."""
        force, self._forced = self._forced, False
        return self._apply(self._read(self._seen(), force=force))

    async def check_async(self) -> bool:
        """``check`` with the file work off the event loop."""
        force, self._forced = self._forced, False
        return self._apply(await asyncio.to_thread(self._read, self._seen(), force=force))

    async def run(self, poll_seconds: float) -> None:
        """Poll every ``poll_seconds`` and whenever ``request_reload`` is called, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=poll_seconds)
            self._wake.clear()
            try:
                await self.check_async()
            except Exception:  # the reloader must outlive any surprise; the old policy stays
                log.exception("policy %s: reload failed; keeping the previous policy", self.path)

    def _seen(self) -> tuple[_Signature | None, _Signature | None]:
        return self._signature, self._rejected

    def _stat(self) -> _Signature:
        try:
            st = os.stat(self.path)
        except OSError:
            return _MISSING
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def _read(self, seen: tuple[_Signature | None, _Signature | None], *, force: bool) -> _Outcome:
        """Runs in a worker thread: stat, read and parse; touches no shared state."""
        before = self._stat()
        if not force and before in seen:
            return _Outcome(before)
        try:
            policy = Policy.load(self.path)
        except PolicyError as e:
            if self._stat() != before:
                return _Outcome(None)  # written while read: the next poll sees the finished file
            return _Outcome(before, problem=str(e))
        if self._stat() != before:
            return _Outcome(None)
        return _Outcome(before, policy=policy)

    def _apply(self, outcome: _Outcome) -> bool:
        if outcome.policy is not None:
            self.current = outcome.policy
            self._signature, self._rejected = outcome.signature, None
            message = f"policy {self.path} reloaded: {outcome.policy.summary()}"
            log.info("%s", message)
            self._emit("policy_reloaded", message)
            return True
        if outcome.problem:
            self._rejected = outcome.signature
            message = f"{outcome.problem}; keeping the previous policy"
            log.warning("%s", message)
            self._emit("policy_rejected", message)
        return False

    def _emit(self, event: str, message: str) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event, message)
            except Exception:
                log.exception("policy %s: the %s handler failed", self.path, event)
