"""xds-protos ships its own, years-old copy of the ``opentelemetry.proto`` modules (grpc/grpc
issue 42926) and pip installs it after opentelemetry-proto, overwriting that package's files:
the OTLP exporters then fail to import (``InstrumentationScope``), so ``OTEL_*_EXPORTER=otlp``
would break at start-up. The install must reinstall opentelemetry-proto afterwards (see the
Makefile); this test fails when it did not."""

from __future__ import annotations


def test_xds_protos_left_the_otlp_exporters_importable() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    assert OTLPSpanExporter and OTLPMetricExporter and InstrumentationScope


def test_our_xds_modules_do_not_load_the_opentelemetry_protos() -> None:
    """Whichever copy of those files won, xDS does not depend on it."""
    import subprocess
    import sys

    code = "import sys, discovery.xds; print(any(m.startswith('opentelemetry.proto') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
