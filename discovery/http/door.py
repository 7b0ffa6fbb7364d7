"""The HTTP door of one server: its listeners on the server's own event loop.

``http_listen``: the JSON API, the event stream, ``/metrics``, the probes and the dashboard;
HTTPS requiring a client certificate when the server serves mTLS. ``metrics_listen``
(optional): ``/metrics``, ``/healthz`` and ``/readyz`` alone, plaintext, for scrapers and
probes that hold no certificate. aiohttp runs inside the loop the gRPC server already runs
in and installs no signal handlers (``handle_signals=False``): the server's shutdown order
stays the one place that decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from discovery.errors import InvalidArgument
from discovery.http.app import build_app, build_metrics_app
from discovery.http.auth import HttpsContext
from discovery.http.events import Events
from discovery.http.metrics import PrometheusExport
from discovery.http.sources import Sources
from discovery.model import split_address

log = logging.getLogger(__name__)


class HttpDoor:
    def __init__(self, sources: Sources, metrics: PrometheusExport) -> None:
        self._s = sources
        self.metrics = metrics
        self.events = Events(sources, sources.config.http_max_streams)
        self._runners: list[web.AppRunner] = []
        self._https: HttpsContext | None = None
        self._reload: asyncio.Task[None] | None = None
        self.port = 0  # http_listen's, once started
        self.metrics_port = 0

    @property
    def scheme(self) -> str:
        return "http" if self._s.certificates is None else "https"

    async def start(self) -> None:
        config = self._s.config
        grace = config.grace_seconds
        if config.http_listen:
            ssl_context = None
            if self._s.certificates is not None:
                self._https = HttpsContext(self._s.certificates, config.reload_poll_seconds)
                ssl_context = self._https.context
                self._reload = asyncio.create_task(self._https.run(), name="https-reload")
            app = build_app(self._s, self.metrics, self.events)
            self.port = await self._listen(app, config.http_listen, "http_listen", grace, ssl_context)
        if config.metrics_listen:
            app = build_metrics_app(self._s, self.metrics, self.events)
            self.metrics_port = await self._listen(app, config.metrics_listen, "metrics_listen", grace, None)

    async def _listen(self, app: web.Application, address: str, field: str, grace: float, ssl_context: object) -> int:
        host, port = split_address(address, field, allow_port_zero=True)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=grace)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=512, reuse_port=False)  # type: ignore[arg-type]
        try:
            await site.start()
        except OSError as exc:
            raise InvalidArgument(field, f"cannot listen on {address} ({exc.strerror or exc}): is it in use?") from None
        server = site._server  # aiohttp exposes the bound port only here
        sockets = getattr(server, "sockets", None) or []
        bound = int(sockets[0].getsockname()[1]) if sockets else port
        log.info("HTTP%s on %s:%d", "S" if ssl_context else "", host, bound)
        return bound

    def drain(self) -> None:
        """Shutdown, step 1: /readyz turns 503 and no new event stream opens."""
        self.events.close()

    async def stop(self) -> None:
        if self._reload is not None:
            self._reload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload
            self._reload = None
        while self._runners:
            await self._runners.pop().cleanup()
