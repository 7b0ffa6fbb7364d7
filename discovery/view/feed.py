"""The feed: what one reader of the view receives, in order, whatever protocol carries it.
Watch, Replication.Stream and the xDS hub all read the view through it.

A resuming reader first gets what it missed: the changes after its revision from the
history, or the current state as a snapshot in chunks when that revision is 0 or no longer
covered. Then every batch of changes as it comes, coalesced per instance, and an empty batch
when nothing came for ``idle`` seconds, which the carrier turns into a keep-alive or
heartbeat. At shutdown the feed ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import overload

from discovery.view.view import View
from discovery_pb.v1.types_pb2 import Change, Instance

SNAPSHOT_CHUNK = 500  # instances per snapshot message: far below gRPC's 1 MiB message limit


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every instance the reader follows, at ``revision``."""

    revision: int
    stale: bool
    chunks: list[list[Instance]]  # one message each; an empty state is one empty chunk


@dataclass(frozen=True, slots=True)
class Changes:
    """Changes up to ``revision``; none: the reader has been idle for ``idle`` seconds."""

    revision: int
    stale: bool
    changes: list[Change]
    # From the history at the reader's resume revision, not from the subscription: some
    # carriers send it even when it is empty, because it tells the reader where it stands.
    resumed: bool = False
    # Taken as the view shut down; the feed ends after it. A stream ends without sending it
    # (the shutdown status follows), the xDS hub still pushes it to its streams.
    closing: bool = False


@overload
def updates(
    view: View, service: str = "", region: str = "", *, since: int, idle: float, chunk: int = SNAPSHOT_CHUNK
) -> AsyncGenerator[Snapshot | Changes, None]: ...


@overload
def updates(
    view: View, service: str = "", region: str = "", *, since: None, idle: float, chunk: int = SNAPSHOT_CHUNK
) -> AsyncGenerator[Changes, None]: ...


async def updates(
    view: View,
    service: str = "",
    region: str = "",
    *,
    since: int | None,
    idle: float,
    chunk: int = SNAPSHOT_CHUNK,
) -> AsyncGenerator[Snapshot | Changes, None]:
    """The feed of ``service`` ("": every service) of ``region`` ("": every region), resuming
    after revision ``since`` (0: a snapshot first; None: no catch-up, only what changes from
    now on)."""
    # Subscribe and read the history with no await in between: every change is then either
    # in what is sent first or in the subscription, never both, never neither.
    sub = view.subscribe(service, region)
    try:
        if since is not None:
            changes = view.changes_since(since, service, region) if since else None
            revision, stale = view.revision, view.stale
            if changes is None:
                yield Snapshot(revision, stale, _chunks(view.snapshot(service, region), chunk))
            else:
                yield Changes(revision, stale, changes, resumed=True)
        while not sub.closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle):
                    await sub.ready.wait()
            # Taken after the wait: whatever piled up while the reader was busy (blocked in a
            # write) is coalesced to the latest state per instance.
            yield Changes(view.revision, view.stale, sub.take(), closing=sub.closed)
    finally:
        view.unsubscribe(sub)


def _chunks(instances: list[Instance], size: int) -> list[list[Instance]]:
    return [instances[i : i + size] for i in range(0, len(instances), size)] or [[]]
