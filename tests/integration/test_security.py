"""Security at every door of a real server over mTLS, on a real etcd (docs/security.md):
handshakes refused, identities and grants, record ownership, the Heartbeat lease attack,
replication identities, limits, the audit log."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery.devtools.etcd import EtcdProcess
from discovery.security.certs import CertificateAuthority, server_id
from discovery.server import Server
from discovery_pb.v1 import admin_pb2, lookup_pb2, registry_pb2, replication_pb2, replication_pb2_grpc, types_pb2
from tests.support.helpers import CALL_TIMEOUT, eventually
from tests.support.secure import ADMIN, ADMIN_GRANT, TRUST_DOMAIN, Pki, svc
from tests.support.servers import Servers, Stubs


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
async def secure(pki: Pki, servers: Servers, etcd: EtcdProcess) -> AsyncIterator[Callable[..., asyncio.Future[Server]]]:
    async def start(region: str = "us-east", **overrides: object) -> Server:
        return await servers.start(etcd, region=region, **{**pki.settings(region), **overrides})

    yield start  # type: ignore[misc]


@pytest.fixture
async def as_identity(pki: Pki) -> AsyncIterator[Callable[[Server, str | None], Stubs]]:
    channels: list[grpc.aio.Channel] = []

    def connect(server: Server, identity: str | None, **issue: object) -> Stubs:
        issued = pki.client(identity, **issue) if identity else None
        channel = pki.channel(f"127.0.0.1:{server.port}", issued)
        channels.append(channel)
        return Stubs(channel)

    yield connect  # type: ignore[misc]
    for channel in channels:
        await channel.close()


def instance(
    service: str, address: str, instance_id: str = "", ttl: int = 0, **meta: str
) -> registry_pb2.RegisterRequest:
    return registry_pb2.RegisterRequest(
        instance=types_pb2.Instance(
            service=service, address=address, instance_id=instance_id, ttl_seconds=ttl, metadata=meta
        )
    )


def audit_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


# --- the handshake ----------------------------------------------------------------------


async def test_handshakes_without_a_trusted_certificate_are_refused(secure, pki, tmp_path: Path) -> None:
    server = await secure()
    address = f"127.0.0.1:{server.port}"
    other = CertificateAuthority.create(tmp_path / "other")
    foreign = other.issue(spiffe_id=svc("web"), out=tmp_path / "foreign")
    expired = pki.client(
        svc("web"),
        not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10),
        days=1,
    )
    attempts = {
        "plaintext": grpc.aio.insecure_channel(address),
        "no certificate": pki.channel(address, None),
        "another CA": pki.channel(address, foreign),
        "expired": pki.channel(address, expired),
    }
    for what, channel in attempts.items():
        async with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            error = await rpc_error(stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT))
            assert error.code() == grpc.StatusCode.UNAVAILABLE, what


async def test_health_and_the_plain_health_listener(secure, as_identity) -> None:
    server = await secure(health_listen="127.0.0.1:0")
    stubs = as_identity(server, svc("anyone-at-all"))  # any valid certificate: not in the policy either
    health = health_pb2_grpc.HealthStub(stubs.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)).status == 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as plain:
        resp = await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        # ... and nothing else is served there.
        error = await rpc_error(
            registry_pb2_grpc_stub(plain).Register(instance("web", "10.0.0.1:80"), timeout=CALL_TIMEOUT)
        )
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def registry_pb2_grpc_stub(channel: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    from discovery_pb.v1 import registry_pb2_grpc

    return registry_pb2_grpc.RegistryStub(channel)


# --- identities and grants --------------------------------------------------------------


async def test_unknown_identity_and_missing_grant_get_exact_codes_and_nothing_reaches_etcd(
    secure, as_identity, pki, etcd
) -> None:
    server = await secure()
    before = (await server.store.health()).revision
    stranger = f"spiffe://{TRUST_DOMAIN}/batch/cron"
    error = await rpc_error(as_identity(server, stranger).registry.Register(instance("web", "10.0.0.1:80")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == f"certificate identity {stranger} is not in this server's policy"

    error = await rpc_error(as_identity(server, svc("web")).registry.Register(instance("payments", "10.0.0.1:80")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == f"{svc('web')} may not register 'payments' (allowed: web, web.*)"

    assert (await server.store.health()).revision == before  # nothing denied reached etcd
    lines = audit_lines(Path(server.config.audit_log))
    denied = [line for line in lines if line["event"] == "denied"]
    assert [(d["identity"], d["code"]) for d in denied] == [
        (stranger, "UNAUTHENTICATED"),
        (svc("web"), "PERMISSION_DENIED"),
    ]
    assert denied[1]["service"] == "payments" and denied[1]["method"] == "Register"


async def test_a_dotted_subtree_grant_does_not_cover_a_lookalike(secure, as_identity) -> None:
    server = await secure()
    web = as_identity(server, svc("web"))
    ok = await web.registry.Register(instance("web.canary", "10.0.0.1:80"), timeout=CALL_TIMEOUT)
    assert ok.revision > 0
    error = await rpc_error(web.registry.Register(instance("webshop", "10.0.0.1:80"), timeout=CALL_TIMEOUT))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_reads_need_read_and_status_needs_admin(secure, as_identity, pki) -> None:
    policy = pki.policy(
        f"""
        [[grant]]
        identity = "{ADMIN}"
        admin = true
        read = ["*"]

        [[grant]]
        identity = "{svc("web")}"
        read = ["web", "db"]
        """,
        name="reads.toml",
    )
    server = await secure(policy_file=str(policy))
    web = as_identity(server, svc("web"))
    assert (await web.lookup.Resolve(lookup_pb2.ResolveRequest(service="db"), timeout=CALL_TIMEOUT)).service == "db"
    error = await rpc_error(web.lookup.Resolve(lookup_pb2.ResolveRequest(service="payments"), timeout=CALL_TIMEOUT))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    watch_all = web.lookup.Watch(lookup_pb2.WatchRequest(), timeout=CALL_TIMEOUT)
    error = await rpc_error(watch_all.read())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = await rpc_error(web.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = as_identity(server, ADMIN)
    assert (await admin.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)).region == "us-east"


async def test_deny_list_and_policy_reload_apply_without_restart(secure, as_identity, pki) -> None:
    path = pki.policy()
    server = await secure(policy_file=str(path))
    web = as_identity(server, svc("web"))
    await web.registry.Register(instance("web", "10.0.0.1:80"), timeout=CALL_TIMEOUT)
    path.write_text(path.read_text().replace("[[grant]]", f'deny = ["{svc("web")}"]\n\n[[grant]]', 1))

    async def refused() -> bool:
        try:
            await web.registry.Register(instance("web", "10.0.0.1:80"), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    await eventually(refused, timeout=10, interval=0.1)
    # A broken policy file keeps the last good one (web stays denied, the admin stays admin).
    path.write_text("this is = not [valid toml")
    server.reload()
    admin = as_identity(server, ADMIN)
    await asyncio.sleep(0)  # let the reload request reach the poller
    assert (await admin.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)).region == "us-east"
    assert await refused()


async def _status_of(call: object) -> grpc.StatusCode:
    """How a stream ended: its status code once it stops yielding (UNKNOWN if it never did)."""
    try:
        async with asyncio.timeout(15):
            while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return await call.code()  # type: ignore[attr-defined, no-any-return]


async def test_a_policy_reload_ends_the_streams_it_no_longer_allows(secure, as_identity, pki) -> None:
    """Grants are checked when a stream opens; a reload that revokes one ends the streams that
    relied on it (PERMISSION_DENIED), and one that denies an identity ends its heartbeats
    (UNAUTHENTICATED), instead of letting them run until the client goes away. Streams the new
    policy still allows go on."""
    path = pki.policy()
    server = await secure(policy_file=str(path))
    web, admin = as_identity(server, svc("web")), as_identity(server, ADMIN)
    session = await web.registry.OpenSession(registry_pb2.OpenSessionRequest(ttl_seconds=30), timeout=CALL_TIMEOUT)
    beats = web.registry.Heartbeat()
    await beats.write(registry_pb2.HeartbeatRequest(lease_id=session.session_id))
    assert (await asyncio.wait_for(beats.read(), CALL_TIMEOUT)).ttl_seconds > 0
    watch_db = web.lookup.Watch(lookup_pb2.WatchRequest(service="db"))
    admin_watch = admin.lookup.Watch(lookup_pb2.WatchRequest(service="db"))
    for call in (watch_db, admin_watch):
        assert (await asyncio.wait_for(call.read(), CALL_TIMEOUT)).kind == lookup_pb2.WatchResponse.SNAPSHOT

    # svc/* may read only its own services now: web's Watch of db must end.
    text = path.read_text()
    svc_grant = text.index(f'identity = "spiffe://{TRUST_DOMAIN}/svc/*"')
    path.write_text(text[:svc_grant] + text[svc_grant:].replace('read = ["*"]', 'read = ["{name}"]', 1))
    server.reload()
    assert await _status_of(watch_db) == grpc.StatusCode.PERMISSION_DENIED
    assert not beats.done()  # web is still known: its heartbeats go on
    await beats.write(registry_pb2.HeartbeatRequest(lease_id=session.session_id))
    assert (await asyncio.wait_for(beats.read(), CALL_TIMEOUT)).ttl_seconds > 0

    # Deny web altogether: its Heartbeat stream ends too; the admin's Watch goes on.
    path.write_text(path.read_text().replace("[[grant]]", f'deny = ["{svc("web")}"]\n\n[[grant]]', 1))
    server.reload()
    assert await _status_of(beats) == grpc.StatusCode.UNAUTHENTICATED
    await admin.registry.Register(instance("db", "10.0.0.9:5432"), timeout=CALL_TIMEOUT)
    assert (await asyncio.wait_for(admin_watch.read(), CALL_TIMEOUT)).kind == lookup_pb2.WatchResponse.CHANGES
    admin_watch.cancel()


# --- ownership ----------------------------------------------------------------------------


async def test_another_identitys_instance_cannot_be_replaced_deregistered_or_heartbeated(
    secure, as_identity, pki
) -> None:
    # Both may register "shared"; only the one that did owns each instance.
    policy = pki.policy(
        pki.policy().read_text()
        + f"""
[[grant]]
identity = "{svc("a")}"
register = ["shared"]

[[grant]]
identity = "{svc("b")}"
register = ["shared"]
""",
        name="shared.toml",
    )
    server = await secure(policy_file=str(policy))
    a, b, admin = as_identity(server, svc("a")), as_identity(server, svc("b")), as_identity(server, ADMIN)
    mine = await a.registry.Register(instance("shared", "10.0.0.1:80", "one", ttl=30), timeout=CALL_TIMEOUT)
    resolved = await a.lookup.Resolve(
        lookup_pb2.ResolveRequest(service="shared", min_revision=mine.revision), timeout=CALL_TIMEOUT
    )
    assert resolved.endpoints[0].instance.owner == svc("a")

    error = await rpc_error(b.registry.Register(instance("shared", "10.6.6.6:80", "one"), timeout=CALL_TIMEOUT))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "belongs to" in error.details()
    error = await rpc_error(
        b.registry.Deregister(registry_pb2.DeregisterRequest(service="shared", instance_id="one"), timeout=CALL_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    stream = b.registry.Heartbeat(timeout=CALL_TIMEOUT)
    await stream.write(registry_pb2.HeartbeatRequest(lease_id=mine.lease_id))
    error = await rpc_error(stream.read())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED

    # The owner and an admin may.
    stream = a.registry.Heartbeat(timeout=CALL_TIMEOUT)
    await stream.write(registry_pb2.HeartbeatRequest(lease_id=mine.lease_id))
    assert (await stream.read()).ttl_seconds > 0
    stream.cancel()
    done = await admin.registry.Deregister(
        registry_pb2.DeregisterRequest(service="shared", instance_id="one"), timeout=CALL_TIMEOUT
    )
    assert done.revision > mine.revision


async def test_heartbeat_cannot_keep_a_replicator_election_lease_alive(regions, region_etcds, pki, as_identity) -> None:
    """The attack: keep a dead server's election lease alive so the region's replication
    never fails over. Heartbeat refreshes only leases of this region's instance records,
    whoever asks (the admin included)."""
    await regions.start({r: region_etcds[r] for r in "ab"}, per_region=pki.settings)
    a = regions["a"][0]
    lease = await eventually(lambda: _election_lease(a), timeout=15)
    stream = as_identity(a, ADMIN).registry.Heartbeat(timeout=CALL_TIMEOUT)
    await stream.write(registry_pb2.HeartbeatRequest(lease_id=lease))
    error = await rpc_error(stream.read())
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "holds no instance" in error.details()


async def _election_lease(server: Server) -> int:
    return server.session.lease_id


# --- replication identities -----------------------------------------------------------------


async def test_replication_needs_a_server_identity_of_the_region_it_claims(secure, as_identity) -> None:
    server = await secure()
    request = replication_pb2.StreamRequest(origin="us-east", requester="eu-west")
    client = replication_pb2_grpc.ReplicationStub(as_identity(server, svc("web")).channel)
    error = await rpc_error(client.Stream(request, timeout=CALL_TIMEOUT).read())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    impostor = replication_pb2_grpc.ReplicationStub(as_identity(server, server_id(TRUST_DOMAIN, "ap-south")).channel)
    error = await rpc_error(impostor.Stream(request, timeout=CALL_TIMEOUT).read())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "eu-west" in error.details()
    genuine = replication_pb2_grpc.ReplicationStub(as_identity(server, server_id(TRUST_DOMAIN, "eu-west")).channel)
    call = genuine.Stream(request, timeout=CALL_TIMEOUT)
    assert (await call.read()).kind in (replication_pb2.StreamResponse.SNAPSHOT, replication_pb2.StreamResponse.CHANGES)
    call.cancel()


async def test_a_policy_reload_ends_the_replication_feeds_it_no_longer_allows(secure, as_identity, pki) -> None:
    """A feed's identity is checked when it opens; a reload that takes away a peer region's
    replicate grant ends its feed with PERMISSION_DENIED, one that denies the peer ends it with
    UNAUTHENTICATED (what a new open would get), both audited. Other feeds go on."""
    eu, ap = server_id(TRUST_DOMAIN, "eu-west"), server_id(TRUST_DOMAIN, "ap-south")

    def peers(eu_replicates: str) -> str:
        return f"""
            {ADMIN_GRANT}

            [[grant]]
            identity = "{eu}"
            replicate = {eu_replicates}
            read = ["*"]

            [[grant]]
            identity = "{ap}"
            replicate = true
            read = ["*"]
            """

    path = pki.policy(peers("true"), name="peers.toml")
    server = await secure(policy_file=str(path))
    admin = as_identity(server, ADMIN)
    feeds = {}
    for region, identity in (("eu-west", eu), ("ap-south", ap)):
        stub = replication_pb2_grpc.ReplicationStub(as_identity(server, identity).channel)
        feeds[region] = stub.Stream(replication_pb2.StreamRequest(origin="us-east", requester=region))
        first = await asyncio.wait_for(feeds[region].read(), CALL_TIMEOUT)
        assert first.kind in (replication_pb2.StreamResponse.SNAPSHOT, replication_pb2.StreamResponse.CHANGES)

    # eu-west's servers stay known (they may still read) but may no longer replicate.
    pki.policy(peers("false"), name="peers.toml")
    server.reload()
    assert await _status_of(feeds["eu-west"]) == grpc.StatusCode.PERMISSION_DENIED
    await admin.registry.Register(instance("db", "10.0.0.9:5432"), timeout=CALL_TIMEOUT)
    assert await _changes_reach(feeds["ap-south"], "db")

    # Deny ap-south: its feed ends as well.
    path.write_text(f'deny = ["{ap}"]\n' + path.read_text())
    server.reload()
    assert await _status_of(feeds["ap-south"]) == grpc.StatusCode.UNAUTHENTICATED

    denied = [line for line in audit_lines(Path(server.config.audit_log)) if line["event"] == "denied"]
    assert [(d["identity"], d["method"], d["code"]) for d in denied] == [
        (eu, "Replication.Stream", "PERMISSION_DENIED"),
        (ap, "Replication.Stream", "UNAUTHENTICATED"),
    ]


async def _changes_reach(feed: object, service: str) -> bool:
    """Whether ``feed`` carries a change of ``service`` (skipping heartbeats) within 15 s."""
    async with asyncio.timeout(15):
        while True:
            message = await feed.read()  # type: ignore[attr-defined]
            assert message is not grpc.aio.EOF
            if any(change.service == service for change in message.changes):
                return True


# --- limits ------------------------------------------------------------------------------------


async def test_rate_limit_and_quotas_hold_while_another_identity_is_unaffected(secure, as_identity, pki) -> None:
    policy = pki.policy(
        pki.policy().read_text()
        + """
[limits]
writes_per_second = 2.0
write_burst = 3
instances_per_service = 2
instances = 3
""",
        name="limits.toml",
    )
    server = await secure(policy_file=str(policy))
    web, db = as_identity(server, svc("web")), as_identity(server, svc("db"))
    for i in range(2):
        await web.registry.Register(instance("web", f"10.0.0.{i}:80", f"w{i}"), timeout=CALL_TIMEOUT)
    # A third instance of web is over instances_per_service; re-registering one is not.
    call = web.registry.Register(instance("web", "10.0.0.9:80", "w9"), timeout=CALL_TIMEOUT)
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(await call.trailing_metadata())
    assert trailers["discovery-limit"] == "instances_per_service" and int(trailers["retry-after-ms"]) > 0
    # The burst of 3 is spent: the next write is over the rate, with how long to wait.
    call = web.registry.Register(instance("web", "10.0.0.0:80", "w0"), timeout=CALL_TIMEOUT)
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(await call.trailing_metadata())
    assert trailers["discovery-limit"] == "writes_per_second"
    assert 0 < int(trailers["retry-after-ms"]) <= 1000
    # Another identity is unaffected.
    assert (await db.registry.Register(instance("db", "10.0.1.1:5432"), timeout=CALL_TIMEOUT)).revision > 0


# --- audit ---------------------------------------------------------------------------------------


async def test_the_audit_log_has_one_line_per_write_and_no_secret(secure, as_identity, pki) -> None:
    server = await secure()
    web = as_identity(server, svc("web"))
    secret = "s3cr3t-value-never-logged"
    done = await web.registry.Register(instance("web", "10.0.0.1:80", "w1", token=secret), timeout=CALL_TIMEOUT)
    await web.registry.Deregister(registry_pb2.DeregisterRequest(service="web", instance_id="w1"), timeout=CALL_TIMEOUT)
    text = Path(server.config.audit_log).read_text()  # noqa: ASYNC240  # a small file the test wrote
    assert secret not in text and "BEGIN" not in text
    writes = [line for line in audit_lines(Path(server.config.audit_log)) if line["event"] == "write"]
    assert [(w["method"], w["service"], w["instance"], w["outcome"]) for w in writes] == [
        ("Register", "web", "w1", "ok"),
        ("Deregister", "web", "w1", "ok"),
    ]
    assert writes[0]["revision"] == done.revision
    assert writes[0]["identity"] == svc("web") and writes[0]["serial"] and writes[0]["region"] == "us-east"


async def test_writes_fail_closed_when_the_audit_log_cannot_be_written(secure, as_identity, pki, tmp_path) -> None:
    audit = tmp_path / "audit" / "log.jsonl"
    audit.parent.mkdir()
    server = await secure(audit_log=str(audit))
    web = as_identity(server, svc("web"))
    await web.registry.Register(instance("web", "10.0.0.1:80"), timeout=CALL_TIMEOUT)
    # Rotated away, and what takes its place cannot be appended to (tests run as root, so a
    # directory stands in for a read-only file).
    audit.rename(tmp_path / "audit" / "log.jsonl.1")
    audit.mkdir()
    server.reload()  # SIGHUP: reopen
    error = await rpc_error(web.registry.Register(instance("web", "10.0.0.2:80"), timeout=CALL_TIMEOUT))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and str(audit) in error.details()


async def test_a_peer_with_another_regions_certificate_imports_nothing(regions, region_etcds, pki, as_identity) -> None:
    """Region b's server holds c's certificate: a refuses to read from it (the URI SAN is not
    b's) and b cannot replicate from a as b. Region c, genuine, replicates as usual."""

    def settings(region: str) -> dict[str, object]:
        mine = pki.settings(region)
        if region == "b":
            impostor = pki.server("c")
            mine.update(tls_cert=str(impostor.cert_path), tls_key=str(impostor.key_path))
        return mine

    await regions.start({r: region_etcds[r] for r in "abc"}, per_region=settings)
    a, b, c = (regions[r][0] for r in "abc")
    await as_identity(b, ADMIN).registry.Register(instance("web", "10.0.2.1:80", "from-b"), timeout=CALL_TIMEOUT)
    await as_identity(c, ADMIN).registry.Register(instance("web", "10.0.3.1:80", "from-c"), timeout=CALL_TIMEOUT)
    admin_a = as_identity(a, ADMIN)

    async def seen_from_c() -> list[str]:
        resp = await admin_a.lookup.Resolve(lookup_pb2.ResolveRequest(service="web", scope=lookup_pb2.ALL))
        return sorted(e.instance.instance_id for e in resp.endpoints)

    assert await eventually(seen_from_c, timeout=15) == ["from-c"]
    status = await admin_a.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT)
    origin_b = next(o for o in status.origins if o.origin == "b")
    assert not origin_b.connected


# --- records from before identities, and records the view has not seen yet -----------------------


async def test_a_record_without_owner_may_be_taken_by_a_grantee(secure, as_identity) -> None:
    """Written by a server older than identities (no owner field): whoever may register the
    service may replace it, and from then on it is theirs."""
    server = await secure()
    key = server.keys.instance("us-east", "web", "legacy")
    legacy = types_pb2.Instance(
        service="web", instance_id="legacy", region="us-east", address="10.0.0.1:80", weight=100
    )
    revision, _, _ = await server.store.put(key, legacy.SerializeToString())
    await server.view.wait_for(revision, CALL_TIMEOUT)
    web = as_identity(server, svc("web"))
    done = await web.registry.Register(instance("web", "10.0.0.2:80", "legacy"), timeout=CALL_TIMEOUT)
    await server.view.wait_for(done.revision, CALL_TIMEOUT)
    record = server.view.get(server_key(server, "web", "legacy"))
    assert record is not None and record.instance.owner == svc("web")
    other = as_identity(server, svc("web.canary"))  # may not register web at all
    error = await rpc_error(other.registry.Register(instance("web", "10.0.0.3:80", "legacy"), timeout=CALL_TIMEOUT))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def _b_may_register_a(pki: Pki) -> Path:
    """The default policy, and b may register service a (over records it owns)."""
    return pki.policy(
        pki.policy().read_text() + f'\n[[grant]]\nidentity = "{svc("b")}"\nregister = ["a"]\n', name="race.toml"
    )


async def _put_as_a(server: Server, instance_id: str) -> None:
    """An instance of a, owned by a, written straight to etcd (the view may not have it yet)."""
    record = types_pb2.Instance(
        service="a", instance_id=instance_id, region="us-east", address="10.0.0.1:80", weight=100, owner=svc("a")
    )
    await server.store.put(server.keys.instance("us-east", "a", instance_id), record.SerializeToString())


async def test_a_record_the_view_has_not_seen_yet_is_still_protected(secure, as_identity, pki) -> None:
    server = await secure(policy_file=str(_b_may_register_a(pki)))
    b = as_identity(server, svc("b"))
    for i in range(20):
        # Written straight to etcd as a's, and b registers the same instance at once: whether
        # or not the view has caught up, b may not replace it.
        await _put_as_a(server, f"i{i}")
        error = await rpc_error(b.registry.Register(instance("a", "10.6.6.6:80", f"i{i}"), timeout=CALL_TIMEOUT))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, i


async def test_a_batch_does_not_replace_a_record_the_view_has_not_seen_yet(secure, as_identity, pki) -> None:
    """RegisterBatch writes only over the records it authorized, as Register does: a record of
    another identity written a moment ago (not yet in the view) is not replaced, and nothing
    of the chunk is written; once only b's own records are in the way, the batch goes through."""
    server = await secure(policy_file=str(_b_may_register_a(pki)))
    b = as_identity(server, svc("b"))
    for i in range(10):
        await _put_as_a(server, f"i{i}")
        batch = registry_pb2.RegisterBatchRequest(
            instances=[
                types_pb2.Instance(service="a", instance_id=f"mine-{i}", address="10.0.0.2:80"),
                types_pb2.Instance(service="a", instance_id=f"i{i}", address="10.6.6.6:80"),
            ]
        )
        error = await rpc_error(b.registry.RegisterBatch(batch, timeout=CALL_TIMEOUT))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, i
        assert await server.store.get(server.keys.instance("us-east", "a", f"mine-{i}")) is None, i  # all or nothing
        kept = await server.store.get(server.keys.instance("us-east", "a", f"i{i}"))
        assert kept is not None and types_pb2.Instance.FromString(kept.value).owner == svc("a")
    # b's own record rewritten behind the view's back is re-authorized and replaced.
    own = types_pb2.Instance(
        service="a", instance_id="own", region="us-east", address="10.0.0.3:80", weight=100, owner=svc("b")
    )
    await server.store.put(server.keys.instance("us-east", "a", "own"), own.SerializeToString())
    batch = registry_pb2.RegisterBatchRequest(
        instances=[types_pb2.Instance(service="a", instance_id="own", address="10.0.0.4:80")]
    )
    await b.registry.RegisterBatch(batch, timeout=CALL_TIMEOUT)
    now = await server.store.get(server.keys.instance("us-east", "a", "own"))
    assert now is not None and types_pb2.Instance.FromString(now.value).address == "10.0.0.4:80"


async def test_a_chunk_written_meanwhile_is_authorized_again_before_it_is_replaced(secure) -> None:
    """The mechanism under the test above, without relying on the view lagging: a batch whose
    expectation is stale (the record was written after it was authorized) has its records
    decided again on what etcd holds, refused as a whole or written over the new revision."""
    from discovery.errors import PermissionDenied

    server = await secure()
    key = server.keys.instance("us-east", "a", "x")
    theirs = types_pb2.Instance(service="a", instance_id="x", region="us-east", address="10.0.0.1:80", owner="them")
    await server.store.put(key, theirs.SerializeToString())
    seen: list[str] = []

    def refuse_theirs(record: types_pb2.Instance, current: object) -> None:
        owner = types_pb2.Instance.FromString(current.value).owner if current is not None else ""  # type: ignore[attr-defined]
        seen.append(owner)
        if owner == "them":
            raise PermissionDenied("not yours")

    mine = types_pb2.Instance(service="a", instance_id="x", region="us-east", address="10.6.6.6:80", owner="me")
    other = types_pb2.Instance(service="a", instance_id="y", region="us-east", address="10.0.0.2:80", owner="me")
    with pytest.raises(PermissionDenied):
        await server.registry.register_batch([other, mine], expected=[0, 0], recheck=refuse_theirs)
    assert seen == ["", "them"]
    assert await server.store.get(server.keys.instance("us-east", "a", "y")) is None  # all or nothing
    current = await server.store.get(key)
    assert current is not None and types_pb2.Instance.FromString(current.value).owner == "them"
    # Now the record is the caller's own, written after the caller looked: decided again, written.
    await server.store.put(key, mine.SerializeToString())
    seen.clear()
    revision, done = await server.registry.register_batch([other, mine], expected=[0, 0], recheck=refuse_theirs)
    assert seen == ["", "me"] and [d.revision for d in done] == [revision, revision]


async def test_a_batch_record_gone_meanwhile_counts_against_the_quota_again(secure, as_identity, pki) -> None:
    """Authorized as a re-registration (no quota), a record deleted before the write becomes a
    new instance: the re-check counts it, as Register's does, instead of letting it past."""
    from discovery.errors import ResourceExhausted
    from discovery.security.identity import Caller

    policy = pki.policy(pki.policy().read_text() + "\n[limits]\ninstances_per_service = 1\n", name="quota.toml")
    server = await secure(policy_file=str(policy))
    web = as_identity(server, svc("web"))
    first = await web.registry.Register(instance("web", "10.0.0.1:80", "w1"), timeout=CALL_TIMEOUT)
    await server.view.wait_for(first.revision, CALL_TIMEOUT)
    key = server.keys.instance("us-east", "web", "w1")
    before = await server.store.get(key)
    assert before is not None
    # The batch was authorized over w1 (a re-registration); w1 goes, and w2 took web's one place.
    await server.store.delete(key)
    second = await web.registry.Register(instance("web", "10.0.0.2:80", "w2"), timeout=CALL_TIMEOUT)
    await server.view.wait_for(second.revision, CALL_TIMEOUT)
    caller = Caller(identity=svc("web"), serial="", peer="test")
    grants = server.guard.policy.grants_for(caller.identity)
    api = server._registry_api

    def recheck(record: types_pb2.Instance, current: object) -> None:
        api._reauthorize(caller, grants, "RegisterBatch", record, current)  # type: ignore[arg-type]

    record = types_pb2.Instance(service="web", instance_id="w1", region="us-east", address="10.0.0.1:80")
    with pytest.raises(ResourceExhausted):
        await server.registry.register_batch([record], expected=[before.mod_revision], recheck=recheck)
    assert await server.store.get(key) is None


def server_key(server: Server, service: str, instance_id: str):  # type: ignore[no-untyped-def]
    from discovery.keys import InstanceKey

    return InstanceKey(server.config.region, service, instance_id)


# --- rotation on a running server ---------------------------------------------------------------------


async def test_rotation_new_handshakes_get_the_new_certificate_while_an_open_watch_goes_on(
    secure, as_identity, pki
) -> None:
    from discovery.security.tls import TlsFiles, peer_uris

    server = await secure()
    admin = as_identity(server, ADMIN)
    watch = admin.lookup.Watch(lookup_pb2.WatchRequest(service="web"), timeout=60)
    assert (await watch.read()).kind == lookup_pb2.WatchResponse.SNAPSHOT
    before = server.certificates.current.serial
    issued = pki.ca.issue(spiffe_id=server_id(TRUST_DOMAIN, "us-east"), dns=("localhost",), ips=("127.0.0.1",))
    cert, key = Path(server.config.tls_cert), Path(server.config.tls_key)
    for path, data in ((key, issued.key), (cert, issued.cert)):
        (path.parent / (path.name + ".new")).write_bytes(data)
        (path.parent / (path.name + ".new")).rename(path)
    server.reload()
    await eventually(lambda: _serial_changed(server, before), timeout=10)
    admin_issued = pki.client(ADMIN)
    files = TlsFiles(str(admin_issued.cert_path), str(admin_issued.key_path), str(pki.ca_path))
    assert await peer_uris(f"127.0.0.1:{server.port}", files, timeout=5) == (server_id(TRUST_DOMAIN, "us-east"),)
    # A fresh connection works with the new certificate, and the old stream still delivers.
    fresh = as_identity(server, ADMIN)
    await fresh.registry.Register(instance("web", "10.0.0.1:80", "after-rotation"), timeout=CALL_TIMEOUT)
    while True:
        message = await watch.read()
        if any(c.instance_id == "after-rotation" for c in message.changes):
            break
    watch.cancel()
    # A key that does not match is refused: the new certificate stays, the audit log says so.
    serial = server.certificates.current.serial
    key.write_bytes(pki.ca.issue(spiffe_id=svc("other")).key)  # noqa: ASYNC240  # a small test file
    server.reload()
    await eventually(lambda: _failed_once(server), timeout=10)
    assert server.certificates.current.serial == serial
    events = [line["event"] for line in audit_lines(Path(server.config.audit_log))]
    assert "certificate_reloaded" in events and "certificate_rejected" in events


async def _failed_once(server: Server) -> bool:
    return server.certificates is not None and server.certificates.reload_failures == 1


async def _serial_changed(server: Server, before: str) -> bool:
    return server.certificates is not None and server.certificates.current.serial != before


async def test_a_bad_health_listen_address_is_refused_naming_the_setting(secure) -> None:
    from discovery.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="health_listen"):
        await secure(health_listen="not-an-address")
