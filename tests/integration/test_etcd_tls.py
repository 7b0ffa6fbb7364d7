"""The store against a real etcd with TLS, client-certificate auth and RBAC (one user per
region, limited to its prefix, as docs/security.md sets it up): the grants hold, a server
without them hears who and what at start, rotating the client certificate loses no write and
no watched event, and etcd's NOSPACE alarm stops writes but not reads until an operator
compacts, defragments and disarms it (the runbook's own etcdctl commands)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from discovery.devtools.etcd import EtcdNotFound, EtcdProcess, EtcdServerTls, find_etcd
from discovery.errors import PermissionDenied, ResourceExhausted, StoreForbidden, StoreUnavailable
from discovery.security.certs import CertificateAuthority, Issued
from discovery.store import PROBE, EtcdTls, Store, Write
from discovery_pb.v1.types_pb2 import Instance

REGION_A = "/region-a/discovery/v1/"
REGION_B = "/region-b/discovery/v1/"


@dataclass
class SecureEtcd:
    member: EtcdProcess
    ca: CertificateAuthority
    files: EtcdServerTls
    base: Path

    def user(self, name: str, out: str = "") -> Issued:
        """A client certificate whose CN is etcd user ``name``."""
        return self.ca.issue(common_name=name, out=self.base / (out or name))

    def store_tls(self, issued: Issued, server_name: str = "") -> EtcdTls:
        assert issued.cert_path and issued.key_path
        return EtcdTls(self.files.ca, issued.cert_path, issued.key_path, server_name)


def _secure_etcd(base: Path, users: dict[str, str], quota: int = 0) -> SecureEtcd:
    try:
        find_etcd()
    except EtcdNotFound as exc:
        pytest.exit(f"these tests need a real etcd: {exc}", returncode=3)
    ca = CertificateAuthority.create(base / "ca")
    files = EtcdServerTls.issue(ca, base / "tls")
    member = EtcdProcess(base / "etcd", tls=files, quota_backend_bytes=quota).start()
    member.setup_rbac(users)
    return SecureEtcd(member, ca, files, base)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureEtcd]:
    """etcd with auth on: region-a may use REGION_A, region-b REGION_B, nobody else anything."""
    etcd = _secure_etcd(tmp_path_factory.mktemp("etcd-tls"), {"region-a": REGION_A, "region-b": REGION_B})
    yield etcd
    etcd.member.stop()


@contextlib.asynccontextmanager
async def _store(etcd: SecureEtcd, issued: Issued, **kwargs: object) -> AsyncIterator[Store]:
    async with Store([etcd.member.endpoint], tls=etcd.store_tls(issued), **kwargs) as store:  # type: ignore[arg-type]
        yield store


async def test_a_store_over_tls_puts_gets_and_watches(secure: SecureEtcd) -> None:
    prefix = REGION_A.encode() + b"basic/"
    health_key = REGION_A.encode() + PROBE + b"health"  # inside the prefix, where RBAC lets it read
    async with _store(secure, secure.user("region-a"), health_key=health_key) as store:
        await store.check_access(REGION_A.encode())
        revision, _, _ = await store.put(prefix + b"k", b"v")
        found = await store.get(prefix + b"k")
        assert found is not None and found.value == b"v"
        async with asyncio.timeout(10), contextlib.aclosing(store.watch(prefix, revision)) as batches:
            async for batch in batches:
                if batch.events:
                    assert [e.kv.key for e in batch.events] == [prefix + b"k"]
                    break
        assert (await store.health()).healthy
        _, items = await store.list_prefix(REGION_A.encode())
        assert all(b"_probe/" not in kv.key for kv in items)  # check_access leaves nothing behind


async def test_localhost_is_checked_against_the_dns_name(secure: SecureEtcd) -> None:
    endpoint = f"localhost:{secure.member.client_port}"
    async with Store([endpoint], tls=secure.store_tls(secure.user("region-a"))) as store:
        await store.put(REGION_A.encode() + b"localhost", b"v")


def test_several_endpoints_need_a_server_name(secure: SecureEtcd) -> None:
    with pytest.raises(ValueError, match="several endpoints need a TLS server name"):
        Store(["127.0.0.1:1", "127.0.0.1:2"], tls=secure.store_tls(secure.user("region-a")))
    Store(["127.0.0.1:1", "127.0.0.1:2"], tls=secure.store_tls(secure.user("region-a"), server_name="localhost"))


async def test_a_region_writes_only_inside_its_prefix(secure: SecureEtcd) -> None:
    async with _store(secure, secure.user("region-a")) as store:
        await store.put(REGION_A.encode() + b"mine", b"v")
        with pytest.raises(StoreForbidden, match=r"etcd refuses user 'region-a'.*a put on '/region-b/"):
            await store.put(REGION_B.encode() + b"theirs", b"v")
        with pytest.raises(StoreForbidden):
            await store.get(REGION_B.encode() + b"theirs")
    async with _store(secure, secure.user("region-b")) as other:
        assert await other.get(REGION_B.encode() + b"theirs") is None  # nothing got through


async def test_check_access_names_the_identity_and_the_prefix(secure: SecureEtcd) -> None:
    stranger = secure.user("discovery-us-east")  # a certificate etcd knows no user for
    async with _store(secure, stranger) as store:
        with pytest.raises(PermissionDenied) as refused:
            await store.check_access(REGION_A.encode())
    assert str(refused.value) == (
        f"etcd refuses user 'discovery-us-east' (the CN of {stranger.cert_path}) on prefix '{REGION_A}': "
        "grant it a role with readwrite on that prefix (docs/security.md, etcd RBAC)"
    )
    async with _store(secure, secure.user("region-b")) as store:  # a user, with another prefix
        with pytest.raises(PermissionDenied, match=f"user 'region-b' .* on prefix '{REGION_A}'"):
            await store.check_access(REGION_A.encode())
        await store.check_access(REGION_B.encode())


def _replace(path: Path, data: bytes) -> None:
    """Write as a rotation tool does: a whole new file in one rename."""
    temporary = path.with_suffix(".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class _Traffic:
    """Writers putting new keys as fast as etcd takes them, and a watch of the same keys."""

    def __init__(self, store: Store, prefix: bytes, start: int) -> None:
        self.store, self.prefix, self.start = store, prefix, start
        self.acked: dict[bytes, int] = {}  # key -> revision etcd acknowledged it at
        self.failures: list[BaseException] = []
        self.seen: set[int] = set()  # revisions of the events watched
        self._progress = asyncio.Condition()
        self._stop = asyncio.Event()
        self._writers: list[asyncio.Task[None]] = []
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Traffic:
        self._watcher = asyncio.create_task(self._watch())
        self._writers = [asyncio.create_task(self._write(w)) for w in range(4)]  # several under way at a swap
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for task in [*self._writers, self._watcher]:
            assert task is not None
            task.cancel()
        await asyncio.gather(*self._writers, self._watcher, return_exceptions=True)

    async def until(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(predicate)

    async def more(self, count: int) -> None:
        mark = len(self.acked)
        await self.until(lambda: len(self.acked) >= mark + count)

    async def stop_writing(self) -> None:
        self._stop.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*self._writers)

    async def _write(self, writer: int) -> None:
        n = 0
        while not self._stop.is_set():
            key = self.prefix + b"%d-%06d" % (writer, n)
            try:
                revision, _, _ = await self.store.put(key, b"v")
            except StoreUnavailable as exc:
                # etcd refuses a request authorized before an RBAC change (here: the old user
                # deleted) with "revision in header is old"; it was not applied, and callers retry
                # UNAVAILABLE as every client of ours does.
                if "revision in header is old" not in str(exc):
                    self.failures.append(exc)
                    raise
                continue
            except Exception as exc:
                self.failures.append(exc)
                raise
            self.acked[key] = revision
            n += 1
            async with self._progress:
                self._progress.notify_all()

    async def _watch(self) -> None:
        async with contextlib.aclosing(self.store.watch(self.prefix, self.start + 1)) as batches:
            async for batch in batches:
                self.seen.update(e.kv.mod_revision for e in batch.events)
                async with self._progress:
                    self._progress.notify_all()


async def test_rotating_the_client_certificate_loses_no_write(
    secure: SecureEtcd, caplog: pytest.LogCaptureFixture
) -> None:
    """The certificate moves to a new etcd user under the same grant; once the old user is
    deleted only the new certificate can write at all, and neither writers nor the watch noticed."""
    caplog.set_level(logging.INFO, logger="discovery.store")
    for user in ("region-a-1", "region-a-2"):
        secure.member.grant_prefix(user, REGION_A)
    live = secure.user("region-a-1", out="live")  # the files the server reads: rotated in place
    assert live.cert_path and live.key_path
    prefix = REGION_A.encode() + b"rotation/"
    async with _store(secure, live) as store:
        start, _, _ = await store.put(prefix + b"start", b"")
        lease = await store.grant(30)
        assert await store.keep_alive(lease) > 0  # opens the keep-alive stream on the first client
        async with _Traffic(store, prefix + b"w/", start) as traffic:
            await traffic.more(50)
            # A bad rotation (the key of another certificate) keeps the old client.
            new = secure.ca.issue(common_name="region-a-2")
            _replace(live.key_path, new.key)
            assert not await store.reload_tls()
            await traffic.more(20)
            _replace(live.cert_path, new.cert)  # now key and certificate of the new user
            assert await store.reload_tls()
            assert not await store.reload_tls()  # nothing changed since
            await traffic.more(50)
            await asyncio.to_thread(secure.member.etcdctl, "user", "delete", "region-a-1")
            await traffic.more(100)  # only the new certificate can be writing these
            assert await store.keep_alive(lease) > 0  # on a keep-alive stream of the new client
            await traffic.stop_writing()
            await traffic.until(lambda: set(traffic.acked.values()) <= traffic.seen)
        assert traffic.failures == []
        _, items = await store.list_prefix(prefix + b"w/")
        assert {kv.key: kv.mod_revision for kv in items} == traffic.acked
        assert "the previous client is closed" in caplog.text  # nothing was left on it
    assert "moves to the new client" in caplog.text
    assert "is not the key of" in caplog.text  # the bad rotation, and why it was refused


@pytest.fixture
def tiny_etcd(tmp_path: Path) -> Iterator[SecureEtcd]:
    """etcd with a quota small enough to fill in a second (etcd enforces no minimum)."""
    etcd = _secure_etcd(tmp_path, {"region-a": REGION_A}, quota=256 * 1024)
    yield etcd
    etcd.member.stop()


async def test_nospace_refuses_writes_keeps_reads_until_the_runbook_recovers(tiny_etcd: SecureEtcd) -> None:
    etcd = tiny_etcd
    prefix = REGION_A.encode()
    async with _store(etcd, etcd.user("region-a")) as store:
        kept, _, _ = await store.put(prefix + b"kept", b"v")
        # Churn on one key: history, not live data, fills the backend (as it does when nothing
        # compacts), so compaction can give the space back.
        with pytest.raises(ResourceExhausted) as full:
            for _ in range(2000):
                await store.put(prefix + b"churn", b"x" * 20_000)
        assert full.value.limit == "etcd_space" and full.value.retry_after > 0
        assert str(full.value).startswith("region's etcd is out of space (NOSPACE alarm)")
        lease = 0
        for write in (
            store.put(prefix + b"new", b"v"),
            store.create(prefix + b"election", b"me", 0),
            store.fenced((prefix + b"kept", kept), [Write(prefix + b"other", b"v")]),
            store.grant(10),
        ):
            with pytest.raises(ResourceExhausted, match="NOSPACE"):
                lease = await write  # type: ignore[assignment]
        assert lease == 0
        found = await store.get(prefix + b"kept")  # reads keep serving
        assert found is not None and found.value == b"v"
        await store.check_access(prefix)  # cannot prove the write grant now; must not stop a server
        assert "alarm:NOSPACE" in etcd.member.etcdctl("alarm", "list")

        # The runbook (docs/security.md), as the root user: compact to the current revision,
        # defragment every member, then disarm the alarm.
        status = json.loads(etcd.member.etcdctl("endpoint", "status", "--write-out=json"))
        revision = status[0]["Status"]["header"]["revision"]
        etcd.member.etcdctl("compact", str(revision))
        etcd.member.etcdctl("defrag")
        etcd.member.etcdctl("alarm", "disarm")
        assert etcd.member.etcdctl("alarm", "list").strip() == ""
        await store.put(prefix + b"new", b"v")


async def test_a_server_runs_on_etcd_over_tls_inside_its_prefix(secure: SecureEtcd, servers) -> None:
    """The whole server on an etcd with client-certificate auth and RBAC: it starts (the access
    check and the health probe stay inside its prefix), registers and resolves."""
    issued = secure.user("region-a", out="server-a")
    server = await servers.start(
        secure.member,
        region="us-east",
        key_prefix=REGION_A,
        etcd_ca=str(secure.files.ca),
        etcd_cert=str(issued.cert_path),
        etcd_key=str(issued.key_path),
    )
    assert (await server.store.health()).healthy
    record = Instance(service="web", instance_id="w1", region="us-east", address="10.0.0.1:80", weight=100)
    done = await server.registry.register(record)
    await server.view.wait_for(done.revision, 5)
    assert [i.instance_id for i in server.view.snapshot("web")] == ["w1"]


async def test_a_server_whose_etcd_user_lacks_its_prefix_stops_at_start_naming_both(
    secure: SecureEtcd, servers
) -> None:
    issued = secure.user("region-b", out="server-b-wrong")
    with pytest.raises(PermissionDenied, match=r"etcd refuses user 'region-b'.*'/region-a/discovery/v1/'"):
        async with asyncio.timeout(10):
            await servers.start(
                secure.member,
                region="us-east",
                key_prefix=REGION_A,
                etcd_ca=str(secure.files.ca),
                etcd_cert=str(issued.cert_path),
                etcd_key=str(issued.key_path),
            )
