"""``discovery status`` as a person reads it: every line within 80 columns."""

from __future__ import annotations

import pytest

from discovery.cli.status import print_status
from discovery_pb.v1.admin_pb2 import EtcdStatus, HealthCheckerStatus, OriginStatus, StatusResponse


def test_status_fits_80_columns_with_three_regions_and_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    origins = [
        OriginStatus(
            origin=name,
            connected=connected,
            leader="255.255.255.255:65535",
            source="255.255.255.254:65535",
            checkpoint_revision=123_456_789,
            lag_revisions=12_345,
            lag_seconds=1234.5,
            last_contact_seconds=1234.5,
            replicas=100_000,
            warning="stale-after 1.0 s is under 3 of the origin's heartbeat periods (0.5 s): raise it",
        )
        for name, connected in (("eu-west", True), ("ap-southeast", False))
    ]
    print_status(
        StatusResponse(
            region="us-east",
            revision=123_456_789,
            instance_count=100_000,
            service_count=2_000,
            etcd=EtcdStatus(endpoints=["127.0.0.1:2379"], healthy=True),
            server_version="0.1.0",
            uptime_seconds=86_400,
            health_checks=HealthCheckerStatus(),
            origins=origins,
        )
    )
    out = capsys.readouterr().out
    assert "255.255.255.255:65535" in out and "DISCONNECTED" in out and "warning: eu-west" in out
    assert max(map(len, out.splitlines())) <= 80, out
