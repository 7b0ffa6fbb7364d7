"""Rolling upgrades: records carry fields some servers do not know yet.

A record written by a newer server (here: with a field this code has no name for) replicates
byte for byte and is served, so this server plays the old one's part; a record written by an
older server (no owner, no session) replicates and is served by this one, the new part."""

from __future__ import annotations

from discovery_pb.v1 import lookup_pb2, types_pb2
from tests.support.helpers import CALL_TIMEOUT, eventually

# Field 99, a string "future": tag (99 << 3 | 2) as a varint, then length and bytes.
FUTURE_FIELD = bytes([0x9A, 0x06, 6]) + b"future"


async def test_records_of_newer_and_older_servers_replicate_and_are_served(regions, region_etcds, connect) -> None:
    await regions.start({r: region_etcds[r] for r in "ab"})
    a, b = regions["a"][0], regions["b"][0]
    newer = (
        types_pb2.Instance(
            service="web",
            instance_id="from-newer",
            region="a",
            address="10.0.0.1:80",
            weight=100,
            status=1,
            owner="spiffe://discovery.local/svc/web",
            session_id=7,
        ).SerializeToString()
        + FUTURE_FIELD
    )
    older = types_pb2.Instance(
        service="web", instance_id="from-older", region="a", address="10.0.0.2:80", weight=100, status=1
    ).SerializeToString()
    for instance_id, value in (("from-newer", newer), ("from-older", older)):
        await a.store.put(a.keys.instance("a", "web", instance_id), value)
    stubs_b = connect(b)

    async def both() -> list[str]:
        resp = await stubs_b.lookup.Resolve(
            lookup_pb2.ResolveRequest(service="web", scope=lookup_pb2.ALL), timeout=CALL_TIMEOUT
        )
        ids = sorted(e.instance.instance_id for e in resp.endpoints)
        return ids if len(ids) == 2 else []  # the two may arrive in separate batches

    assert await eventually(both, timeout=15) == ["from-newer", "from-older"]
    replica = await b.store.get(b.keys.instance("a", "web", "from-newer"))
    assert replica is not None and FUTURE_FIELD in replica.value  # kept, not dropped on the way
    served = types_pb2.Instance.FromString(replica.value)
    assert served.owner == "spiffe://discovery.local/svc/web" and served.session_id == 7
