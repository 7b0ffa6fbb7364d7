"""``discovery xds-bootstrap`` and ``discovery xds-clients``: stock gRPC clients (xDS)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from discovery.cli._common import (
    DEFAULT_SERVER,
    OK,
    add_client_flags,
    add_tls_flags,
    add_verb,
    channel,
    print_json,
    print_table,
    rpc_error,
    tls_settings,
)
from discovery.model import split_address, validate_region
from discovery.xds.bootstrap import DEFAULT_NODE_ID, bootstrap
from discovery_client import ConfigError, TlsConfig

BOOTSTRAP_EPILOG = """examples:
  discovery xds-bootstrap > /etc/xds-bootstrap.json
  discovery xds-bootstrap --server 10.0.0.5:7400 --region eu-west \\
      > bootstrap.json
  # uses grpc.insecure_channel("xds:///web")
  GRPC_XDS_BOOTSTRAP=bootstrap.json python my_client.py

With TLS settings (flags or DISCOVERY_TLS_*) the clients reach the server with
mTLS: the bootstrap names the CA, certificate and key files (absolute paths),
which gRPC re-reads every 60 s, so rotating them on disk needs no restart.
With --insecure it is plaintext. ("insecure_channel" above is the channel to
the service's endpoints, not to the server.)

--region puts that region's instances first (priority 0); without it the
server's own region comes first. Then the server's peer regions follow in its
proximity order."""

CLIENTS_EPILOG = """examples:
  discovery xds-clients
  discovery xds-clients --server 127.0.0.1:7401 --json

One row per resource per connected ADS stream. client: ACKED, NACKED,
REQUESTED (nothing answered yet) or DOES_NOT_EXIST; sync: SYNCED (the client
ACKed the latest version sent), STALE (it has not answered the latest yet),
ERROR (it NACKed the latest) or NOT_SENT."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = add_verb(
        sub,
        "xds-bootstrap",
        help="print the bootstrap JSON a stock gRPC client reads from GRPC_XDS_BOOTSTRAP",
        epilog=BOOTSTRAP_EPILOG,
    )
    b.add_argument(
        "--server",
        default=os.environ.get("DISCOVERY_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help="the discovery server clients should use (default: $DISCOVERY_SERVER or %(default)s)",
    )
    b.add_argument("--region", default="", help="the clients' region: its instances come first")
    b.add_argument("--node-id", default=DEFAULT_NODE_ID, help="node id the clients report (default: %(default)s)")
    add_tls_flags(b)
    b.set_defaults(func=xds_bootstrap)

    c = add_verb(
        sub,
        "xds-clients",
        help="what each connected xDS client was sent, ACKed and NACKed (from the server's CSDS)",
        description="What each connected xDS client was sent, ACKed and NACKed\n(from the server's CSDS).",
        epilog=CLIENTS_EPILOG,
    )
    add_client_flags(c)
    c.set_defaults(func=xds_clients)


async def xds_bootstrap(args: argparse.Namespace) -> int:
    split_address(args.server, "--server")
    if args.region:
        validate_region(args.region, "--region")
    config = bootstrap(args.server, region=args.region, node_id=args.node_id)
    creds = channel_creds(tls_settings(args))
    for server in config["xds_servers"]:
        server["channel_creds"] = creds
    print(json.dumps(config, indent=2))
    return OK


# How often gRPC's xDS client re-reads the certificate files (its file watcher plugin).
REFRESH_INTERVAL = "60s"


def channel_creds(tls: TlsConfig) -> list[dict[str, Any]]:
    """The bootstrap's ``channel_creds`` for these settings: gRPC's ``tls`` type with the
    files (absolute: the bootstrap is read from another directory), or ``insecure``."""
    if tls.insecure:
        return [{"type": "insecure"}]
    if tls.server_name:
        raise ConfigError(
            "an xDS bootstrap cannot carry a TLS server name: give --server as a name in the "
            "server's certificate instead of --tls-server-name / DISCOVERY_TLS_SERVER_NAME"
        )
    files = {"ca_certificate_file": tls.ca, "certificate_file": tls.cert, "private_key_file": tls.key}
    config: dict[str, Any] = {key: str(Path(path).resolve()) for key, path in files.items() if path}
    config["refresh_interval"] = REFRESH_INTERVAL
    return [{"type": "tls", "config": config}]


async def xds_clients(args: argparse.Namespace) -> int:
    from envoy.service.status.v3.csds_pb2 import ClientStatusRequest
    from envoy.service.status.v3.csds_pb2_grpc import ClientStatusDiscoveryServiceStub

    async with channel(args) as ch:
        try:
            response = await ClientStatusDiscoveryServiceStub(ch).FetchClientStatus(
                ClientStatusRequest(exclude_resource_contents=True), timeout=args.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, args.server) from None
    rows = [_row(config, item) for config in response.config for item in config.generic_xds_configs]
    if args.json:
        print_json([dict(zip(_HEADER, row, strict=True)) for row in rows])
    else:
        print_table(list(_HEADER), rows)
    return OK


_HEADER = ("stream", "node", "peer", "type", "name", "version", "client", "sync", "error")


def _row(config: object, item: object) -> list[str]:
    from envoy.admin.v3.config_dump_shared_pb2 import ClientResourceStatus
    from envoy.service.status.v3.csds_pb2 import ConfigStatus

    node = config.node  # type: ignore[attr-defined]
    fields = node.metadata.fields
    return [
        str(int(fields["discovery.stream"].number_value)) if "discovery.stream" in fields else "",
        node.id,
        fields["discovery.peer"].string_value if "discovery.peer" in fields else "",
        item.type_url.rsplit(".", 1)[-1],  # type: ignore[attr-defined]
        item.name,  # type: ignore[attr-defined]
        item.version_info,  # type: ignore[attr-defined]
        ClientResourceStatus.Name(item.client_status),  # type: ignore[attr-defined]
        ConfigStatus.Name(item.config_status),  # type: ignore[attr-defined]
        item.error_state.details[:120],  # type: ignore[attr-defined]
    ]
