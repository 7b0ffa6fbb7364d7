"""The view's memory (issue 13): records kept compactly (the stored bytes, shared strings and
tag lists, decoded on demand), the change history bounded by bytes, and the first listing
taken in a page at a time (bench/view_memory.py measures the figures)."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncGenerator

import pytest

from discovery.errors import StoreUnavailable
from discovery.keys import InstanceKey
from discovery.store import Event, KeyValue
from discovery.view import Record, View
from discovery.view.history import ENTRY_OVERHEAD, History
from discovery_pb.v1.types_pb2 import Change, Instance, Status
from tests.unit.test_view import FAST_RETRY, KEYS, ScriptedStore

# Field 99, a string "future": what a newer server may write.
FUTURE_FIELD = bytes([0x9A, 0x06, 6]) + b"future"


def value(instance_id: str, service: str = "svc", **fields: object) -> bytes:
    return Instance(
        service=service,
        instance_id=instance_id,
        region="r",
        zone="r-a",
        address="10.0.0.1:80",
        tags=["http", "v2"],
        metadata={"team": "payments", "build": "b1"},
        owner=f"spiffe://discovery.local/svc/{service}",
        status=Status.SERVING,
        **fields,  # type: ignore[arg-type]
    ).SerializeToString()


def kv(instance_id: str, revision: int, data: bytes | None = None, service: str = "svc", lease: int = 0) -> KeyValue:
    return KeyValue(KEYS.instance("r", service, instance_id), data or value(instance_id, service), revision, lease)


def fresh_view(history: int = 100, history_bytes: int = 1 << 20) -> View:
    return View(ScriptedStore(), KEYS, history=history, history_bytes=history_bytes)  # type: ignore[arg-type]


def test_a_record_keeps_the_stored_bytes_and_decodes_on_demand() -> None:
    view = fresh_view()
    data = value("a") + FUTURE_FIELD
    item = kv("a", 2, data)
    view._listed(2, [item])
    record = view.get(InstanceKey("r", "svc", "a"))
    assert record is not None
    assert record.value is item.value  # the listing's bytes, not a copy
    assert not hasattr(record, "__dict__")
    assert (record.region, record.status, record.zone, record.tags, record.mod_revision) == (
        "r",
        Status.SERVING,
        "r-a",
        ("http", "v2"),
        2,
    )
    assert record.owner == "spiffe://discovery.local/svc/svc"
    decoded = record.instance
    assert decoded.metadata["team"] == "payments" and FUTURE_FIELD in decoded.SerializeToString()  # kept
    decoded.version = "changed"  # a copy: the view is not changed through it
    assert record.instance.version == ""
    assert Record(decoded, mod_revision=1, lease=0).instance == decoded  # built from a message (tests, tools)


def test_records_share_their_repeated_strings_and_tag_lists() -> None:
    view = fresh_view()
    view._listed(3, [kv("a", 2), kv("b", 3)])
    a, b = view.get(InstanceKey("r", "svc", "a")), view.get(InstanceKey("r", "svc", "b"))
    assert a is not None and b is not None
    assert a.tags is b.tags and a.owner is b.owner and a.zone is b.zone and a.region is b.region
    keys = list(view._index)
    assert keys[0].service is keys[1].service and keys[0].region is keys[1].region


def test_a_view_keeps_well_under_a_kilobyte_per_instance() -> None:
    n = 3000
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        items = [kv(f"i-{i:05d}", 2 + i, service=f"svc-{i % 100}", lease=1000 + i // 10) for i in range(n)]
        view = fresh_view()
        view._listed(n + 2, items)
        del items
        gc.collect()
        kept = (tracemalloc.get_traced_memory()[0] - base) / n
    finally:
        tracemalloc.stop()
    assert view.instance_count == n
    assert kept < 900, f"{kept:.0f} bytes per instance"  # about 650 today; it was 1,900 with decoded messages


def test_the_history_is_bounded_by_bytes_as_well_as_entries() -> None:
    big = value("a", version="x" * 2000)
    history = History(100, max_bytes=3 * (ENTRY_OVERHEAD + len(big)) + ENTRY_OVERHEAD)
    key = InstanceKey("r", "svc", "a")
    for revision in range(2, 7):
        history.add(revision, key, big)
    assert len(history) == 3 and history.bytes == 3 * (ENTRY_OVERHEAD + len(big))
    assert history.since(2, "") is None  # 3 was dropped for room
    changes = history.since(3, "")
    assert changes is not None and [c.revision for c in changes] == [4, 5, 6]
    assert changes[0].instance == Instance.FromString(big)
    history.add(7, key, None)  # a delete is small
    assert len(history) == 4 and history.since(6, "svc") == history.since(6, "")
    last = history.since(6, "")
    assert last is not None and [(c.kind, c.instance_id, c.HasField("instance")) for c in last] == [
        (Change.DELETE, "a", False)
    ]


def test_the_view_history_holds_compact_changes() -> None:
    view = fresh_view(history=10, history_bytes=1 << 20)
    view._listed(2, [kv("a", 2)])
    view._apply([Event(False, kv("a", 3, value("a", version="2")))], 3)
    view._apply([Event(True, KeyValue(KEYS.instance("r", "svc", "a"), b"", 4, 0))], 4)
    changes = view.changes_since(2, "svc")
    assert changes is not None
    assert [(c.kind, c.revision, c.instance.version) for c in changes] == [(Change.PUT, 3, "2"), (Change.DELETE, 4, "")]
    assert view.changes_since(2, "other") == []


class PagedStore(ScriptedStore):
    """Lists a page at a time; ``fail_after`` pages into the first listing, etcd goes away."""

    def __init__(self, page: int) -> None:
        super().__init__()
        self.page = page
        self.fail_after: int | None = None
        self.pages_seen: list[int] = []

    async def list_pages(self, prefix: bytes) -> AsyncGenerator[tuple[int, list[KeyValue]], None]:
        self.listings += 1
        items = [kv for key, kv in sorted(self.kvs.items()) if key.startswith(prefix)]
        revision = self.revision
        for n, start in enumerate(range(0, max(len(items), 1), self.page)):
            if self.fail_after is not None and n == self.fail_after:
                self.fail_after = None
                raise StoreUnavailable("etcd went away mid-listing")
            self.pages_seen.append(len(items[start : start + self.page]))
            yield revision, items[start : start + self.page]
            await asyncio.sleep(0)


async def test_the_first_listing_is_taken_a_page_at_a_time() -> None:
    store = PagedStore(page=2)
    for name in "abcde":
        store.put(name)
    store.fail_after = 2  # a first attempt brings a and b, c and d, then fails
    view = View(store, KEYS, retry=FAST_RETRY)
    task = asyncio.create_task(view.run())
    try:
        await asyncio.sleep(0)  # the first attempt has read its first page
        assert store.listings == 1 and not view.ready.is_set()
        # Before the second attempt: "a" goes, "f" comes.
        store.delete("a")
        store.put("f")
        async with asyncio.timeout(5):
            await view.ready.wait()
        assert sorted(k.instance_id for k in view._index) == ["b", "c", "d", "e", "f"]
        assert view.revision == store.revision
        assert store.listings == 2 and store.pages_seen == [2, 2, 2, 2, 1]
        assert view.changes_since(view.revision, "") == []
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
