"""Asynchronous pull replication between regions (docs/replication.md).

Session               one election lease per server, kept alive (lease.py)
Election, Fence       one elected replicator per origin, its writes fenced (election.py)
Replicator            streams an origin's records into the local etcd while leading
Feed, FeedLost        what the replicator asks of the network: an origin's feed after a revision
                      (feed.py; over gRPC in transport.py, the one module here that imports grpc)
DeletionHold          when an origin's deletions are held after it says it recovered (hold.py)
ReplicaWriter         fenced transactions: changes with their checkpoint, snapshots, held deletions
RegionStates          per-region freshness from the checkpoints in the view (Resolve, Status), as
                      plain data (Freshness, OriginState)
StallMonitor          when this process did not run, so its own freeze is not taken for the origin's
"""

from discovery.replication.election import Election, Fence
from discovery.replication.feed import Feed, FeedLost
from discovery.replication.hold import DeletionHold
from discovery.replication.lease import Session
from discovery.replication.replicator import ReplicationSettings, Replicator
from discovery.replication.stalls import StallMonitor
from discovery.replication.state import Freshness, OriginState, RegionStates
from discovery.replication.writer import ReplicaWriter

__all__ = [
    "DeletionHold",
    "Election",
    "Feed",
    "FeedLost",
    "Fence",
    "Freshness",
    "OriginState",
    "RegionStates",
    "ReplicaWriter",
    "ReplicationSettings",
    "Replicator",
    "Session",
    "StallMonitor",
]
