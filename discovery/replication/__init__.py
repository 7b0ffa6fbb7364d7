"""Asynchronous pull replication between regions (docs/replication.md).

Session, Election     one lease per server; one elected replicator per origin, fenced
Replicator            streams an origin's records into the local etcd while leading
ReplicaWriter         fenced transactions: changes with their checkpoint, snapshots, held deletions
RegionStates          per-region freshness from the checkpoints in the view (Resolve, Status)
StallMonitor          when this process did not run, so its own freeze is not taken for the origin's
"""

from discovery.replication.replicator import ReplicationSettings, Replicator
from discovery.replication.session import Election, Fence, Session
from discovery.replication.stalls import StallMonitor
from discovery.replication.state import Freshness, RegionStates
from discovery.replication.writer import ReplicaWriter

__all__ = [
    "Election",
    "Fence",
    "Freshness",
    "RegionStates",
    "ReplicaWriter",
    "ReplicationSettings",
    "Replicator",
    "Session",
    "StallMonitor",
]
