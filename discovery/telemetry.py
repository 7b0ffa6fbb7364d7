"""OpenTelemetry: the one place tracer and meter providers are set up.

Exporters are off unless the standard variables ask for them:
``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` = ``otlp`` | ``console`` | ``none``
(``otlp`` is also chosen when only ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set). With nothing
configured the API's no-op providers stay in place, so instruments cost next to nothing on
the Resolve path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace

if TYPE_CHECKING:  # the type only: telemetry sits below the domain, which may import it
    from discovery.replication.state import OriginState

_SDK_PROVIDERS: list[Any] = []


def _exporter(kind: str) -> str:
    value = os.environ.get(f"OTEL_{kind}_EXPORTER", "").strip().lower()
    if not value and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return "otlp"
    return value or "none"


def setup(service_name: str, region: str) -> bool:
    """Install SDK providers for the exporters configured; returns whether tracing is on."""
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": service_name, "cloud.region": region})
    traces, meters = _exporter("TRACES"), _exporter("METRICS")
    if traces != "none":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        tracer_provider = TracerProvider(resource=resource)
        if traces == "console":
            span_exporter: Any = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter()
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        trace.set_tracer_provider(tracer_provider)
        _SDK_PROVIDERS.append(tracer_provider)
    if meters != "none":
        from opentelemetry.sdk.metrics import MeterProvider

        meter_provider = MeterProvider(resource=resource, metric_readers=exporting_readers())
        metrics.set_meter_provider(meter_provider)
        _SDK_PROVIDERS.append(meter_provider)
    return traces != "none"


def exporting_readers() -> list[Any]:
    """New readers for the metrics exporter the environment configures (none: []); a server
    with its own meter provider (the Prometheus reader, discovery/http/metrics.py) adds them
    so its instruments still reach OTLP or the console."""
    meters = _exporter("METRICS")
    if meters == "none":
        return []
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if meters == "console":
        metric_exporter: Any = ConsoleMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        metric_exporter = OTLPMetricExporter()
    return [PeriodicExportingMetricReader(metric_exporter)]


def shutdown() -> None:
    """Flush and stop what ``setup`` installed (last step of the server's shutdown)."""
    while _SDK_PROVIDERS:
        _SDK_PROVIDERS.pop().shutdown()


@dataclass
class Instruments:
    """The server's counters and timers; created after ``setup`` so they bind to its providers."""

    meter: metrics.Meter = field(default_factory=lambda: metrics.get_meter("discovery"))

    def __post_init__(self) -> None:
        m = self.meter
        self.registrations = m.create_counter("discovery.registrations", description="Register calls, by outcome")
        self.deregistrations = m.create_counter("discovery.deregistrations", description="Deregister calls, by outcome")
        self.lookups = m.create_counter("discovery.lookups", description="Resolve calls, by outcome")
        self.register_duration = m.create_histogram("discovery.register.duration", unit="s")
        self.resolve_duration = m.create_histogram("discovery.resolve.duration", unit="s")
        self.watch_streams = m.create_up_down_counter("discovery.watch.streams", description="open Watch streams")
        # Active health checks (docs/health-checks.md), by kind; transitions by state; held
        # by what became of them (refused: another server saw the targets healthy).
        self.checks_run = m.create_counter("discovery.health.checks", description="health probes run, by kind")
        self.check_failures = m.create_counter("discovery.health.failures", description="failed probes, by kind")
        self.check_transitions = m.create_counter(
            "discovery.health.transitions", description="verdicts written, by state"
        )
        self.check_held = m.create_counter(
            "discovery.health.held", description="transitions held as a mass failure, by outcome"
        )

    @staticmethod
    def timed(counter: metrics.Counter, histogram: metrics.Histogram) -> Timed:
        return Timed(counter, histogram)

    def observe_replication(self, origins: Callable[[], Sequence[OriginState]]) -> None:
        """Per-origin replication gauges, read from ``origins()`` (Status's own figures)
        whenever the exporter collects."""

        def gauge(name: str, unit: str, description: str, value: Callable[[OriginState], float]) -> None:
            def observe(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
                return [metrics.Observation(value(o), {"origin": o.origin}) for o in origins()]

            self.meter.create_observable_gauge(name, [observe], unit=unit, description=description)

        gauge("discovery.replication.lag", "s", "how far behind the origin the replicas are", lambda o: o.lag_seconds)
        gauge(
            "discovery.replication.lag_revisions",
            "{revision}",
            "origin revisions not yet applied",
            lambda o: float(o.lag_revisions),
        )
        gauge(
            "discovery.replication.last_contact",
            "s",
            "seconds since the origin was last heard from",
            lambda o: o.last_contact_seconds,
        )
        gauge("discovery.replication.connected", "1", "1 while in contact with the origin", _connected)

    def observe_server(
        self,
        revision: Callable[[], int],
        stale_seconds: Callable[[], float],
        etcd_healthy: Callable[[], bool],
        streams: Callable[[], dict[str, int]],
    ) -> None:
        """The view's revision and staleness (0 while in contact with etcd), etcd's health as
        last probed, and the open streams by kind (``streams()``: {"ads": 3, "events": 1})."""

        def gauge(name: str, unit: str, description: str, value: Callable[[], float]) -> None:
            def observe(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
                return [metrics.Observation(value())]

            self.meter.create_observable_gauge(name, [observe], unit=unit, description=description)

        gauge("discovery.view.revision", "{revision}", "the view's etcd revision", lambda: float(revision()))
        gauge("discovery.view.stale", "s", "seconds the view has been out of contact with etcd", stale_seconds)
        gauge("discovery.etcd.healthy", "1", "1 while the region's etcd answers", lambda: float(etcd_healthy()))

        def open_streams(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            return [metrics.Observation(n, {"kind": kind}) for kind, n in streams().items()]

        self.meter.create_observable_up_down_counter(
            "discovery.streams", [open_streams], description="open ADS and HTTP event streams, by kind"
        )

    def observe_dns(self, totals: Callable[[], Mapping[str, int]], by_rcode: Callable[[], Mapping[str, int]]) -> None:
        """The DNS port's counts (docs/dns.md), read when the exporter collects: ``totals()``
        {"queries": .., "truncated": .., "formerr": .., "dropped": .., "limited": ..,
        "cached": .., "failed": .., "tcp_refused": ..} and answers by response code."""

        def counter(name: str, description: str, key: str) -> None:
            def observe(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
                return [metrics.Observation(totals().get(key, 0))]

            self.meter.create_observable_counter(name, [observe], description=description)

        counter("discovery.dns.queries", "DNS packets received, UDP and TCP", "queries")
        counter("discovery.dns.truncated", "answers sent with TC set (too large for UDP)", "truncated")
        counter("discovery.dns.formerr", "queries answered FORMERR (malformed)", "formerr")
        counter("discovery.dns.dropped", "packets dropped unanswered (not a query, or failed)", "dropped")
        counter("discovery.dns.rate_limited", "queries over their network's or the global rate (UDP, TCP)", "limited")
        counter("discovery.dns.reused", "answers served from the rendered-answer cache", "cached")
        counter("discovery.dns.tcp_refused", "TCP connections refused over the connection bound", "tcp_refused")

        def answers(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            return [metrics.Observation(n, {"rcode": rcode}) for rcode, n in by_rcode().items()]

        self.meter.create_observable_counter("discovery.dns.answers", [answers], description="DNS answers, by rcode")

    def observe_http(self, refused: Callable[[], Mapping[str, int]], slow: Callable[[], Mapping[str, int]]) -> None:
        """Connections the HTTP listeners answered 503 over their connection cap, and those
        closed for a request's headers arriving too slowly, by listener (each callable:
        {"http_listen": n, "metrics_listen": m}; docs/http.md)."""

        def counter(name: str, description: str, counts: Callable[[], Mapping[str, int]]) -> None:
            def observe(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
                return [metrics.Observation(n, {"listener": listener}) for listener, n in counts().items()]

            self.meter.create_observable_counter(name, [observe], description=description)

        counter("discovery.http.connections_refused", "connections answered 503 over the listener's cap", refused)
        counter("discovery.http.slow_headers", "connections closed: a request's headers came too slowly", slow)

    def observe_certificates(self, expiry: Callable[[], float | None], reload_failures: Callable[[], int]) -> None:
        """The serving certificate's remaining validity (``expiry()``: seconds, None without
        TLS) and how many new certificate files were refused, so alerts need no log scraping."""

        def remaining(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            left = expiry()
            return [] if left is None else [metrics.Observation(left)]

        def failures(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            return [metrics.Observation(reload_failures())]

        self.meter.create_observable_gauge(
            "discovery.tls.certificate_expiry",
            [remaining],
            unit="s",
            description="seconds until the certificate expires",
        )
        self.meter.create_observable_counter(
            "discovery.tls.reload_failures",
            [failures],
            description="new certificate files refused (the old stay in use)",
        )


def _connected(origin: OriginState) -> float:
    return 1.0 if origin.connected else 0.0


class Timed:
    """Count and time a call: ``with instruments.timed(counter, histogram) as labels``. The
    body may name its outcome in ``labels``; an exception otherwise counts as "error". A plain
    class, not a generator, because it sits on the Resolve path."""

    __slots__ = ("_counter", "_histogram", "_start", "labels")

    def __init__(self, counter: metrics.Counter, histogram: metrics.Histogram) -> None:
        self._counter, self._histogram = counter, histogram
        self.labels = {"outcome": "ok"}
        self._start = 0.0

    def __enter__(self) -> dict[str, str]:
        self._start = time.perf_counter()
        return self.labels

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and self.labels["outcome"] == "ok":
            self.labels["outcome"] = "error"
        self._histogram.record(time.perf_counter() - self._start, self.labels)
        self._counter.add(1, self.labels)
