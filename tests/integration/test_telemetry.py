"""OpenTelemetry end to end: a served process with console exporters prints gRPC spans and our
metrics when it shuts down (exporters flush on SIGTERM)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from discovery.devtools.etcd import EtcdProcess
from discovery.devtools.process import free_port
from tests.integration.test_cli import run
from tests.support.helpers import eventually


async def test_console_exporters_show_spans_and_metrics(private_etcd: EtcdProcess) -> None:
    port = free_port()
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "console"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "discovery", "serve", "--insecure", "--region", "us-east",
        "--listen", f"127.0.0.1:{port}", "--etcd", private_etcd.endpoint,
        "--peer", f"eu-west=127.0.0.1:{free_port()}",  # unreachable: its gauges say so
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        server = ("--server", f"127.0.0.1:{port}")

        async def up() -> bool:
            return (await run("status", *server, "--timeout", "1"))[0] == 0

        await eventually(up, timeout=20, interval=0.2)
        assert (await run("register", "web", "10.0.0.1:80", *server))[0] == 0
        assert (await run("resolve", "web", *server))[0] == 0
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            out, err = await proc.communicate()
        text = out.decode()
        assert proc.returncode == 0, err.decode()
        assert "/discovery.v1.Lookup/Resolve" in text and "/discovery.v1.Registry/Register" in text
        assert "discovery.lookups" in text and "discovery.registrations" in text
        assert "discovery.resolve.duration" in text
        assert "discovery.replication.connected" in text and '"origin": "eu-west"' in text
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_no_exporter_configured_means_no_sdk() -> None:
    code = (
        "import os, sys;"
        "[os.environ.pop(k) for k in list(os.environ) if k.startswith('OTEL_')];"
        "from discovery import telemetry;"
        "assert telemetry.setup('discovery', 'us-east') is False;"
        "sys.exit(1 if telemetry._SDK_PROVIDERS else 0)"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    async with asyncio.timeout(20):
        assert await proc.wait() == 0
