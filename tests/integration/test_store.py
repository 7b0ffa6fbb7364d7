"""The store against a real etcd: the etcd behaviour the view's read-your-writes rests on."""

from __future__ import annotations

import asyncio

from discovery.devtools.etcd import EtcdProcess
from discovery.store import PROBE, Store


async def test_a_progress_answer_is_only_trusted_once_confirmed(etcd: EtcdProcess, key_prefix: str) -> None:
    """etcd before 3.5.8 may answer a progress request ahead of events a catching-up watch is
    still owed (etcd issue 15220). ``unchanged_since`` is the check that keeps such an answer
    from satisfying a read: it must say no while the events are outstanding."""
    prefix = key_prefix.encode()
    async with Store([etcd.endpoint]) as store:
        first, _, _ = await store.put(prefix + b"a", b"1")
        last, _, _ = await store.put(prefix + b"b", b"2")
        seen_events: list[int] = []
        async with asyncio.timeout(10):
            batches = store.watch(prefix, first)
            try:
                async for batch in batches:
                    if batch.created:
                        store.request_progress()
                    seen_events += [e.kv.mod_revision for e in batch.events]
                    if len(seen_events) == 2:
                        break
            finally:
                await batches.aclose()
        assert seen_events == [first, last]
        # Whatever etcd answered (this etcd answers early most of the time), the view's check
        # at the state before the two writes says no: keys changed since.
        assert not await store.unchanged_since(prefix, first - 1, 0, last)
        assert await store.unchanged_since(prefix, last, 2, last)


async def test_check_access_passes_on_an_open_etcd_and_leaves_no_probe(etcd: EtcdProcess, key_prefix: str) -> None:
    """Without auth every prefix is open: the probe writes and deletes under ``_probe/``
    (a name no key schema entry starts with), and the health read stays inside the prefix."""
    prefix = key_prefix.encode()
    async with Store([etcd.endpoint], health_key=prefix + PROBE + b"health") as store:
        await store.check_access(prefix)
        _, items = await store.list_prefix(prefix)
        assert items == []
        health = await store.health()
        assert health.healthy and health.revision > 0
