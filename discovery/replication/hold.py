"""When to hold an origin's deletions: the receiving side of the recovery signal.

An origin that comes back from being impaired itself (its process frozen, its etcd lost under
the same etcd leader) loses the leases whose TTL ran out meanwhile, and their instances
register again a moment later. Every feed message says when its server last came back
(``recovered_at_ms``); within the resume grace of that moment the replicator holds the
origin's deletions, so the re-registrations supersede them instead of every other region
flapping those instances out and back in (docs/replication.md). The writer keeps what is held;
this decides until when, and when to let everything go.
"""

from __future__ import annotations

import logging
import time

from discovery.replication.writer import now_ms

log = logging.getLogger(__name__)


class DeletionHold:
    """The hold for one origin's deletions, fed with every message from the origin."""

    def __init__(self, origin: str, grace: float) -> None:
        self._origin = origin
        self._grace = grace
        self.until = 0.0  # time.monotonic(): deletions arriving before then are held
        # The same moment on the wall clock, for the checkpoint: a new leader keeps holding.
        self.until_ms = 0
        self._reported = 0  # recovered_at_ms of the origin's previous message
        self._release_all = False  # the origin withdrew its recovery: release what is held

    def resume(self, until_ms: int) -> None:
        """Take over the hold a previous leader recorded in the checkpoint: the grace is the
        origin's, not this leader's."""
        left = (until_ms - now_ms()) / 1000
        self.until = time.monotonic() + left if left > 0 else 0.0
        self.until_ms = until_ms

    def new_source(self) -> None:
        """The feed moves to another server of the origin: a withdrawal is one server's word
        about its own earlier report, so the last report is forgotten."""
        self._reported = 0

    def holding(self) -> bool:
        return time.monotonic() < self.until

    def note(self, time_ms: int, recovered_at_ms: int) -> None:
        """A message the origin sent at ``time_ms`` (its clock) saying it came back from being
        impaired at ``recovered_at_ms`` (0: not lately). Less than the grace ago: hold its
        deletions until the grace has passed since then; they may be its leases expiring on
        waking. The age is measured on the origin's clock alone, so clock skew does not
        matter."""
        reported, self._reported = self._reported, recovered_at_ms
        if not recovered_at_ms or self._grace <= 0:
            if reported and not recovered_at_ms and time.monotonic() < self.until:
                # The origin withdrew the recovery it reported (its etcd elected a new leader,
                # which extended every lease): what it deletes is genuine.
                log.info("replicator %s: the origin withdrew its recovery; applying held deletions", self._origin)
                self.until, self.until_ms, self._release_all = 0.0, 0, True
            return
        # Clamped: a clock the origin stepped between the two readings cannot stretch the hold.
        left = min(self._grace, self._grace - (time_ms - recovered_at_ms) / 1000)
        if left <= 0:
            return
        now = time.monotonic()
        if now >= self.until:
            log.warning(
                "replicator %s: the origin came back %.1fs ago (frozen, or its etcd lost); "
                "its deletions wait up to %.1fs for re-registrations",
                self._origin,
                self._grace - left,
                left,
            )
        self.until = max(self.until, now + left)
        self.until_ms = max(self.until_ms, now_ms() + int(left * 1000))

    def release_after(self) -> float:
        """How long a held deletion must have waited to be applied now: the grace (each one
        waits that long at most, however often the origin comes and goes), or nothing once
        the origin has withdrawn its recovery. The withdrawal is used up by asking."""
        held_for = 0.0 if self._release_all else self._grace
        self._release_all = False
        return held_for
