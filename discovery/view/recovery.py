"""Recovery detection: whether the view came back from losing etcd under the same raft term,
when leases whose TTL ran out during the outage expire before their holders can renew them.
Replication receivers hold this region's deletions for a while after such a recovery
(docs/replication.md)."""

from __future__ import annotations

import time
from typing import Protocol

# A recovery is withdrawn if etcd's term changes within this long of it: election timeout
# (1 s) and the server's health probe (every 2 s) that reads the term in a quiet cluster.
RECOVERY_CONFIRM_SECONDS = 3.5


class TermSource(Protocol):
    @property
    def raft_term(self) -> int:
        """etcd's raft term in the last answer from it."""
        ...


class Recovery:
    def __init__(self, source: TermSource) -> None:
        self._source = source
        self._back_at = 0.0  # time.monotonic() of the last recovery (see at); 0: none
        self._back_term = 0  # etcd's raft term then
        self._confirmed_at = 0.0  # the last recovery past its provisional seconds
        self._term_at_loss = 0  # etcd's raft term when the watch was lost; 0: not lost

    def lost(self) -> None:
        self._term_at_loss = self._source.raft_term

    def back(self) -> None:
        """Back after losing etcd, under the same leader (the same raft term): etcd may have
        been frozen or cut off, and leases whose TTL ran out meanwhile expire now. Under a
        new leader (a leader died, etcd restarted) every lease was extended, so nothing
        expires because of the outage: no recovery. Neither is the first start, nor a loss
        at startup."""
        lost, self._term_at_loss = self._term_at_loss, 0
        if lost and self._source.raft_term == lost:
            self._back_at, self._back_term = time.monotonic(), lost

    @property
    def at(self) -> float:
        """time.monotonic() of the last recovery; 0: none.

        Provisional for its first seconds: when the watched member died, the watch comes back
        on another member before the others have even noticed (same term), and the election
        follows within about a second. A new term seen in that window withdraws the recovery
        (the new leader extended every lease); the feed then reports none, and receivers
        release what they held."""
        if self._back_at and self._source.raft_term != self._back_term:
            if time.monotonic() - self._back_at < RECOVERY_CONFIRM_SECONDS:
                self._back_at = self._confirmed_at
            else:
                self._confirmed_at = self._back_at
        return self._back_at
