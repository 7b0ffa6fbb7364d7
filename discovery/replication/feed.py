"""What the replicator needs from the network: one origin server's feed after a revision.

The loop (``replicator``) asks a ``Feed`` for an origin server's messages after the revision
it has applied, and sees every way that can fail as ``FeedLost``, on which it moves on to the
origin's next server; it knows nothing of gRPC (``transport.GrpcFeed`` does).

The messages are the feed's own protobuf (``StreamResponse``), passed on as they arrive: a
conversion into other objects would cost CPU for every change, on the path whose CPU per
change bounds how many changes a region can take in.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from discovery_pb.v1.replication_pb2 import StreamResponse


class FeedLost(Exception):
    """The feed from one origin server failed, ended or went silent (the message says which)."""


class Feed(Protocol):
    def follow(self, endpoint: str, since: int, cluster_id: int) -> AsyncGenerator[StreamResponse, None]:
        """The origin's messages from the server at ``endpoint``: its changes after revision
        ``since`` of etcd cluster ``cluster_id``, or a snapshot first when it must (``since``
        0 asks for one), then heartbeats while it has nothing. Ends only by raising
        ``FeedLost``, or by the caller closing it (``aclose``), which ends the call at once."""
        ...
