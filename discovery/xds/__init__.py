"""xDS for stock gRPC clients: ``xds:///SERVICE`` resolved from the view (docs/xds.md).

Layers: ``resources`` (pure: records to Listener, RouteConfiguration, Cluster and
ClusterLoadAssignment), ``hub`` (one view subscription; builds each change once and marks the
streams that want it), ``stream`` (one ADS stream's protocol state, without gRPC), ``ads`` and
``csds`` (the gRPC adapters), ``bootstrap`` (what a client reads to find us). Decisions:
docs/xds.md.
"""

from discovery.xds.ads import SERVICE_NAME as ADS_SERVICE_NAME
from discovery.xds.ads import AdsServicer
from discovery.xds.ads import add_to_server as add_ads_to_server
from discovery.xds.bootstrap import DEFAULT_NODE_ID, bootstrap
from discovery.xds.csds import SERVICE_NAME as CSDS_SERVICE_NAME
from discovery.xds.csds import CsdsServicer, client_config
from discovery.xds.csds import add_to_server as add_csds_to_server
from discovery.xds.hub import Builder, Built, XdsHub
from discovery.xds.resources import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    METADATA_KEY,
    ROUTE,
    TYPE_URLS,
    cluster,
    health,
    listener,
    load_assignment,
    region_order,
    route_configuration,
)
from discovery.xds.stream import StreamState

SERVICE_NAMES = (ADS_SERVICE_NAME, CSDS_SERVICE_NAME)

__all__ = [
    "ADS_SERVICE_NAME",
    "CLUSTER",
    "CSDS_SERVICE_NAME",
    "DEFAULT_NODE_ID",
    "ENDPOINTS",
    "LISTENER",
    "METADATA_KEY",
    "ROUTE",
    "SERVICE_NAMES",
    "TYPE_URLS",
    "AdsServicer",
    "Builder",
    "Built",
    "CsdsServicer",
    "StreamState",
    "XdsHub",
    "add_ads_to_server",
    "add_csds_to_server",
    "bootstrap",
    "client_config",
    "cluster",
    "health",
    "listener",
    "load_assignment",
    "region_order",
    "route_configuration",
]
