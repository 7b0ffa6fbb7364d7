"""The HTTP door (docs/http.md) against real regions: the JSON API answers what gRPC answers,
bad input gets 400 naming the parameter, the event stream resumes without a gap, /metrics
parses and carries every peer's replication lag, /readyz survives an etcd outage, and the
door holds under bad input and overload."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from discovery.answers import resolve_dict, status_dict, watch_dict
from discovery.devtools.etcd import EtcdProcess
from discovery_pb.v1 import admin_pb2, lookup_pb2
from discovery_pb.v1.types_pb2 import DRAINING, NOT_SERVING, SERVING, CheckResult
from tests.support.backends import TcpBackend
from tests.support.health import DETECT, HEALTH, check, endpoints, until_state
from tests.support.health import register as register_checked
from tests.support.helpers import ALL_STATUSES, eventually, register, resolve
from tests.support.http import HTTP, EventStream, base, get_json
from tests.support.regions import Regions
from tests.support.servers import Servers

pytestmark = pytest.mark.slow


async def _three(regions: Regions, region_etcds: dict[str, EtcdProcess], **overrides: Any) -> Regions:
    return await regions.start(region_etcds, **HTTP, **overrides)


def _steady(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without the fields that grow with time between two reads (the view's revision
    moves on with any write to the region's etcd, a replication checkpoint included)."""
    out = dict(answer)
    out.pop("revision", None)
    out["endpoints"] = [{k: v for k, v in e.items() if k != "age_seconds"} for e in answer["endpoints"]]
    out["regions"] = [{k: v for k, v in r.items() if k != "stale_seconds"} for r in answer["regions"]]
    return out


async def test_resolve_services_and_status_match_grpc(
    regions: Regions, region_etcds: dict[str, EtcdProcess], connect: Any, session: aiohttp.ClientSession
) -> None:
    await _three(regions, region_etcds)
    a, b = connect(regions["a"][0]), connect(regions["b"][0])
    await register(a, "web", "10.0.0.1:80", instance_id="w1", zone="z1", tags=["canary"], metadata={"v": "1"})
    await register(a, "web", "10.0.0.2:80", instance_id="w2", status=DRAINING)
    await register(b, "web", "10.0.1.1:80", instance_id="wb")
    reply = await register(b, "db", "10.0.1.9:5432", instance_id="d1")
    server = regions["a"][0]
    url = base(server)

    async def replicated() -> bool:
        return len((await resolve(a, "web", scope=lookup_pb2.ALL)).endpoints) == 2 and bool(
            (await resolve(a, "db", scope=lookup_pb2.ALL)).endpoints
        )

    await eventually(replicated, timeout=15)
    for query, request in (
        ("", lookup_pb2.ResolveRequest(service="web")),
        ("?scope=all", lookup_pb2.ResolveRequest(service="web", scope=lookup_pb2.ALL)),
        (
            "?scope=FAILOVER&min_healthy=3",
            lookup_pb2.ResolveRequest(service="web", scope=lookup_pb2.FAILOVER, min_healthy=3),
        ),
        (
            "?scope=all&status=serving&status=draining&tag=canary&zone=z1",
            lookup_pb2.ResolveRequest(
                service="web", scope=lookup_pb2.ALL, statuses=[SERVING, DRAINING], tags=["canary"], zone="z1"
            ),
        ),
    ):
        expected = resolve_dict(await a.lookup.Resolve(request, timeout=5))
        status, body, response = await get_json(session, f"{url}/v1/services/web{query}")
        assert status == 200, body
        assert _steady(body) == _steady(expected), query
        assert body["revision"] >= expected["revision"], query  # read after, from the same view
        assert response.headers["Content-Security-Policy"]
    # min_revision of another region's etcd is not this one's: read a's own revision back.
    status, body, _ = await get_json(session, f"{url}/v1/services/db?scope=all&min_revision=1")
    assert status == 200 and [e["instance_id"] for e in body["endpoints"]] == ["d1"]
    assert reply.revision  # b's revision, not a's: only the value is checked above

    async def fresh_listing() -> dict[str, Any]:
        status, listing, _ = await get_json(session, f"{url}/v1/services")
        assert status == 200 and not any(r["stale"] for r in listing["regions"]), listing["regions"]
        return listing

    listing = await eventually(fresh_listing, timeout=15)
    by_name = {s["service"]: s for s in listing["services"]}
    assert by_name["web"]["instances"] == 3
    assert by_name["web"]["regions"]["a"] == {"instances": 2, "statuses": {"SERVING": 1, "DRAINING": 1}}
    assert by_name["web"]["regions"]["b"]["instances"] == 1
    assert by_name["db"]["regions"] == {"b": {"instances": 1, "statuses": {"SERVING": 1}}}
    assert [r["region"] for r in listing["regions"]] == ["a", "b", "c"]
    assert listing["regions"][0]["local"]

    grpc_status = status_dict(await a.admin.Status(admin_pb2.StatusRequest(), timeout=5))
    status, body, _ = await get_json(session, f"{url}/v1/status")
    assert status == 200
    assert body.keys() == grpc_status.keys()
    for key in ("region", "instance_count", "service_count", "server_version"):
        assert body[key] == grpc_status[key], key
    assert body["etcd"]["endpoints"] == grpc_status["etcd"]["endpoints"] and body["etcd"]["healthy"]
    assert [o["origin"] for o in body["origins"]] == [o["origin"] for o in grpc_status["origins"]] == ["b", "c"]
    assert body["origins"][0].keys() == grpc_status["origins"][0].keys()


async def test_bad_input_is_400_naming_the_parameter(
    servers: Servers, etcd: EtcdProcess, session: aiohttp.ClientSession
) -> None:
    server = await servers.start(etcd, **HTTP, max_wait_seconds=0.3)
    url = base(server)
    for path, parameter in (
        ("/v1/services/web?scope=nearby", "scope"),
        ("/v1/services/web?min_revision=abc", "min_revision"),
        ("/v1/services/web?min_revision=-1", "min_revision"),
        ("/v1/services/web?min_revision=99999999999999999999", "min_revision"),
        ("/v1/services/web?min_healthy=0", "min_healthy"),
        ("/v1/services/web?status=sleeping", "status"),
        ("/v1/services/web?scop=all", "scop"),
        ("/v1/services/Bad%20Name!", "name"),
        ("/v1/services/" + "x" * 300, "name"),
        ("/v1/services?limit=3", "limit"),
        ("/v1/status?verbose=1", "verbose"),
        ("/v1/events?service=no%20such", "service"),
        ("/v1/events?since=yesterday", "since"),
    ):
        status, body, _ = await get_json(session, url + path)
        assert status == 400, (path, body)
        assert body["error"] == "invalid_argument" and body["parameter"] == parameter, (path, body)
        assert body["message"].startswith(parameter), body
    status, body, _ = await get_json(session, f"{url}/v1/events", headers={"Last-Event-ID": "x1"})
    assert status == 400 and body["parameter"] == "Last-Event-ID"
    for path in ("/nope", "/v1/service/web", "/v1/services/web/extra", "/ui/../../etc/passwd", "/ui/missing.js"):
        status, body, _ = await get_json(session, url + path)
        assert status == 404 and body["error"] == "not_found", path
    async with session.post(f"{url}/v1/status", timeout=aiohttp.ClientTimeout(total=5)) as response:
        assert response.status == 405 and response.content_type == "application/json"
        assert "GET" in response.headers["Allow"]
    # A revision the view will not reach in time: an answer, not a hang.
    status, body, _ = await get_json(session, f"{url}/v1/services/web?min_revision=999999999")
    assert status == 504 and body["error"] == "revision_not_reached"
    # Every kind of answer names its content type.
    for path, kind in (
        ("/healthz", "application/json"),
        ("/readyz", "application/json"),
        ("/metrics", "text/plain"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ):
        async with session.get(url + path, timeout=aiohttp.ClientTimeout(total=5)) as response:
            assert response.status == 200 and response.content_type == kind, path
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    # Oversized request line or headers: refused by the parser, the server keeps serving.
    async with session.get(f"{url}/v1/services/{'w' * 20000}", timeout=aiohttp.ClientTimeout(total=5)) as response:
        assert response.status in (400, 414)
    async with session.get(
        f"{url}/healthz", headers={"X-Big": "b" * 20000}, timeout=aiohttp.ClientTimeout(total=5)
    ) as r:
        assert r.status in (400, 431)
    status, _, _ = await get_json(session, f"{url}/healthz")
    assert status == 200


async def _open_events(session: aiohttp.ClientSession, url: str, **headers: str) -> EventStream:
    response = await session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
    assert response.status == 200, await response.text()
    assert response.content_type == "text/event-stream"
    return EventStream(response)


async def test_events_resume_from_last_event_id_without_a_gap(
    servers: Servers, etcd: EtcdProcess, connect: Any, session: aiohttp.ClientSession
) -> None:
    server = await servers.start(etcd, **HTTP)
    stubs = connect(server)
    await register(stubs, "web", "10.0.0.1:80", instance_id="w0")
    url = f"{base(server)}/v1/events?service=web"
    stream = await _open_events(session, url)
    snapshot = await stream.next()
    assert snapshot.event == "snapshot" and [i["instance_id"] for i in snapshot.data["instances"]] == ["w0"]
    assert snapshot.id == str(snapshot.data["revision"])
    await register(stubs, "web", "10.0.0.2:80", instance_id="w1")
    await register(stubs, "other", "10.0.0.3:80", instance_id="o1")  # not this stream's service
    first = await stream.changes_until(1)
    assert [c["instance_id"] for c in first] == ["w1"]
    last_id = stream.events[-1].id
    assert last_id is not None
    stream.response.close()

    # Changes while the reader is away, then it comes back with its last id.
    missed = []
    for i in range(2, 6):
        missed.append((await register(stubs, "web", f"10.0.0.{i + 1}:80", instance_id=f"w{i}")).revision)
    resumed = await _open_events(session, url, **{"Last-Event-ID": last_id})
    changes = await resumed.changes_until(4)
    assert [c["instance_id"] for c in changes] == ["w2", "w3", "w4", "w5"]
    assert [c["revision"] for c in changes] == missed
    assert not any(e.event == "snapshot" for e in resumed.events)
    resumed.response.close()
    # The same resume over gRPC's Watch carries the same message, field for field.
    call = stubs.lookup.Watch(lookup_pb2.WatchRequest(service="web", since_revision=int(last_id)), timeout=10)
    async for message in call:
        if message.kind == lookup_pb2.WatchResponse.CHANGES:
            assert watch_dict(message) == resumed.events[0].data
            break
    call.cancel()
    # ?since= works the same for scripts.
    by_query = await _open_events(session, f"{url}&since={missed[0]}")
    assert [c["instance_id"] for c in await by_query.changes_until(3)] == ["w3", "w4", "w5"]
    by_query.response.close()
    # A page opened with ?since= reconnects to the same URL with its later Last-Event-ID:
    # the id wins, so nothing it already has comes again.
    both = await _open_events(session, f"{url}&since={last_id}", **{"Last-Event-ID": str(missed[2])})
    assert [c["instance_id"] for c in await both.changes_until(1)] == ["w5"]
    both.response.close()


async def test_events_show_instances_as_served_like_resolve(
    servers: Servers, etcd: EtcdProcess, connect: Any, session: aiohttp.ClientSession
) -> None:
    server = await servers.start(etcd, **HTTP, **HEALTH)
    stubs = connect(server)
    backend = await TcpBackend().start()
    try:
        await register_checked(stubs, backend.address, "db-1", check())
        await eventually(lambda: _check_state(stubs, "db-1", CheckResult.PASSING), timeout=10)
        url = f"{base(server)}/v1/events?service=db"
        stream = await _open_events(session, url)
        snapshot = await stream.next()
        assert [(i["instance_id"], i["status"]) for i in snapshot.data["instances"]] == [("db-1", "SERVING")]

        await backend.stop()  # the check fails: Resolve serves db-1 as NOT_SERVING ...
        await until_state(stubs, "db-1", NOT_SERVING, timeout=DETECT * 4)
        resolved = (await endpoints(stubs, statuses=ALL_STATUSES))["db-1"]
        assert resolved.check_result.state == CheckResult.CRITICAL

        async def critical_change() -> dict[str, Any]:
            while True:  # ... and so does the stream, on the change the verdict wrote
                event = await stream.next()
                for change in event.data.get("changes", []):
                    if change.get("instance", {}).get("check", {}).get("state") == "critical":
                        return dict(change["instance"])

        async with asyncio.timeout(10):
            changed = await critical_change()
        assert changed["status"] == "NOT_SERVING"
        stream.response.close()
        # A fresh snapshot (a new reader) shows the same, as Watch does.
        again = await _open_events(session, url)
        snapshot = await again.next()
        shown = {i["instance_id"]: i for i in snapshot.data["instances"]}
        assert shown["db-1"]["status"] == "NOT_SERVING" and shown["db-1"]["check"]["state"] == "critical"
        again.response.close()
        # Field for field what Watch sends over gRPC.
        call = stubs.lookup.Watch(lookup_pb2.WatchRequest(service="db"), timeout=10)
        async for message in call:
            assert watch_dict(message)["instances"] == snapshot.data["instances"]
            break
        call.cancel()
    finally:
        await backend.stop()


async def _check_state(stubs: Any, instance_id: str, state: int) -> bool:
    found = (await endpoints(stubs, statuses=ALL_STATUSES)).get(instance_id)
    return found is not None and found.check_result.state == state


async def test_events_older_than_the_history_get_a_snapshot_first(
    servers: Servers, etcd: EtcdProcess, connect: Any, session: aiohttp.ClientSession
) -> None:
    server = await servers.start(etcd, **HTTP, history=3)
    stubs = connect(server)
    first = await register(stubs, "web", "10.0.0.1:80", instance_id="w0")
    for i in range(1, 6):
        await register(stubs, "web", f"10.0.0.{i + 1}:80", instance_id=f"w{i}")
    stream = await _open_events(session, f"{base(server)}/v1/events", **{"Last-Event-ID": str(first.revision)})
    event = await stream.next()
    assert event.event == "snapshot"
    assert sorted(i["instance_id"] for i in event.data["instances"]) == [f"w{i}" for i in range(6)]
    stream.response.close()


async def test_metrics_parse_and_carry_every_peers_lag(
    regions: Regions, region_etcds: dict[str, EtcdProcess], connect: Any, session: aiohttp.ClientSession
) -> None:
    await _three(regions, region_etcds)
    a = connect(regions["a"][0])
    await register(a, "web", "10.0.0.1:80")
    await resolve(a, "web")
    server = regions["a"][0]
    async with session.get(f"{base(server)}/v1/services/web", timeout=aiohttp.ClientTimeout(total=5)) as response:
        assert response.status == 200

    async def scrape() -> dict[str, Any]:
        async with session.get(
            f"http://127.0.0.1:{server.http.metrics_port}/metrics", timeout=aiohttp.ClientTimeout(total=5)
        ) as response:
            assert response.status == 200 and response.content_type == "text/plain"
            families = {f.name: f for f in text_string_to_metric_families(await response.text())}
        lag = families.get("discovery_replication_lag_seconds")
        assert lag is not None and {s.labels["origin"] for s in lag.samples} == {"b", "c"}, lag
        connected = families["discovery_replication_connected"]
        assert all(s.value == 1 for s in connected.samples), connected.samples
        return families

    families = await eventually(scrape, timeout=15)
    lookups = families["discovery_lookups"]  # the parser strips _total from a counter's family
    assert lookups.type == "counter"
    assert sum(s.value for s in lookups.samples if s.name == "discovery_lookups_total") >= 2  # gRPC + HTTP
    registrations = families["discovery_registrations"]
    assert any(s.name == "discovery_registrations_total" and s.value >= 1 for s in registrations.samples)
    assert families["discovery_resolve_duration_seconds"].type == "histogram"
    assert families["discovery_etcd_healthy"].samples[0].value == 1
    assert families["discovery_view_revision"].samples[0].value >= 1
    assert "discovery_replication_lag_revisions" in families
    kinds = {s.labels["kind"] for s in families["discovery_streams"].samples}
    assert kinds == {"ads", "events"}


async def test_ready_while_etcd_is_unreachable(
    servers: Servers, private_etcd: EtcdProcess, session: aiohttp.ClientSession
) -> None:
    server = await servers.start(private_etcd, **HTTP, etcd_timeout_seconds=1.0)
    probe = f"http://127.0.0.1:{server.http.metrics_port}"
    status, body, _ = await get_json(session, f"{probe}/readyz")
    assert status == 200 and body["ready"] and not body["stale"]
    private_etcd.pause()
    try:

        async def stale() -> bool:
            return bool((await get_json(session, f"{probe}/readyz"))[1]["stale"])

        await eventually(stale, timeout=20, interval=0.2)
        status, body, _ = await get_json(session, f"{probe}/readyz")
        assert status == 200 and body["ready"]
        status, body, _ = await get_json(session, f"{base(server)}/v1/status")
        assert status == 200 and body["stale"] and not body["etcd"]["healthy"]
        status, _, _ = await get_json(session, f"{probe}/healthz")
        assert status == 200
    finally:
        private_etcd.resume()


async def test_event_streams_over_the_limit_are_refused_and_resolve_still_answers(
    servers: Servers, etcd: EtcdProcess, connect: Any, session: aiohttp.ClientSession
) -> None:
    server = await servers.start(etcd, **HTTP, http_max_streams=3)
    stubs = connect(server)
    reply = await register(stubs, "web", "10.0.0.1:80")
    url = base(server)
    assert (await get_json(session, f"{url}/v1/services/web?min_revision={reply.revision}"))[0] == 200
    streams = [await _open_events(session, f"{url}/v1/events") for _ in range(3)]
    for stream in streams:
        assert (await stream.next()).event == "snapshot"
    status, body, response = await get_json(session, f"{url}/v1/events")
    assert status == 429 and body["limit"] == "http_max_streams"
    assert response.headers["Retry-After"] == "1"
    status, body, _ = await get_json(session, f"{url}/v1/services/web")
    assert status == 200 and len(body["endpoints"]) == 1
    # A flood of Resolves while the streams stay open: every one answered.
    answers = await asyncio.gather(*(get_json(session, f"{url}/v1/services/web") for _ in range(200)))
    assert all(a[0] == 200 for a in answers)
    streams[0].response.close()

    async def freed() -> bool:
        return len(server.http.events) < 3 if server.http else False

    await eventually(freed, timeout=5)
    again = await _open_events(session, f"{url}/v1/events")
    assert (await again.next()).event == "snapshot"
    # Streams end at shutdown (the reader resumes elsewhere), and the server stops promptly.
    async with asyncio.timeout(10):
        await servers.stop(server)
    for stream in [*streams[1:], again]:
        with contextlib.suppress(aiohttp.ClientError):
            while await stream.response.content.readany():
                pass
        assert stream.response.content.at_eof()


async def test_http_listen_in_use_is_refused_with_advice(servers: Servers, etcd: EtcdProcess) -> None:
    first = await servers.start(etcd, **HTTP)
    assert first.http is not None
    with pytest.raises(Exception, match=r"http_listen: cannot listen on 127\.0\.0\.1:\d+ .*in use"):
        await servers.start(etcd, http_listen=f"127.0.0.1:{first.http.port}")
