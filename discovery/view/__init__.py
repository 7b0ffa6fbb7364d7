"""The in-memory view of the region's keys, one module per concept: ``view`` composes them
into ``View``; ``follow`` (the etcd list-then-watch loop), ``index`` (instances),
``meta`` (checkpoints, election keys), ``history`` (recent changes), ``subscriptions``
(fan-out to watchers), ``revision`` (read-your-writes) and ``recovery`` (raft-term recovery
detection). ``feed`` is how a reader (Watch, Replication.Stream, the xDS hub) follows it."""

from discovery.view.feed import SNAPSHOT_CHUNK, Changes, Snapshot, updates
from discovery.view.follow import WatchSource
from discovery.view.index import Record
from discovery.view.recovery import RECOVERY_CONFIRM_SECONDS
from discovery.view.subscriptions import Subscription
from discovery.view.view import View, ViewSource

__all__ = [
    "RECOVERY_CONFIRM_SECONDS",
    "SNAPSHOT_CHUNK",
    "Changes",
    "Record",
    "Snapshot",
    "Subscription",
    "View",
    "ViewSource",
    "WatchSource",
    "updates",
]
