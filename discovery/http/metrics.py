"""``/metrics``: the server's OpenTelemetry instruments (discovery/telemetry.py) read through
OpenTelemetry's Prometheus reader, so there is one instrumentation and two ways out of it.

Each server gets a meter provider and a Prometheus registry of its own rather than the global
ones: several servers in one process (tests, benches) must not report each other's figures,
and the replication gauges of two servers carry the same ``origin`` labels. The exporters the
environment configures (OTLP, console) are added to that provider, so turning HTTP on loses
none of them.
"""

from __future__ import annotations

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from discovery import telemetry

CONTENT_TYPE = CONTENT_TYPE_LATEST


class PrometheusExport:
    """The meter the server's ``Instruments`` bind to, and the text a scrape returns."""

    def __init__(self, region: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        # Without the otel_scope_* labels: one meter, so they would only repeat "discovery".
        reader = PrometheusMetricReader(registry=self.registry, scope_info_enabled=False)
        self._provider = MeterProvider(
            resource=Resource.create({"service.name": "discovery", "cloud.region": region}),
            metric_readers=[reader, *telemetry.exporting_readers()],
        )
        self.meter: metrics.Meter = self._provider.get_meter("discovery")

    def render(self) -> bytes:
        """The Prometheus text exposition of every instrument now. Observable gauges' callbacks
        run here, on the event loop: they read the server's state in memory and never wait."""
        data: bytes = generate_latest(self.registry)
        return data

    def shutdown(self) -> None:
        self._provider.shutdown()
