"""The generated stubs in clients/python/discovery_pb/ must match proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"clients/python/discovery_pb/ is stale:\n{result.stderr}"


def test_client_stubs_need_no_server_dependencies() -> None:
    code = (
        "import sys, discovery_pb.v1.lookup_pb2_grpc, discovery_pb.v1.registry_pb2_grpc;"
        "bad = [m for m in ('etcd3aio', 'opentelemetry', 'discovery.server') if m in sys.modules];"
        "sys.exit(repr(bad) if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
