"""The HTTP door of one server: its listeners on the server's own event loop.

``http_listen``: the JSON API, the event stream, ``/metrics``, the probes and the dashboard;
HTTPS requiring a client certificate when the server serves mTLS. ``metrics_listen``
(optional): ``/metrics``, ``/healthz`` and ``/readyz`` alone, plaintext, for scrapers and
probes that hold no certificate. aiohttp runs inside the loop the gRPC server already runs
in and installs no signal handlers (``handle_signals=False``): the server's shutdown order
stays the one place that decides.

Connections are bounded on both listeners: an idle keep-alive connection is closed after
``KEEPALIVE_SECONDS`` (aiohttp's default is an hour, so idle clients would pile up), and a
listener holding its cap of connections answers a new one 503 and closes it
(``MetricsListener``: ``METRICS_MAX_CONNECTIONS``; the main one: ``http_max_streams`` plus
``MAX_CONNECTIONS`` for everything that is not a stream). A request's headers must be complete
within ``HEADERS_SECONDS`` of its first byte, or the connection is closed: aiohttp has no such
deadline, and without one a client sending a header a minute (slowloris) would hold its
connections, and with enough of them the listener's cap, for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl

from aiohttp import web

from discovery.errors import InvalidArgument
from discovery.http.app import build_app, build_metrics_app
from discovery.http.auth import HttpsContext
from discovery.http.errors import error_body
from discovery.http.events import Events
from discovery.http.metrics import PrometheusExport
from discovery.http.sources import Sources
from discovery.model import split_address

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 1024  # on http_listen, beyond http_max_streams (each stream holds one)
METRICS_MAX_CONNECTIONS = 64  # on metrics_listen: a few scrapers and probes
HANDSHAKE_SECONDS = 10.0  # a TLS handshake not done by then is dropped (asyncio's default: 60)
REFUSING = 64  # refused connections held for their 503 at once; more are dropped unanswered
HEADERS_SECONDS = 10.0  # a request's headers not complete this long after its first byte: closed
BACKLOG = 512


class HttpDoor:
    def __init__(self, sources: Sources, metrics: PrometheusExport) -> None:
        self._s = sources
        self.metrics = metrics
        self.events = Events(sources, sources.config.http_max_streams)
        self._runners: list[web.AppRunner] = []
        self._refused: dict[str, int] = {}  # by listener setting, kept after a stop for the counter
        self._slow: dict[str, int] = {}
        self._sites: list[CappedSite] = []
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
            cap = config.http_max_streams + MAX_CONNECTIONS
            self.port = await self._listen(
                app, config.http_listen, "http_listen", grace, ssl_context=ssl_context, cap=cap
            )
        if config.metrics_listen:
            app = build_metrics_app(self._s, self.metrics, self.events)
            self.metrics_port = await self._listen(
                app, config.metrics_listen, "metrics_listen", grace, ssl_context=None, cap=METRICS_MAX_CONNECTIONS
            )

    async def _listen(
        self,
        app: web.Application,
        address: str,
        field: str,
        grace: float,
        *,
        ssl_context: ssl.SSLContext | None,
        cap: int,
    ) -> int:
        host, port = split_address(address, field, allow_port_zero=True)
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=grace, keepalive_timeout=KEEPALIVE_SECONDS
        )
        await runner.setup()
        self._runners.append(runner)
        site = CappedSite(runner, host, port, ssl_context=ssl_context, cap=cap, field=field)
        try:
            await site.start()
        except OSError as exc:
            raise InvalidArgument(field, f"cannot listen on {address} ({exc.strerror or exc}): is it in use?") from None
        self._sites.append(site)
        log.info("HTTP%s on %s:%d (at most %d connections)", "S" if ssl_context else "", host, site.port, cap)
        return site.port

    def refused(self) -> dict[str, int]:
        """Connections answered 503 over each listener's cap, by its setting
        (``http_listen``, ``metrics_listen``): what /metrics counts."""
        for site in self._sites:
            self._refused[site.field] = site.refused
        return dict(self._refused)

    def slow(self) -> dict[str, int]:
        """Connections closed because a request's headers took over ``HEADERS_SECONDS``."""
        for site in self._sites:
            self._slow[site.field] = site.slow
        return dict(self._slow)

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
        self.refused()
        self.slow()
        self._sites.clear()


class CappedSite(web.BaseSite):
    """A TCP listener like aiohttp's ``TCPSite`` that holds at most ``cap`` connections: one
    more is answered 503 (``Retry-After``) and closed, so a flood of clients costs a short
    answer each, not a connection each. Counted once a connection is made (after its TLS
    handshake, which ``HANDSHAKE_SECONDS`` bounds). Refused connections waiting for their
    close are bounded too (``REFUSING``): past that, a new one is dropped without an answer."""

    __slots__ = ("_answer", "_bound", "_cap", "_field", "_host", "_port", "open", "refused", "refusing", "slow")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        cap: int,
        field: str,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=BACKLOG)
        self._host, self._port, self._cap, self._field = host, port, cap, field
        self._bound = port
        self.refused = 0
        self.open = 0  # connections admitted and not yet lost
        self.refusing = 0  # refused connections answered and not yet closed
        self._answer = _busy_answer(cap)
        self.slow = 0  # connections closed for headers slower than HEADERS_SECONDS

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._bound}"

    @property
    def port(self) -> int:
        return self._bound

    @property
    def field(self) -> str:
        return self._field

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.BaseProtocol:
            return _Capped(server, self)

        self._server = await asyncio.get_running_loop().create_server(
            protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=HANDSHAKE_SECONDS if self._ssl_context else None,
        )
        if self._server.sockets:
            self._bound = int(self._server.sockets[0].getsockname()[1])

    def full(self) -> bool:
        return self.open >= self._cap

    def busy_answer(self) -> bytes:
        return self._answer


def _busy_answer(cap: int) -> bytes:
    """The 503 a listener over its cap writes, whole, in the shape of every HTTP error."""
    body = json.dumps(
        error_body(
            "resource_exhausted",
            f"this listener has {cap} connections open, its limit: retry later or use another server",
            limit="connections",
            retry_after_seconds=1,
        ),
        separators=(",", ":"),
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Capped(asyncio.Protocol):
    """aiohttp's protocol for one connection, or, when the listener is full as the connection
    is made, a 503 and a close. It decides in ``connection_made`` (synchronously, against a
    count that includes every connection made before), then passes everything through."""

    __slots__ = ("_deadline", "_handler", "_server", "_site", "_tail", "_transport")

    def __init__(self, server: web.Server, site: CappedSite) -> None:
        self._server, self._site = server, site
        self._handler: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._deadline: asyncio.TimerHandle | None = None  # set while a request's headers arrive
        self._tail = b""  # the last bytes seen, for a header end split across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        site = self._site
        if site.full():
            site.refused += 1
            assert isinstance(transport, asyncio.WriteTransport)
            if site.refusing >= REFUSING:
                transport.abort()  # a flood: no answer, no file descriptor held for a second
                return
            site.refusing += 1
            self._transport = transport
            transport.write(site.busy_answer())
            # Closed once the request has arrived (a close with it unread would reset the
            # connection before the client reads the answer), or after a second without one.
            asyncio.get_running_loop().call_later(1.0, transport.close)
            return
        site.open += 1
        self._handler = self._server()
        self._transport = transport
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._headers_deadline(data)
            self._handler.data_received(data)
        elif self._transport is not None:
            self._transport.close()

    def _headers_deadline(self, data: bytes) -> None:
        """Start the clock at a request's first byte, stop it at the blank line that ends its
        headers (the API takes no request bodies: bytes after it start the next request)."""
        seen = self._tail + data
        end = seen.rfind(b"\r\n\r\n")
        if end >= 0:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            seen = seen[end + 4 :]
        if seen and self._deadline is None:
            self._deadline = asyncio.get_running_loop().call_later(HEADERS_SECONDS, self._too_slow)
        self._tail = seen[-3:]

    def _too_slow(self) -> None:
        self._deadline = None
        if self._transport is not None:
            log.debug("HTTP: a request's headers took over %.0f s: connection closed", HEADERS_SECONDS)
            self._site.slow += 1
            self._transport.close()

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            return self._handler.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._handler is not None:
            self._site.open -= 1
            self._handler.connection_lost(exc)
        elif self._transport is not None:
            self._site.refusing -= 1
            self._transport = None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()
