"""GroupCommit's scheduling, on a fake ``send`` (pure logic; the store's use of it against a
real etcd is tests/integration/test_group_commit.py)."""

from __future__ import annotations

import asyncio

import pytest

from discovery.groupcommit import GroupCommit, Retry


class Recorder:
    """A ``send`` that records its batches and answers each item with ``answer(item)``; it can
    be held (a slow etcd) until released."""

    def __init__(self, answer: object = None) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.arrived = asyncio.Event()  # a batch has been sent
        self.answer = answer

    async def __call__(self, items: list[str]) -> list[object]:
        self.batches.append(list(items))
        self.arrived.set()
        await self.release.wait()
        if callable(self.answer):
            return [self.answer(i) for i in items]
        return [f"done {i}" for i in items]


async def test_concurrent_items_go_in_one_batch_and_each_gets_its_own_result() -> None:
    send = Recorder()
    commit: GroupCommit[str, str] = GroupCommit(send, key=lambda i: i)
    async with asyncio.timeout(5):
        results = await asyncio.gather(*(commit.submit(f"k{n}") for n in range(10)))
    assert results == [f"done k{n}" for n in range(10)]
    assert send.batches == [[f"k{n}" for n in range(10)]]


async def test_a_busy_commit_gathers_what_arrives_meanwhile() -> None:
    """While the first batch is at etcd (one batch in flight at most), later items wait and go
    together in the next one."""
    send = Recorder()
    send.release.clear()
    commit: GroupCommit[str, str] = GroupCommit(send, key=lambda i: i, max_in_flight=1)
    async with asyncio.timeout(5):
        first = asyncio.ensure_future(commit.submit("a"))
        await send.arrived.wait()
        later = [asyncio.ensure_future(commit.submit(k)) for k in ("b", "c", "d")]
        await asyncio.sleep(0.01)  # nothing may go while the only slot is taken
        assert send.batches == [["a"]]
        send.release.set()
        await asyncio.gather(first, *later)
    assert send.batches == [["a"], ["b", "c", "d"]]


async def test_items_of_one_key_never_share_a_batch_and_keep_their_order() -> None:
    send = Recorder()
    commit: GroupCommit[tuple[str, int], str] = GroupCommit(
        send,  # type: ignore[arg-type]
        key=lambda i: i[0],
    )
    async with asyncio.timeout(5):
        await asyncio.gather(*(commit.submit(item) for item in [("x", 1), ("y", 1), ("x", 2), ("x", 3)]))
    assert send.batches == [[("x", 1), ("y", 1)], [("x", 2)], [("x", 3)]]


async def test_batches_are_bounded_by_count_and_by_weight() -> None:
    send = Recorder()
    commit: GroupCommit[str, str] = GroupCommit(send, key=lambda i: i, weight=len, max_batch=3, max_weight=10)
    items = ["a" * 4, "b" * 4, "c" * 4, "d", "e", "f", "g", "h" * 20]
    async with asyncio.timeout(5):
        await asyncio.gather(*(commit.submit(i) for i in items))
    sent = [i for batch in send.batches for i in batch]
    assert sorted(sent) == sorted(items)
    for batch in send.batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or sum(map(len, batch)) <= 10  # the 20-long one goes alone


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_still_goes() -> None:
    calls = 0

    async def send(items: list[str]) -> list[object]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("etcd is gone")
        return [f"done {i}" for i in items]

    commit: GroupCommit[str, str] = GroupCommit(send, key=lambda i: i)
    async with asyncio.timeout(5):
        failed = await asyncio.gather(*(commit.submit(k) for k in ("a", "b")), return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in failed)
        assert await commit.submit("c") == "done c"


async def test_retry_sends_an_item_again_and_an_exception_reaches_only_its_caller() -> None:
    tries: dict[str, int] = {}

    def answer(item: str) -> object:
        tries[item] = tries.get(item, 0) + 1
        if item == "bad":
            return ValueError("bad item")
        if item == "again" and tries[item] == 1:
            return Retry()
        return f"done {item}"

    send = Recorder(answer)
    commit: GroupCommit[str, str] = GroupCommit(send, key=lambda i: i)
    async with asyncio.timeout(5):
        results = await asyncio.gather(*(commit.submit(k) for k in ("ok", "bad", "again")), return_exceptions=True)
    assert results[0] == "done ok"
    assert isinstance(results[1], ValueError)
    assert results[2] == "done again"
    assert tries == {"ok": 1, "bad": 1, "again": 2}


async def test_a_caller_that_gave_up_before_its_batch_went_is_never_sent() -> None:
    send = Recorder()
    send.release.clear()
    commit: GroupCommit[str, str] = GroupCommit(send, key=lambda i: i, max_in_flight=1)
    async with asyncio.timeout(5):
        first = asyncio.ensure_future(commit.submit("a"))
        await send.arrived.wait()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await commit.submit("abandoned")
        kept = asyncio.ensure_future(commit.submit("kept"))
        send.release.set()
        await asyncio.gather(first, kept)
    assert send.batches == [["a"], ["kept"]]


async def test_close_fails_what_waits() -> None:
    send = Recorder()
    send.release.clear()
    commit: GroupCommit[str, str] = GroupCommit(send, key=lambda i: i, max_in_flight=1)
    async with asyncio.timeout(5):
        first = asyncio.ensure_future(commit.submit("a"))
        await send.arrived.wait()
        waiting = asyncio.ensure_future(commit.submit("b"))
        await asyncio.sleep(0)
        await commit.close()
        for future in (first, waiting):
            with pytest.raises(asyncio.CancelledError):
                await future


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommit(Recorder(), key=lambda i: i, max_batch=0)
