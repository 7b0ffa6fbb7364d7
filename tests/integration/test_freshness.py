"""How fresh healthy peers look: never stale, and the origin's heartbeat period travels in the
feed so a receiver can say when its own stale-after is too short to judge it."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from discovery.api import replication as replication_api
from discovery.replication.state import HEARTBEATS_PER_SILENCE
from discovery_pb.v1 import admin_pb2, lookup_pb2, replication_pb2
from tests.support.helpers import CALL_TIMEOUT, eventually, register, resolve
from tests.support.regions import FAST

IDLE_SECONDS = 30.0
LOADED_SECONDS = 30.0
SAMPLE_EVERY = 0.2
REGISTRATIONS_PER_SECOND = 30  # across the three regions, plus as many resolves


async def _origins(stubs) -> dict[str, admin_pb2.OriginStatus]:
    status = await stubs.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)
    return {o.origin: o for o in status.origins}


@pytest.mark.slow
@pytest.mark.timeout(IDLE_SECONDS + LOADED_SECONDS + 60)
async def test_a_healthy_cluster_never_looks_stale_idle_or_under_load(regions, region_etcds, connect, capsys) -> None:
    """A minute of Status samples on every server of three regions (two servers each: leaders
    and the servers that learn contact through etcd): no peer is ever disconnected. The worst
    age is printed; at most a third of stale-after is the design's aim (docs/replication.md)."""
    await regions.start(region_etcds, servers=2)
    servers = [(region, connect(server)) for region in "abc" for server in regions[region]]

    async def all_connected() -> bool:
        for _, stubs in servers:
            origins = await _origins(stubs)
            if len(origins) != 2 or not all(o.connected and o.leader for o in origins.values()):
                return False
        return True

    await eventually(all_connected, timeout=15.0)
    worst: dict[str, float] = {"idle": 0.0, "loaded": 0.0}
    samples = {"idle": 0, "loaded": 0}
    disconnected: list[str] = []

    async def sample(phase: str, until: float) -> None:
        while time.monotonic() < until:
            for region, stubs in servers:
                for origin, o in (await _origins(stubs)).items():
                    samples[phase] += 1
                    worst[phase] = max(worst[phase], o.last_contact_seconds)
                    if not o.connected:
                        disconnected.append(
                            f"{phase}: {region} saw {origin} disconnected ({o.last_contact_seconds:.2f}s)"
                        )
            await asyncio.sleep(SAMPLE_EVERY)

    async def load(until: float) -> int:
        done, n = 0, 0
        interval = 1 / REGISTRATIONS_PER_SECOND
        next_at = time.monotonic()
        while time.monotonic() < until:
            _, stubs = servers[n % len(servers)]
            await register(stubs, f"load-{n % 20}", f"10.9.{n // 250 % 250}.{n % 250}:80", instance_id=f"i{n % 500}")
            await resolve(stubs, f"load-{n % 20}", scope=lookup_pb2.FAILOVER)
            done += 1
            n += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        return done

    await sample("idle", time.monotonic() + IDLE_SECONDS)
    until = time.monotonic() + LOADED_SECONDS
    registered, _ = await asyncio.gather(load(until), sample("loaded", until))
    stale_after = FAST["stale_after_seconds"]
    with capsys.disabled():  # the figure is the point: shown in CI's output, not captured
        print(
            "\nfreshness "
            + json.dumps(
                {
                    "stale_after_s": stale_after,
                    "origin_heartbeat_s": FAST["replication_heartbeat_seconds"],
                    "worst_age_idle_s": round(worst["idle"], 3),
                    "worst_age_loaded_s": round(worst["loaded"], 3),
                    "samples": samples,
                    "registrations": registered,
                }
            )
        )
    assert not disconnected, disconnected[:10]
    assert samples["idle"] > 100 and samples["loaded"] > 100 and registered > LOADED_SECONDS * 5
    assert max(worst.values()) < stale_after  # the same as connected, said as a figure


async def test_the_origins_heartbeat_period_shows_in_status(regions, region_etcds, connect) -> None:
    await regions.start(region_etcds, replication_heartbeat_seconds=0.3)
    b = connect(regions["b"][0])

    async def known() -> dict[str, admin_pb2.OriginStatus] | None:
        origins = await _origins(b)
        return origins if all(o.heartbeat_seconds for o in origins.values()) and len(origins) == 2 else None

    origins = await eventually(known, timeout=10.0)
    assert {o.heartbeat_seconds for o in origins.values()} == {0.3}
    assert not any(o.warning for o in origins.values())


async def test_a_stale_after_under_three_origin_heartbeats_is_warned_about(
    regions, region_etcds, connect, caplog
) -> None:
    # A stale-after of 1.0 s spans fewer than three heartbeats of 0.5 s.
    caplog.set_level(logging.WARNING, logger="discovery.replication.replicator")
    pair = {"a": region_etcds["a"], "b": region_etcds["b"]}
    await regions.start(pair, replication_heartbeat_seconds=0.5, stale_after_seconds=1.0)
    b = connect(regions["b"][0])

    async def warned() -> admin_pb2.OriginStatus | None:
        a = (await _origins(b)).get("a")
        return a if a is not None and a.warning else None

    a = await eventually(warned, timeout=10.0)
    assert a.heartbeat_seconds == 0.5
    assert "stale-after 1s is under 3 heartbeats of a" in a.warning and "--stale-after to 1.5s" in a.warning
    assert any("under 3 heartbeats of a" in r.getMessage() for r in caplog.records)
    # The warning is advice, not a fault: a's records still replicate.
    await register(connect(regions["a"][0]), "w", "10.0.0.1:80")
    await eventually(lambda: _has(b, "w"), timeout=5.0)


async def _has(stubs, service: str) -> bool:
    return bool((await resolve(stubs, service, scope=lookup_pb2.ALL)).endpoints)


class _OldFeed(replication_api.ReplicationServicer):
    """A feed as servers before ``heartbeat_ms`` existed sent it: no period, one per second."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["heartbeat"] = 1.0
        super().__init__(*args, **kwargs)

    def _message(self, *args, **kwargs) -> replication_pb2.StreamResponse:
        message = super()._message(*args, **kwargs)
        message.ClearField("heartbeat_ms")
        return message


async def test_a_new_receiver_follows_an_old_origin(regions, region_etcds, connect, monkeypatch) -> None:
    """Mixed versions during an upgrade: an origin that does not say its period is taken to
    heartbeat every second (what it did), replicates as before and stays connected."""
    await regions.start({"a": region_etcds["a"], "b": region_etcds["b"]}, stale_after_seconds=3.0)
    await regions.stop_server(regions["a"][0])
    import discovery.server

    monkeypatch.setattr(discovery.server, "ReplicationServicer", _OldFeed)
    a = connect(await regions.start_server("a", 0))
    monkeypatch.undo()
    b = connect(regions["b"][0])
    await register(a, "old", "10.0.0.1:80")
    await eventually(lambda: _has(b, "old"), timeout=10.0)

    async def settled() -> admin_pb2.OriginStatus | None:
        o = (await _origins(b))["a"]
        return o if o.connected and o.heartbeat_seconds == 1.0 else None

    origin = await eventually(settled, timeout=10.0)
    assert origin.warning == ""  # 3 s spans three of its one-second heartbeats
    assert HEARTBEATS_PER_SILENCE * origin.heartbeat_seconds <= 3.0
