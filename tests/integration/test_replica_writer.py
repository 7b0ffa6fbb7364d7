"""The replicator's writer and election against a real etcd: fencing, checkpoints in the
same transaction, held deletions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from discovery.errors import Fenced
from discovery.keys import KeySchema
from discovery.replication import Election, ReplicationSettings, Replicator, ReplicaWriter, Session
from discovery.replication.feed import FeedLost
from discovery.replication.replicator import StepDown
from discovery.store import Store
from discovery_pb.v1.replication_pb2 import Checkpoint, StreamResponse
from discovery_pb.v1.types_pb2 import Change, Instance
from tests.support.helpers import eventually

ORIGIN = "eu"


@pytest.fixture
async def store(etcd) -> AsyncIterator[Store]:
    async with Store([etcd.endpoint], op_timeout=2.0) as s:
        yield s


@pytest.fixture
def keys(key_prefix: str) -> KeySchema:
    return KeySchema(key_prefix)


def put(instance_id: str, revision: int, address: str = "10.0.0.1:80") -> Change:
    inst = Instance(service="web", instance_id=instance_id, region=ORIGIN, address=address)
    return Change(
        kind=Change.PUT, revision=revision, service="web", region=ORIGIN, instance_id=instance_id, instance=inst
    )


def delete(instance_id: str, revision: int) -> Change:
    return Change(kind=Change.DELETE, revision=revision, service="web", region=ORIGIN, instance_id=instance_id)


async def replicas(store: Store, keys: KeySchema) -> set[str]:
    _, kvs = await store.list_prefix(keys.region_instances(ORIGIN))
    return {kv.key.decode().rsplit("/", 1)[1] for kv in kvs}


async def checkpoint(store: Store, keys: KeySchema) -> Checkpoint:
    kv = await store.get(keys.checkpoint(ORIGIN))
    assert kv is not None
    return Checkpoint.FromString(kv.value)


async def win(store: Store, keys: KeySchema, identity: str) -> tuple[int, tuple[bytes, int]]:
    lease = await store.grant(5)
    created, _ = await store.create(keys.election(ORIGIN), identity.encode(), lease)
    assert created
    return lease, (keys.election(ORIGIN), created)


async def test_a_deposed_leaders_late_write_is_refused(store, keys) -> None:
    lease, fence = await win(store, keys, "old")
    old = ReplicaWriter(store, keys, ORIGIN, fence, Checkpoint(origin=ORIGIN))
    await old.changes([put("i1", 10)], 10, hold=False, contact=Checkpoint())
    # The old leader hangs; its lease expires (revoked here) and another server wins.
    await store.revoke(lease)
    _, new_fence = await win(store, keys, "new")
    new = ReplicaWriter(store, keys, ORIGIN, new_fence, await checkpoint(store, keys))
    await new.changes([delete("i1", 11)], 11, hold=False, contact=Checkpoint())
    # The old leader wakes up and writes what it had in hand: refused, nothing changes.
    with pytest.raises(Fenced):
        await old.changes([put("i1", 10), put("zombie", 10)], 10, hold=False, contact=Checkpoint())
    assert await replicas(store, keys) == set()
    assert (await checkpoint(store, keys)).revision == 11


async def test_changes_and_checkpoint_commit_together_in_chunks(store, keys) -> None:
    _, fence = await win(store, keys, "me")
    writer = ReplicaWriter(store, keys, ORIGIN, fence, Checkpoint(origin=ORIGIN))
    batch = [put(f"i{n}", 100 + n) for n in range(250)]  # more than one etcd transaction holds
    await writer.changes(batch, 400, hold=False, contact=Checkpoint(leader="me"))
    assert len(await replicas(store, keys)) == 250
    cp = await checkpoint(store, keys)
    assert (cp.revision, cp.leader) == (400, "me")


async def test_held_deletions_are_superseded_or_applied_and_never_skipped(store, keys) -> None:
    _, fence = await win(store, keys, "me")
    writer = ReplicaWriter(store, keys, ORIGIN, fence, Checkpoint(origin=ORIGIN))
    await writer.changes([put("a", 1), put("b", 2), put("c", 3)], 3, hold=False, contact=Checkpoint())
    # The origin is back from a freeze: its leases expired, two instances re-register.
    await writer.changes([delete("a", 4), delete("b", 5), delete("c", 6)], 6, hold=True, contact=Checkpoint())
    await writer.changes([put("a", 7), put("b", 8)], 8, hold=True, contact=Checkpoint())
    assert await replicas(store, keys) == {"a", "b", "c"}  # nothing flapped out
    # The checkpoint stays before the held deletion: a restart now would replay it.
    assert (await checkpoint(store, keys)).revision == 3
    restarted = ReplicaWriter(store, keys, ORIGIN, fence, await checkpoint(store, keys))
    assert restarted.applied == 3
    # Grace over: the deletion nobody superseded is applied, and the checkpoint moves on.
    assert await writer.release(Checkpoint()) == 1
    assert await replicas(store, keys) == {"a", "b"}
    assert (await checkpoint(store, keys)).revision == 8


async def test_snapshot_writes_only_the_difference(store, keys) -> None:
    _, fence = await win(store, keys, "me")
    writer = ReplicaWriter(store, keys, ORIGIN, fence, Checkpoint(origin=ORIGIN))
    await writer.changes([put("a", 1), put("b", 2), put("c", 3)], 3, hold=False, contact=Checkpoint())
    before = {kv.key: kv.mod_revision for kv in (await store.list_prefix(keys.region_instances(ORIGIN)))[1]}
    snap = [put("a", 1).instance, put("b", 9, address="10.0.0.9:80").instance, put("d", 9).instance]
    done = await writer.snapshot(snap, 9, cluster_id=7, hold=False, contact=Checkpoint())
    assert (done.puts, done.deletes) == (2, 1)  # b changed, d new, c gone; a untouched
    after = {kv.key: kv.mod_revision for kv in (await store.list_prefix(keys.region_instances(ORIGIN)))[1]}
    a = keys.instance(ORIGIN, "web", "a")
    assert after[a] == before[a]
    cp = await checkpoint(store, keys)
    assert (cp.revision, cp.cluster_id) == (9, 7)
    # A held snapshot deletion leaves a checkpoint that forces a new snapshot after a restart.
    await writer.snapshot([put("a", 1).instance], 12, cluster_id=7, hold=True, contact=Checkpoint())
    assert await replicas(store, keys) == {"a", "b", "d"}
    assert (await checkpoint(store, keys)).revision == 0


async def test_session_reports_a_lost_lease_and_grants_a_new_one(store) -> None:
    session = Session(store, ttl=2)
    lease = await session.lease()
    runner = asyncio.create_task(session.run())
    try:
        await store.revoke(lease)  # what etcd does when the server was hung past the TTL
        async with asyncio.timeout(5):
            await session.lost.wait()
        assert session.lease_id == 0
        assert await session.lease() not in (0, lease)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await session.close()


async def test_a_resumed_batch_with_several_changes_of_one_instance_applies_the_last(store, keys) -> None:
    # Replayed history is not coalesced: re-registered then drained (PUT, PUT), or deleted
    # then re-registered (DELETE, PUT). etcd refuses a transaction naming a key twice.
    _, fence = await win(store, keys, "me")
    writer = ReplicaWriter(store, keys, ORIGIN, fence, Checkpoint(origin=ORIGIN))
    drained = put("x", 2)
    drained.instance.status = 2  # DRAINING
    await writer.changes([put("x", 1), drained, delete("y", 3), put("y", 4)], 4, hold=False, contact=Checkpoint())
    kv = await store.get(keys.instance(ORIGIN, "web", "x"))
    assert kv is not None and Instance.FromString(kv.value).status == 2
    assert await replicas(store, keys) == {"x", "y"}
    await writer.changes([put("z", 5), delete("z", 6)], 6, hold=False, contact=Checkpoint())
    assert await replicas(store, keys) == {"x", "y"}
    assert (await checkpoint(store, keys)).revision == 6


async def test_a_snapshot_during_a_hold_keeps_the_checkpoint_behind_a_new_snapshot(store, keys) -> None:
    _, fence = await win(store, keys, "me")
    writer = ReplicaWriter(store, keys, ORIGIN, fence, Checkpoint(origin=ORIGIN))
    await writer.changes([put("a", 1), put("b", 2)], 300, hold=False, contact=Checkpoint())
    await writer.changes([delete("b", 290)], 310, hold=True, contact=Checkpoint())
    assert (await checkpoint(store, keys)).revision == 300
    # A snapshot at a lower revision (a rebuilt origin): b is still missing, still held. Its
    # old floor (300) is no resume point in the new stream: only a new snapshot is.
    await writer.snapshot([put("a", 1).instance], 200, cluster_id=9, hold=True, contact=Checkpoint())
    assert (await checkpoint(store, keys)).revision == 0
    assert await replicas(store, keys) == {"a", "b"}


async def test_each_held_deletion_waits_the_grace_at_most(store, keys) -> None:
    _, fence = await win(store, keys, "me")
    writer = ReplicaWriter(store, keys, ORIGIN, fence, Checkpoint(origin=ORIGIN))
    await writer.changes([put("a", 1), put("b", 2)], 2, hold=False, contact=Checkpoint())
    await writer.changes([delete("a", 3)], 3, hold=True, contact=Checkpoint())
    assert await writer.release(Checkpoint(), held_for=60) == 0  # not yet due
    await writer.changes([delete("b", 4)], 4, hold=True, contact=Checkpoint())
    writer._held[keys.instance(ORIGIN, "web", "a")] = (2, time.monotonic() - 61)  # as if a were held for 61 s
    assert await writer.release(Checkpoint(), held_for=60) == 1
    assert await replicas(store, keys) == {"b"}
    assert (await checkpoint(store, keys)).revision == 3  # still behind b's held deletion


async def test_rewind_goes_back_to_the_durable_checkpoint_and_start_over_to_a_snapshot(store, keys) -> None:
    _, fence = await win(store, keys, "me")
    writer = ReplicaWriter(store, keys, ORIGIN, fence, Checkpoint(origin=ORIGIN))
    await writer.changes([put("a", 1)], 5, hold=False, contact=Checkpoint())
    await writer.changes([delete("a", 6)], 7, hold=True, contact=Checkpoint())
    assert (writer.applied, writer.holding, writer.checkpoint.revision) == (7, True, 5)
    # Our etcd failed mid-batch: resume after the checkpoint, which replays the held deletion.
    writer.rewind()
    assert (writer.applied, writer.holding) == (5, False)
    writer.start_over()
    assert writer.applied == 0


async def test_a_leader_that_resigns_deletes_its_key_and_waits(store, keys) -> None:
    session = Session(store, ttl=3)
    election = Election(store, session, keys.election(ORIGIN), "me", poll=0.05, resign_pause=30)
    led = asyncio.Event()

    async def lead(fence: tuple[bytes, int]) -> None:
        led.set()
        raise StepDown("cannot reach the origin from here")

    runner = asyncio.create_task(election.run(lead))
    try:
        async with asyncio.timeout(5):
            await led.wait()

        async def key_gone() -> bool:
            return await store.get(keys.election(ORIGIN)) is None

        await eventually(key_gone, timeout=5)
        # A standby can win now; the resigned server stays out for its pause.
        lease = await store.grant(5)
        created, _ = await store.create(keys.election(ORIGIN), b"standby", lease)
        assert created
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await session.close()


class ScriptedFeed:
    """A feed with no network: each follow plays the next script, then loses the feed."""

    def __init__(self, *scripts: list[StreamResponse]) -> None:
        self.asked: list[tuple[str, int, int]] = []
        self._scripts = list(scripts)
        self.played = asyncio.Event()

    async def follow(self, endpoint: str, since: int, cluster_id: int) -> AsyncGenerator[StreamResponse, None]:
        self.asked.append((endpoint, since, cluster_id))
        if not self._scripts:
            self.played.set()
            await asyncio.sleep(3600)
        for message in self._scripts.pop(0):
            yield message
        raise FeedLost("end of script")


async def lead_until_played(replicator: Replicator, feed: ScriptedFeed, store: Store, keys: KeySchema) -> None:
    """Lead the replicator (fenced as "me") until the feed has played every script."""
    _, fence = await win(store, keys, "me")
    leading = asyncio.create_task(replicator.lead(fence))
    try:
        async with asyncio.timeout(10):
            await feed.played.wait()
    finally:
        leading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leading


async def test_the_loop_resumes_on_the_next_server_after_what_it_applied(store, keys) -> None:
    now = int(time.time() * 1000)
    snapshot = StreamResponse(
        kind=StreamResponse.SNAPSHOT,
        origin=ORIGIN,
        revision=5,
        cluster_id=7,
        time_ms=now,
        instances=[put("a", 1).instance, put("b", 2).instance],
    )
    changes = StreamResponse(kind=StreamResponse.CHANGES, origin=ORIGIN, revision=6, time_ms=now, changes=[put("c", 6)])
    gone = StreamResponse(kind=StreamResponse.CHANGES, origin=ORIGIN, revision=8, time_ms=now, changes=[delete("b", 8)])
    feed = ScriptedFeed([snapshot, changes], [gone])
    settings = ReplicationSettings(region="local", identity="me")
    replicator = Replicator(ORIGIN, ["x1", "x2"], feed=feed, store=store, keys=keys, settings=settings)
    await lead_until_played(replicator, feed, store, keys)
    assert feed.asked == [("x1", 0, 0), ("x2", 6, 7), ("x1", 8, 7)]
    assert await replicas(store, keys) == {"a", "c"}
    cp = await checkpoint(store, keys)
    assert (cp.revision, cp.cluster_id, cp.leader, cp.source) == (8, 7, "me", "x2")
    assert replicator.snapshots == 1


async def test_a_withdrawal_with_nothing_held_does_not_release_a_later_hold_at_once(store, keys) -> None:
    # The origin reports a recovery, withdraws it before anything was held (a new etcd term),
    # then recovers again for real: the deletion that follows waits the grace like any other.
    now = int(time.time() * 1000)

    def message(revision: int, recovered: int, *changes: Change) -> StreamResponse:
        return StreamResponse(
            kind=StreamResponse.CHANGES if changes else StreamResponse.HEARTBEAT,
            origin=ORIGIN,
            revision=revision,
            cluster_id=7,
            time_ms=now,
            recovered_at_ms=recovered,
            changes=changes,
        )

    snapshot = StreamResponse(
        kind=StreamResponse.SNAPSHOT,
        origin=ORIGIN,
        revision=5,
        cluster_id=7,
        time_ms=now,
        instances=[put("a", 1).instance],
    )
    script = [
        snapshot,
        message(5, now - 100),
        message(5, 0),
        message(6, now - 50, delete("a", 6)),
        message(6, now - 50),
    ]
    feed = ScriptedFeed(script)
    settings = ReplicationSettings(region="local", identity="me", resume_grace=30.0)
    replicator = Replicator(ORIGIN, ["x1"], feed=feed, store=store, keys=keys, settings=settings)
    await lead_until_played(replicator, feed, store, keys)
    assert await replicas(store, keys) == {"a"}  # held, not applied at once
