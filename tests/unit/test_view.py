"""The view's bookkeeping against a scripted store: where the watch resumes, what a re-list
sends, which resumes get a snapshot, coalescing. The real-etcd behaviour is in
tests/integration/test_watch.py and test_faults.py; these pin down the edge cases that are
hard to time against a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import pytest

from discovery.errors import Compacted, RevisionNotReached, ShuttingDown, StoreUnavailable
from discovery.keys import KeySchema
from discovery.store import Event, KeyValue, WatchBatch
from discovery.view import Changes, Snapshot, Subscription, View, updates
from discovery.view.history import History
from discovery_client import RetryPolicy
from discovery_pb.v1.types_pb2 import Change, Instance
from tests.support.helpers import eventually

KEYS = KeySchema("/unit/")
FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.005)


class ScriptedStore:
    """Holds keys and a revision like etcd; the test feeds the watch what etcd would send."""

    def __init__(self) -> None:
        self.kvs: dict[bytes, KeyValue] = {}
        self.revision = 1
        self.watch_starts: list[int] = []
        self.feed: asyncio.Queue[WatchBatch | Exception] = asyncio.Queue()
        self.progress_requests = 0
        self.raft_term = 1  # one leader throughout
        self.cluster_id = 1
        self.listings = 0

    def put(self, instance_id: str, version: str = "") -> Event:
        self.revision += 1
        key = KEYS.instance("r", "svc", instance_id)
        value = Instance(service="svc", instance_id=instance_id, region="r", version=version).SerializeToString()
        self.kvs[key] = KeyValue(key, value, self.revision, 0)
        return Event(False, self.kvs[key])

    def delete(self, instance_id: str) -> Event:
        self.revision += 1
        key = KEYS.instance("r", "svc", instance_id)
        del self.kvs[key]
        return Event(True, KeyValue(key, b"", self.revision, 0))

    def send(self, *events: Event) -> None:
        self.feed.put_nowait(WatchBatch(events[-1].kv.mod_revision, list(events)))

    async def unchanged_since(self, prefix: bytes, revision: int, count: int, at: int) -> bool:
        current = [kv for key, kv in self.kvs.items() if key.startswith(prefix)]
        return all(kv.mod_revision <= revision for kv in current) and len(current) == count

    async def list_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        self.listings += 1
        return self.revision, [kv for key, kv in sorted(self.kvs.items()) if key.startswith(prefix)]

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncGenerator[WatchBatch, None]:
        self.watch_starts.append(start_revision)
        yield WatchBatch(0, created=True)
        while True:
            item = await self.feed.get()
            if isinstance(item, Exception):
                raise item
            yield item

    def request_progress(self) -> None:
        self.progress_requests += 1


@pytest.fixture
async def running():
    store = ScriptedStore()
    store.put("a")
    store.put("b")
    view = View(store, KEYS, history=100, retry=FAST_RETRY)
    task = asyncio.create_task(view.run())
    async with asyncio.timeout(5):
        await view.ready.wait()
    yield store, view
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def until(condition, timeout: float = 5.0):
    async def probe() -> bool:
        return bool(condition())

    return eventually(probe, timeout=timeout, interval=0.001)


def kinds(changes: list[Change]) -> list[tuple[int, str]]:
    return [(c.kind, c.instance_id) for c in changes]


async def test_the_watch_resumes_after_the_last_event_not_a_requested_progress(running) -> None:
    store, view = running
    assert store.watch_starts == [4] and view.revision == 3
    store.send(store.put("c"))
    await until(lambda: view.revision == 4)
    # etcd before 3.5.8 may answer a progress request ahead of events still due: the answer
    # counts for a waiting read only once etcd confirms nothing changed, and the watch never
    # resumes after it.
    store.revision = 9
    store.feed.put_nowait(WatchBatch(9, requested=True))
    await until(lambda: view._applied.progress == 9)
    assert view.revision == 4
    await view.wait_for(9, timeout=2)
    assert view.revision == 9
    store.feed.put_nowait(StoreUnavailable("etcd went away"))
    await until(lambda: len(store.watch_starts) == 2)
    assert store.watch_starts[-1] == 5
    # etcd's own progress notification is only sent for a watch that has caught up.
    store.feed.put_nowait(WatchBatch(9))
    await until(store.feed.empty)
    store.feed.put_nowait(StoreUnavailable("etcd went away"))
    await until(lambda: len(store.watch_starts) == 3)
    assert store.watch_starts[-1] == 10


async def test_a_progress_answer_ahead_of_its_events_does_not_satisfy_a_read(running) -> None:
    store, view = running
    pending = store.put("late")  # committed in etcd, event not yet sent to the watch
    store.feed.put_nowait(WatchBatch(store.revision, requested=True))
    with pytest.raises(RevisionNotReached):
        await view.wait_for(pending.kv.mod_revision, timeout=0.5)
    assert "late" not in {r.instance.instance_id for r in view.service("svc")}
    store.send(pending)
    await view.wait_for(pending.kv.mod_revision, timeout=2)
    assert "late" in {r.instance.instance_id for r in view.service("svc")}


async def test_stale_while_the_watch_is_down_fresh_once_etcd_answers(running) -> None:
    store, view = running
    assert not view.stale
    view._follower.retry = RetryPolicy(base_delay=0.3, max_delay=0.3, jitter=0)  # long enough to see it stale
    store.feed.put_nowait(StoreUnavailable("etcd went away"))
    await until(lambda: view.stale)
    assert len(store.watch_starts) == 1
    # The view marked itself stale, then a new watch was created: fresh again, with no event.
    await until(lambda: len(store.watch_starts) == 2 and not view.stale)
    assert view.last_error == "etcd went away"
    # Back under the same leader: a recovery (leases may expire now), which the feed reports.
    assert view.recovered_at > 0


async def test_back_under_a_new_leader_is_no_recovery(running) -> None:
    """A new etcd leader extends every lease: nothing expires because of the outage."""
    store, view = running
    view._follower.retry = RetryPolicy(base_delay=0.3, max_delay=0.3, jitter=0)
    store.feed.put_nowait(StoreUnavailable("leader died"))
    await until(lambda: view.stale)
    store.raft_term += 1
    await until(lambda: len(store.watch_starts) == 2 and not view.stale)
    assert view.recovered_at == 0


async def test_an_unexpected_error_marks_the_view_stale_and_relists(running, caplog) -> None:
    store, view = running
    store.feed.put_nowait(ValueError("a bug"))
    await until(lambda: store.listings == 2 and len(store.watch_starts) == 2 and not view.stale)
    assert "a bug" in view.last_error
    assert "unexpected failure" in caplog.text


async def test_a_relist_sends_the_difference_and_resumes_in_between_get_a_snapshot(running) -> None:
    store, view = running
    sub = view.subscribe("")
    before = view.revision
    assert view.changes_since(before, "") == []
    # While the watch is away: a vanishes, b changes, c comes and goes, d appears; then the
    # history is compacted.
    store.delete("a")
    store.put("b", version="2")
    store.put("c")
    store.delete("c")
    store.put("d")
    store.feed.put_nowait(Compacted(store.revision))
    await until(lambda: view.reloads == 1)
    relisted = store.revision
    assert view.revision == relisted
    changes = sub.take()
    assert sorted(kinds(changes)) == [(Change.PUT, "b"), (Change.PUT, "d"), (Change.DELETE, "a")]
    assert {c.revision for c in changes} == {relisted}
    assert store.watch_starts[-1] == relisted + 1
    # A client at the view's old revision gets the difference; one at a revision in between
    # (seen on another server) would miss c's delete: it gets a snapshot.
    assert sorted(kinds(view.changes_since(before, "") or [])) == sorted(kinds(changes))
    for between in range(before + 1, relisted):
        assert view.changes_since(between, "") is None
    assert view.changes_since(relisted, "") == []


async def test_history_holds_the_last_changes_only(running) -> None:
    store, view = running
    view._history = History(3)  # a small history for this test
    revisions = []
    for n in range(5):
        store.send(store.put("a", version=str(n)))
        revisions.append(store.revision)
    await until(lambda: view.revision == revisions[-1])
    assert view.changes_since(revisions[0], "") is None
    assert [c.revision for c in view.changes_since(revisions[1], "") or []] == revisions[2:]
    assert [c.instance.version for c in view.changes_since(revisions[2], "") or []] == ["3", "4"]


async def test_shutdown_ends_waits_and_subscriptions(running) -> None:
    _, view = running
    sub = view.subscribe("svc")
    waiting = asyncio.create_task(view.wait_for(view.revision + 10, timeout=30))
    view.end_subscriptions()
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(waiting, 2)
    assert sub.closed and sub.ready.is_set()
    late = view.subscribe("svc")
    assert late.closed and late.ready.is_set()


def test_subscription_keeps_the_latest_change_per_instance_in_revision_order() -> None:
    sub = Subscription("")
    a, b = ("r", "svc", "a"), ("r", "svc", "b")
    sub.offer(a, Change(kind=Change.PUT, revision=1, instance_id="a"))
    sub.offer(b, Change(kind=Change.PUT, revision=2, instance_id="b"))
    sub.offer(a, Change(kind=Change.DELETE, revision=3, instance_id="a"))
    assert sub.ready.is_set()
    assert [(c.revision, c.instance_id) for c in sub.take()] == [(2, "b"), (3, "a")]
    assert not sub.ready.is_set() and sub.take() == []


async def test_a_new_term_moments_after_coming_back_withdraws_the_recovery(running) -> None:
    """The watched member died: the watch comes back on another member before the election
    (same term), and the new leader's term follows within a second. The recovery is
    withdrawn, so receivers release what they held."""
    store, view = running
    view._follower.retry = RetryPolicy(base_delay=0.05, max_delay=0.05, jitter=0)
    store.feed.put_nowait(StoreUnavailable("member died"))
    await until(lambda: len(store.watch_starts) == 2 and not view.stale)
    assert view.recovered_at > 0  # provisional
    store.raft_term += 1  # the election
    assert view.recovered_at == 0


async def test_the_feed_resumes_from_the_history_then_follows_and_idles(running) -> None:
    store, view = running
    resume_at = view.revision
    store.send(store.put("c"))
    await until(lambda: view.revision == store.revision)
    async with contextlib.aclosing(updates(view, "svc", since=resume_at, idle=0.05)) as batches:
        first = await anext(batches)
        assert isinstance(first, Changes) and first.resumed and kinds(first.changes) == [(Change.PUT, "c")]
        store.send(store.put("d"))
        live = await anext(batches)
        assert isinstance(live, Changes) and not live.resumed and kinds(live.changes) == [(Change.PUT, "d")]
        assert live.revision == store.revision and not live.stale
        idle = await anext(batches)  # nothing for `idle` seconds: an empty batch, for a keep-alive
        assert isinstance(idle, Changes) and idle.changes == [] and not idle.closing


async def test_the_feed_sends_a_snapshot_in_chunks_when_it_cannot_resume(running) -> None:
    store, view = running
    store.send(store.put("c"))
    await until(lambda: view.revision == store.revision)
    for since in (0, -1):  # a fresh reader; one behind the history's floor
        async with contextlib.aclosing(updates(view, "svc", since=since, idle=5, chunk=2)) as batches:
            first = await anext(batches)
            assert isinstance(first, Snapshot) and first.revision == view.revision
            assert [[i.instance_id for i in chunk] for chunk in first.chunks] == [["a", "b"], ["c"]]
    async with contextlib.aclosing(updates(view, "none", since=0, idle=5)) as batches:
        empty = await anext(batches)
        assert isinstance(empty, Snapshot) and empty.chunks == [[]]


async def test_the_feed_ends_at_shutdown_after_a_batch_marked_closing(running) -> None:
    _, view = running
    async with contextlib.aclosing(updates(view, since=None, idle=5)) as batches:
        waiting = asyncio.create_task(anext(batches))
        await asyncio.sleep(0.01)  # subscribed, waiting for a change
        view.end_subscriptions()
        last = await asyncio.wait_for(waiting, 2)
        assert last.closing and last.changes == []
        with pytest.raises(StopAsyncIteration):
            await anext(batches)
    # Started during shutdown: nothing to follow.
    assert [batch async for batch in updates(view, since=None, idle=5)] == []
