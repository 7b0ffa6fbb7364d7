"""The HTTP door (docs/http.md): a JSON read API, Server-Sent Events of changes, Prometheus
``/metrics`` from the server's OpenTelemetry instruments, probes, and a static dashboard at
``/ui/``, served by aiohttp on the server's own event loop with the gRPC door's authorization.

One module per concept: ``door`` (the listeners), ``app`` (routes, errors, headers), ``api``
(services, status, probes), ``events`` (the event stream), ``metrics`` (the Prometheus
reader), ``auth`` (the caller's certificate, the HTTPS context), ``errors`` (the JSON error
shape), ``sources`` (what the door reads of its server); ``static/`` holds the dashboard."""

from discovery.http.door import HttpDoor
from discovery.http.metrics import PrometheusExport
from discovery.http.sources import Sources

__all__ = ["HttpDoor", "PrometheusExport", "Sources"]
