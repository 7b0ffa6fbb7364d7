"""The aiohttp application: routes, the error shape of every answer, the security headers,
and a deadline on everything but the event stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib.resources import files

from aiohttp import web
from aiohttp.typedefs import Middleware

from discovery.errors import DiscoveryError
from discovery.http.api import Api
from discovery.http.auth import RequestContext
from discovery.http.errors import error_response, from_error
from discovery.http.events import Events
from discovery.http.metrics import CONTENT_TYPE, PrometheusExport
from discovery.http.sources import Sources

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The dashboard loads only its own files and talks only to its own server: no inline script,
# no other origin, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
STATIC = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
DEADLINE_SLACK = 5.0  # beyond the longest min_revision wait


def _static(name: str) -> bytes:
    return files("discovery.http").joinpath("static", name).read_bytes()


def build_app(sources: Sources, metrics: PrometheusExport, events: Events) -> web.Application:
    """The main listener's application: the API, the event stream, the dashboard and the
    probes. With TLS, everything needs a client certificate the policy knows."""
    api = Api(sources, lambda: events.closing)
    deadline = sources.config.max_wait_seconds + DEADLINE_SLACK
    pages = {name: _static(name) for name in STATIC}  # read once: the loop never waits on disk

    async def ui(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("file") or "index.html"
        if name not in pages:
            return error_response(404, "not_found", f"no such file {name[:80]!r} in the dashboard")
        try:
            api.caller(request, "Dashboard")
        except DiscoveryError as exc:
            return from_error(exc)
        return web.Response(body=pages[name], content_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    async def to_ui(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    async def scrape(request: web.Request) -> web.StreamResponse:
        if sources.certificates is not None:
            try:  # over mTLS the figures are the admin's, as Status is
                caller, grants = sources.guard.caller(RequestContext(request), "Metrics")
                sources.guard.require_admin(caller, grants, "Metrics")
            except DiscoveryError as exc:
                return from_error(exc)
        return metrics_response(metrics)

    app = web.Application(middlewares=[_errors(deadline, streaming={"/v1/events"})], client_max_size=64 * 1024)
    app.router.add_get("/", to_ui, allow_head=False)
    app.router.add_get("/ui", to_ui, allow_head=False)
    app.router.add_get("/ui/", ui)
    app.router.add_get("/ui/{file}", ui)
    app.router.add_get("/v1/services", api.services)
    app.router.add_get("/v1/services/{name}", api.service)
    app.router.add_get("/v1/status", api.status)
    app.router.add_get("/v1/events", events.handle, allow_head=False)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", scrape)
    return app


def build_metrics_app(sources: Sources, metrics: PrometheusExport, events: Events) -> web.Application:
    """The plain listener (``metrics_listen``): scrapes and probes only, without certificates."""
    api = Api(sources, lambda: events.closing)

    async def scrape(request: web.Request) -> web.StreamResponse:
        return metrics_response(metrics)

    app = web.Application(middlewares=[_errors(DEADLINE_SLACK, streaming=set())], client_max_size=1024)
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    return app


def metrics_response(metrics: PrometheusExport) -> web.Response:
    response = web.Response(body=metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


def _errors(deadline: float, streaming: set[str]) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path in streaming:
                response = await handler(request)
            else:
                async with asyncio.timeout(deadline):
                    response = await handler(request)
        except web.HTTPNotFound:
            response = error_response(
                404, "not_found", f"no such path {request.path[:200]!r}: see /ui/ or docs/http.md"
            )
        except web.HTTPMethodNotAllowed as exc:
            response = error_response(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}",
            )
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        except web.HTTPException as exc:
            if exc.status >= 400:
                response = error_response(exc.status, "http_error", exc.reason)
            else:
                exc.headers.update(SECURITY_HEADERS)
                raise
        except TimeoutError:
            response = error_response(504, "deadline_exceeded", f"no answer within {deadline:g}s")
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            response = error_response(500, "internal", "the server failed to answer; see its log")
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
        return response

    return middleware
