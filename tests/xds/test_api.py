"""The public surface of discovery.xds: what ``__all__`` names exists, nothing private leaks."""

from __future__ import annotations

from discovery import xds


def test_all_names_exist_and_are_public() -> None:
    assert sorted(set(xds.__all__)) == sorted(xds.__all__)
    for name in xds.__all__:
        assert not name.startswith("_") and getattr(xds, name) is not None
    assert xds.SERVICE_NAMES == (
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        "envoy.service.status.v3.ClientStatusDiscoveryService",
    )
