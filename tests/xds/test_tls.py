"""A stock gRPC client (``xds:///``) against a server that serves mTLS: with the ``tls``
channel credentials `discovery xds-bootstrap` writes it resolves, without them it cannot,
and a name its identity may not read never resolves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from discovery.cli.xds import channel_creds
from discovery.xds import bootstrap
from discovery_client import TlsConfig
from tests.support.helpers import register
from tests.support.secure import ADMIN, Pki, svc
from tests.support.servers import Stubs


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def tls_bootstrap(pki: Pki, address: str, identity: str) -> str:
    issued = pki.client(identity)
    config = bootstrap(address)
    tls = TlsConfig(str(pki.ca_path), str(issued.cert_path), str(issued.key_path))
    config["xds_servers"][0]["channel_creds"] = channel_creds(tls)
    return json.dumps(config)


async def test_a_stock_client_resolves_over_mtls_and_not_without(etcd, servers, pki, backends, stock_clients) -> None:
    server = await servers.start(etcd, **pki.settings("us-east"))
    admin = Stubs(pki.channel(f"127.0.0.1:{server.port}", pki.client(ADMIN)))
    (b1,) = await backends.start("b1")
    await register(admin, "web", b1.address, instance_id="b1")
    await register(admin, "payments", b1.address, instance_id="p1")

    secure = await stock_clients.start(server.address, "web", config=tls_bootstrap(pki, server.address, svc("web")))
    await secure.until(lambda c: c.answers()[-3:] == ["b1"] * 3, timeout=15)

    plain = await stock_clients.start(server.address, "web")  # insecure channel_creds: the handshake fails
    await plain.until(lambda c: len(c.errors()) >= 3, timeout=15)
    assert not plain.answers()
    await admin.channel.close()


async def test_a_stock_client_cannot_resolve_what_it_may_not_read(etcd, servers, pki, backends, stock_clients) -> None:
    policy = pki.policy(
        f"""
        [[grant]]
        identity = "{ADMIN}"
        admin = true
        register = ["*"]
        read = ["*"]

        [[grant]]
        identity = "{svc("web")}"
        read = ["web"]
        """,
        name="narrow.toml",
    )
    server = await servers.start(etcd, **pki.settings("us-east", policy=policy))
    admin = Stubs(pki.channel(f"127.0.0.1:{server.port}", pki.client(ADMIN)))
    (b1,) = await backends.start("b1")
    await register(admin, "payments", b1.address, instance_id="p1")
    client = await stock_clients.start(
        server.address, "payments", config=tls_bootstrap(pki, server.address, svc("web"))
    )
    await client.until(lambda c: len(c.errors()) >= 3, timeout=30)
    assert not client.answers()
    await admin.channel.close()
