"""The JSON read API: ``/v1/services``, ``/v1/services/{name}``, ``/v1/status``, and the
probes. Every answer comes from the view and the servicers' own code: a Resolve over HTTP is
validated, authorized and answered by ``LookupServicer.admit``/``answer``, a Status by
``AdminServicer.status``, and printed by discovery/answers.py exactly as ``discovery resolve
--json`` and ``discovery status --json`` print them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from discovery.answers import resolve_dict, status_dict
from discovery.errors import DiscoveryError, InvalidArgument
from discovery.http.auth import RequestContext
from discovery.http.errors import from_error, json_response
from discovery.http.sources import Sources
from discovery.security.identity import Caller
from discovery.security.policy import Grants
from discovery.view import Record
from discovery_pb.v1 import lookup_pb2 as pb
from discovery_pb.v1.types_pb2 import Status

SCOPES = {"local": pb.LOCAL, "failover": pb.FAILOVER, "all": pb.ALL}
STATUSES = {name.lower(): value for name, value in Status.items() if value != Status.STATUS_UNSPECIFIED}
_RESOLVE_PARAMS = frozenset({"scope", "min_revision", "status", "tag", "zone", "min_healthy"})
MAX_REVISION = 2**63 - 1


def integer(request: web.Request, name: str, default: int, low: int, high: int = MAX_REVISION) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise InvalidArgument(name, f"{raw[:40]!r} is not a whole number") from None
    if not low <= value <= high:
        raise InvalidArgument(name, f"must be between {low} and {high}")
    return value


def only(request: web.Request, allowed: Iterable[str]) -> None:
    """Refuse parameters the endpoint does not know: a typo must not be silently ignored."""
    unknown = sorted(set(request.query) - set(allowed))
    if unknown:
        raise InvalidArgument(
            unknown[0], f"unknown parameter; this endpoint takes {', '.join(sorted(allowed)) or 'none'}"
        )


class Api:
    def __init__(self, sources: Sources, draining: Callable[[], bool] = lambda: False) -> None:
        self._s = sources
        self._draining = draining
        self._counts: dict[str, tuple[int, dict[str, Any]]] = {}

    def caller(self, request: web.Request, method: str) -> tuple[Caller, Grants]:
        return self._s.guard.caller(RequestContext(request), method)

    async def service(self, request: web.Request) -> web.Response:
        """``GET /v1/services/{name}``: a Resolve, with the CLI's flags as parameters."""
        s = self._s
        with s.instruments.timed(s.instruments.lookups, s.instruments.resolve_duration) as labels:
            try:
                only(request, _RESOLVE_PARAMS)
                scope = request.query.get("scope", "local").lower()
                if scope not in SCOPES:
                    raise InvalidArgument("scope", f"unknown scope {scope[:40]!r}; use local, failover or all")
                statuses = []
                for raw in request.query.getall("status", []):
                    if raw.lower() not in STATUSES:
                        raise InvalidArgument("status", f"unknown status {raw[:40]!r}; use {', '.join(STATUSES)}")
                    statuses.append(STATUSES[raw.lower()])
                resolve = pb.ResolveRequest(
                    service=request.match_info["name"],
                    scope=SCOPES[scope],
                    statuses=statuses,
                    tags=request.query.getall("tag", []),
                    zone=request.query.get("zone", ""),
                    min_healthy=integer(request, "min_healthy", 1, 1, 10_000),
                    min_revision=integer(request, "min_revision", 0, 0),
                )
                caller, grants = self.caller(request, "Resolve")
                query = await s.lookup.admit(resolve, caller, grants, s.lookup.max_wait)
            except DiscoveryError as exc:
                labels["outcome"] = type(exc).__name__
                return from_error(exc, rename={"service": "name"})
            answer = pb.ResolveResponse.FromString(s.lookup.answer(query))
        return json_response(resolve_dict(answer))

    async def services(self, request: web.Request) -> web.Response:
        """``GET /v1/services``: every service the caller may read, with its instances counted
        per region and status, and the freshness of every region."""
        try:
            only(request, ())
            _caller, grants = self.caller(request, "ListServices")
        except DiscoveryError as exc:
            return from_error(exc)
        s = self._s
        view = s.view
        out = []
        for index, name in enumerate(sorted(view.service_names())):
            if index % 1000 == 999:
                await asyncio.sleep(0)  # a large view is listed in slices: the loop keeps serving
            if not s.guard.may_read(grants, name):
                continue
            out.append({"service": name, **self._count(name)})
        return json_response(
            {
                "region": s.states.region,
                "revision": view.revision,
                "stale": view.stale,
                "regions": self._regions(),
                "services": out,
            }
        )

    def _count(self, name: str) -> dict[str, Any]:
        """Counts of one service, cached until its instances change."""
        view = self._s.view
        generation = view.service_generation(name)
        hit = self._counts.get(name)
        if hit is not None and hit[0] == generation:
            return hit[1]
        counts = _counts(view.service(name))
        if len(self._counts) > 2 * view.service_count + 1024:
            self._counts.clear()
        self._counts[name] = (generation, counts)
        return counts

    def _regions(self) -> list[dict[str, Any]]:
        states = self._s.states
        out = []
        for region in (states.region, *states.peers):
            fresh = states.freshness(region)
            out.append(
                {
                    "region": region,
                    "local": region == states.region,
                    "stale": fresh.stale,
                    "stale_seconds": -1.0
                    if fresh.stale and fresh.age == float("inf")
                    else round(fresh.age, 1)
                    if fresh.stale
                    else 0.0,
                }
            )
        return out

    async def status(self, request: web.Request) -> web.Response:
        """``GET /v1/status``: what ``discovery status --json`` prints; needs the admin grant."""
        try:
            only(request, ())
            caller, grants = self.caller(request, "Status")
            self._s.guard.require_admin(caller, grants, "Status")
        except DiscoveryError as exc:
            return from_error(exc)
        return json_response(status_dict(self._s.admin.status()))

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready once the view is loaded, and while etcd is away: the server keeps answering
        from its last view, marked stale (one etcd outage must not empty a region's pool)."""
        view = self._s.view
        if view.closing or self._draining():
            return json_response({"ready": False, "reason": "shutting down"}, 503)
        if not view.ready.is_set():
            return json_response({"ready": False, "reason": "the view is loading"}, 503)
        return json_response({"ready": True, "stale": view.stale, "revision": view.revision})


def _counts(records: Iterable[Record]) -> dict[str, Any]:
    regions: dict[str, dict[str, int]] = {}
    total = 0
    for record in records:
        by_status = regions.setdefault(record.region, {})
        status = Status.Name(record.status)  # type: ignore[arg-type]  # an int from the view's compact record
        by_status[status] = by_status.get(status, 0) + 1
        total += 1
    return {
        "instances": total,
        "regions": {r: {"instances": sum(c.values()), "statuses": c} for r, c in sorted(regions.items())},
    }
