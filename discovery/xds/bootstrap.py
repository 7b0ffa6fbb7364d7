"""The bootstrap a stock gRPC client reads (GRPC_XDS_BOOTSTRAP) to find us."""

from __future__ import annotations

from typing import Any

DEFAULT_NODE_ID = "discovery-xds-client"


def bootstrap(server: str, region: str = "", node_id: str = DEFAULT_NODE_ID) -> dict[str, Any]:
    """A bootstrap pointing gRPC's xDS client at ``server`` (HOST:PORT, plaintext).

    ``region`` becomes ``node.locality.region``: the server then puts that region's instances
    at priority 0 instead of its own. Without it the server's region comes first. The node id
    need not be unique: many processes share one bootstrap, and the server tells their
    streams apart by peer address (CSDS shows both).

    ``ignore_resource_deletion`` is left out on purpose: the server always sends the full
    set of Listeners and Clusters, so a missing one really is gone.
    """
    node: dict[str, Any] = {"id": node_id}
    if region:
        node["locality"] = {"region": region}
    return {
        "xds_servers": [
            {
                "server_uri": server,
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": node,
    }
