"""Puts coalesced into transactions (discovery/groupcommit.py) against a real etcd: each caller
still gets its own answer, a condition or a lease that fails affects only its own put, and a
hung etcd fails every waiting caller within the deadline."""

from __future__ import annotations

import asyncio

import pytest

from discovery.devtools.etcd import EtcdProcess
from discovery.errors import Conflict, StoreUnavailable
from discovery.store import Store


async def test_concurrent_puts_share_transactions_and_each_is_written(etcd: EtcdProcess, key_prefix: str) -> None:
    prefix = key_prefix.encode()
    async with Store([etcd.endpoint]) as store:
        async with asyncio.timeout(10):
            results = await asyncio.gather(*(store.put(prefix + b"k%d" % n, b"v%d" % n) for n in range(50)))
            _, items = await store.list_prefix(prefix)
        assert store._puts.batches < 50  # what the feature is for
        written = {kv.key: kv for kv in items}
        for n, (revision, lease, previous) in enumerate(results):
            kv = written[prefix + b"k%d" % n]
            assert kv.value == b"v%d" % n and kv.mod_revision == revision
            assert lease == 0 and previous is None


async def test_one_failed_condition_refuses_only_its_own_put(etcd: EtcdProcess, key_prefix: str) -> None:
    prefix = key_prefix.encode()
    async with Store([etcd.endpoint]) as store, asyncio.timeout(10):
        first, _, _ = await store.put(prefix + b"a", b"1")
        stale = first - 1 if first > 1 else 1
        outcomes = await asyncio.gather(
            store.put(prefix + b"a", b"2", expect_mod_revision=first),  # holds
            store.put(prefix + b"b", b"2", expect_mod_revision=0),  # holds: b is absent
            store.put(prefix + b"c", b"2"),  # unconditional
            store.put(prefix + b"d", b"2", expect_mod_revision=stale),  # d is absent: fails
            return_exceptions=True,
        )
        assert isinstance(outcomes[3], Conflict) and outcomes[3].current is None
        assert all(isinstance(o, tuple) for o in outcomes[:3]), outcomes
        _, items = await store.list_prefix(prefix)
        assert {kv.key: kv.value for kv in items} == {prefix + b"a": b"2", prefix + b"b": b"2", prefix + b"c": b"2"}
        with pytest.raises(Conflict) as refused:
            await store.put(prefix + b"a", b"3", expect_mod_revision=first)  # a moved on
        assert refused.value.current is not None and refused.value.current.value == b"2"


async def test_a_put_on_an_expired_lease_fails_alone(etcd: EtcdProcess, key_prefix: str) -> None:
    prefix = key_prefix.encode()
    async with Store([etcd.endpoint]) as store, asyncio.timeout(10):
        gone = await store.grant(30)
        await store.revoke(gone)
        kept = await store.grant(30)
        outcomes = await asyncio.gather(
            store.put(prefix + b"on-gone", b"x", lease=gone),
            store.put(prefix + b"on-kept", b"x", lease=kept),
            store.put(prefix + b"static", b"x"),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], StoreUnavailable) and "lease" in str(outcomes[0])
        assert isinstance(outcomes[1], tuple) and outcomes[1][1] == kept
        assert isinstance(outcomes[2], tuple)
        _, items = await store.list_prefix(prefix)
        assert sorted(kv.key for kv in items) == [prefix + b"on-kept", prefix + b"static"]


async def test_a_hung_etcd_fails_every_waiting_put_within_the_deadline(
    private_etcd: EtcdProcess, key_prefix: str
) -> None:
    """Puts queued behind a batch stuck at a SIGSTOPped etcd are not stuck with it: each caller
    hears StoreUnavailable by its own deadline; once etcd answers again, puts go through."""
    prefix = key_prefix.encode()
    async with Store([private_etcd.endpoint], op_timeout=1.0) as store:
        await store.put(prefix + b"warm", b"x")
        private_etcd.pause()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with asyncio.timeout(10):
                outcomes = await asyncio.gather(
                    *(store.put(prefix + b"k%d" % n, b"x") for n in range(20)), return_exceptions=True
                )
            assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
            assert loop.time() - started < 3.0  # 1 s each, plus scheduling on a busy machine
        finally:
            private_etcd.resume()
        async with asyncio.timeout(15):
            while True:
                try:
                    revision, _, _ = await store.put(prefix + b"after", b"x")
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.2)  # etcd reconnecting: poll, it has no event to await
        assert revision > 0
