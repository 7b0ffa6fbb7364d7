"""etcd endpoints by name, against real etcd: a name that resolves (``localhost``), an IPv6
member, a name that does not resolve (the error names it, and the store comes up once it
does), a member killed while its name still has another address, a name that moves to
another address, and TLS checked against the name.

No name on this machine resolves to several addresses (/etc/hosts maps ``localhost`` to
127.0.0.1 alone, and there is no DNS server to add one to), so the tests that need one give
the store a table as its resolver; etcd, the channel and the addresses are real.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from discovery import etcd_endpoints
from discovery.config import ServerConfig
from discovery.devtools.etcd import EtcdCluster, EtcdProcess, EtcdServerTls
from discovery.devtools.process import free_ports
from discovery.errors import StoreUnavailable
from discovery.security.certs import CertificateAuthority
from discovery.server import Server
from discovery.store import PROBE, EtcdTls, Store
from discovery.tasks import stop_task
from tests.support.helpers import eventually


class Names:
    """A resolver from a table the test changes; counts the look-ups."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups = 0

    async def __call__(self, name: str) -> Sequence[str]:
        self.lookups += 1
        if name not in self.table:
            raise OSError(-2, "Name or service not known")
        return self.table[name]


async def _put_until_it_works(store: Store, key: bytes, timeout: float = 15.0) -> int:
    """A write, tried again while etcd elects a leader or the store moves to other addresses."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                revision, _, _ = await store.put(key, b"v")
                return revision
            except StoreUnavailable:
                await asyncio.sleep(0.1)


async def test_a_name_that_resolves_is_dialled_at_its_address(etcd: EtcdProcess, key_prefix: str) -> None:
    prefix = key_prefix.encode()
    async with Store([f"localhost:{etcd.client_port}"]) as store:
        assert store.addresses == (f"127.0.0.1:{etcd.client_port}",)
        revision, _, _ = await store.put(prefix + b"k", b"v")
        found = await store.get(prefix + b"k")
        assert found is not None and found.mod_revision == revision


async def test_an_ipv6_member(tmp_path: Path, key_prefix: str) -> None:
    member = EtcdProcess(tmp_path / "etcd", client_host="::1").start()
    try:
        async with Store([member.endpoint]) as store:
            assert member.endpoint.startswith("[::1]:")
            await store.put(key_prefix.encode() + b"k", b"v")
            assert await store.get(key_prefix.encode() + b"k") is not None
    finally:
        member.stop()


async def test_a_name_that_does_not_resolve_is_named_and_picked_up_once_it_does(
    etcd: EtcdProcess, key_prefix: str
) -> None:
    names = Names({})
    endpoint = f"etcd.test:{etcd.client_port}"
    async with Store([endpoint], lookup=names) as store:
        health = await store.health()
        assert not health.healthy
        assert f"etcd endpoint {endpoint} (Name or service not known) does not resolve" in health.error
        with pytest.raises(StoreUnavailable, match=endpoint):
            await store.put(key_prefix.encode() + b"k", b"v")
        names.table["etcd.test"] = ["127.0.0.1"]  # the member's name appears in DNS
        await _put_until_it_works(store, key_prefix.encode() + b"k", timeout=5)
        assert store.addresses == (f"127.0.0.1:{etcd.client_port}",)


async def test_the_real_resolver_names_what_does_not_resolve(etcd: EtcdProcess) -> None:
    endpoint = f"nosuch.invalid:{etcd.client_port}"
    async with Store([endpoint]) as store:
        health = await store.health()
    assert not health.healthy and f"etcd endpoint {endpoint} (" in health.error and "does not resolve" in health.error


async def test_a_server_stops_at_start_naming_the_name(etcd: EtcdProcess, key_prefix: str) -> None:
    server = Server(_config(key_prefix, f"nosuch.invalid:{etcd.client_port}"), startup_timeout=1.5)
    with pytest.raises(StoreUnavailable, match=rf"nosuch\.invalid:{etcd.client_port} .*does not resolve"):
        await server.__aenter__()
    await server.stop()


async def test_a_server_on_a_name_serves(etcd: EtcdProcess, key_prefix: str) -> None:
    server = Server(_config(key_prefix, f"localhost:{etcd.client_port}"), startup_timeout=10)
    await server.__aenter__()
    try:
        assert server.store.addresses == (f"127.0.0.1:{etcd.client_port}",)
        assert (await server.store.health()).healthy
    finally:
        await server.stop()


def _config(key_prefix: str, etcd: str) -> ServerConfig:
    return ServerConfig(
        region="us-east", listen="127.0.0.1:0", etcd=(etcd,), key_prefix=key_prefix, insecure=True
    ).validate()


@pytest.fixture
def dual(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three members: 0 on 127.0.0.1:P, 1 on [::1]:P (so one name can resolve to both at one
    port), 2 on 127.0.0.1:Q for the quorum."""
    p, q, *peers = free_ports(5)
    cluster = EtcdCluster(tmp_path, 3, ports=[p, p, q, *peers], client_hosts=["127.0.0.1", "::1", "127.0.0.1"])
    cluster.start()
    yield cluster
    cluster.stop()


async def test_a_killed_member_is_passed_over_for_another_address_of_its_name(
    dual: EtcdCluster, key_prefix: str
) -> None:
    port = dual.members[0].client_port
    names = Names({"etcd.test": ["127.0.0.1", "::1"]})
    prefix = key_prefix.encode()
    async with Store([f"etcd.test:{port}"], lookup=names, keepalive=0.5, op_timeout=2.0) as store:
        assert store.addresses == (f"127.0.0.1:{port}", f"[::1]:{port}")
        for i in range(10):  # both addresses in use (round robin)
            await store.put(prefix + b"before%d" % i, b"v")
        dual.kill_member(0)
        # Only [::1]:P is left of the name (member 2 is not among the endpoints).
        revision = await _put_until_it_works(store, prefix + b"after")
        for i in range(10):
            assert (await store.put(prefix + b"after%d" % i, b"v"))[0] > revision
        assert store.addresses == (f"127.0.0.1:{port}", f"[::1]:{port}")  # nothing to re-resolve: it is the same name


async def test_a_name_that_moves_is_followed_after_a_failure(dual: EtcdCluster, key_prefix: str) -> None:
    port = dual.members[0].client_port
    names = Names({"etcd.test": ["127.0.0.1"]})
    prefix = key_prefix.encode()
    # resolve_every far beyond the test: only the failure can make the store look again.
    async with Store([f"etcd.test:{port}"], lookup=names, op_timeout=2.0, resolve_every=3600) as store:
        await store.put(prefix + b"before", b"v")
        assert store.addresses == (f"127.0.0.1:{port}",)
        names.table["etcd.test"] = ["::1"]  # the member is rescheduled: its name moves
        dual.kill_member(0)
        await _put_until_it_works(store, prefix + b"after")
        assert store.addresses == (f"[::1]:{port}",)
        assert await store.get(prefix + b"before") is not None


async def test_a_name_is_resolved_again_periodically_and_the_watch_moves_without_a_loss(
    dual: EtcdCluster, key_prefix: str
) -> None:
    port = dual.members[0].client_port
    prefix = key_prefix.encode()
    names = Names({"etcd.test": ["127.0.0.1"]})
    async with Store([f"etcd.test:{port}"], lookup=names, resolve_every=0.2) as store:
        first, _, _ = await store.put(prefix + b"before", b"v")
        seen: list[bytes] = []
        created = asyncio.Event()
        done = asyncio.Event()

        async def follow() -> None:
            async for batch in store.watch(prefix, first):
                if batch.created:
                    created.set()
                seen.extend(e.kv.key for e in batch.events)
                if prefix + b"after" in seen:
                    done.set()
                    return

        watching = asyncio.create_task(follow())
        try:
            async with asyncio.timeout(10):
                await created.wait()
            old_channel = store.channel
            names.table["etcd.test"] = ["127.0.0.1", "::1"]  # a member added under the name
            both = (f"127.0.0.1:{port}", f"[::1]:{port}")

            async def moved() -> bool:
                return store.addresses == both

            await eventually(moved)
            assert store.channel is not old_channel
            await store.put(prefix + b"after", b"v")  # on the new channel
            async with asyncio.timeout(10):
                await done.wait()
        finally:
            await stop_task(watching)
        assert seen == [prefix + b"before", prefix + b"after"]


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdProcess, EtcdServerTls]]:
    base = tmp_path_factory.mktemp("etcd-tls-names")
    files = EtcdServerTls.issue(CertificateAuthority.create(base / "ca"), base / "tls")  # for localhost, 127.0.0.1
    member = EtcdProcess(base / "etcd", tls=files).start()
    yield member, files
    member.stop()


async def test_tls_checks_the_certificate_against_the_name(tls_etcd: tuple[EtcdProcess, EtcdServerTls]) -> None:
    member, files = tls_etcd
    endpoint = f"localhost:{member.client_port}"
    health_key = b"/discovery/v1/" + PROBE + b"health"
    async with Store([endpoint], tls=EtcdTls(files.ca, files.root_cert, files.root_key)) as store:
        assert (await store.health()).healthy  # checked against "localhost", which the certificate carries
    wrong = EtcdTls(files.ca, files.root_cert, files.root_key, server_name="etcd.example.org")
    async with Store([endpoint], tls=wrong, op_timeout=1.0, health_key=health_key) as store:
        health = await store.health()
        assert not health.healthy


def test_the_target_of_the_dual_member_pair_mixes_families() -> None:
    assert etcd_endpoints.target(["127.0.0.1:1", "[::1]:1"]).startswith("ipv6:[::ffff:127.0.0.1]:1,")
