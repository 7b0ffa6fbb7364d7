"""A stock gRPC client (``xds:///``) against a server that serves mTLS: with the ``tls``
channel credentials `discovery xds-bootstrap` writes it resolves, without them it cannot,
and a name its identity may not read never resolves."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from discovery.cli.xds import channel_creds
from discovery.xds import ENDPOINTS, bootstrap
from discovery_client import TlsConfig
from tests.support.helpers import register
from tests.support.secure import ADMIN, ADMIN_GRANT, Pki, svc
from tests.support.servers import Stubs
from tests.xds.ads_client import AdsClient


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
        {ADMIN_GRANT}

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


async def test_a_policy_reload_ends_the_ads_streams_it_no_longer_allows(etcd, servers, pki) -> None:
    """Grants are checked as an ADS stream opens and per resource; a reload that takes away the
    read grant of a resource the stream has delivered ends it with PERMISSION_DENIED, one that
    denies the identity ends it with UNAUTHENTICATED, both audited. A stream that only asked
    for a name it could never read (answered with a resource error) and streams the new
    policy still allows go on."""

    def narrow(web_reads: str, deny: str = "") -> str:
        return f"""
            {deny}
            {ADMIN_GRANT}

            [[grant]]
            identity = "{svc("web")}"
            read = [{web_reads}]

            [[grant]]
            identity = "{svc("api")}"
            read = ["*"]
            """

    path = pki.policy(narrow('"web", "payments"'), name="narrow.toml")
    server = await servers.start(etcd, **pki.settings("us-east", policy=path))
    address = f"127.0.0.1:{server.port}"
    admin = Stubs(pki.channel(address, pki.client(ADMIN)))
    await register(admin, "web", "10.0.0.1:80", instance_id="w1")
    await register(admin, "payments", "10.0.0.2:80", instance_id="p1")
    channels = [pki.channel(address, pki.client(identity)) for identity in (svc("web"), svc("web"), svc("api"))]
    payments, own, other = (AdsClient(channel) for channel in channels)
    payments.subscribe_service("payments")
    own.subscribe_service("web")
    own.subscribe(ENDPOINTS, ["web", "secret"])  # "secret" it may never read: a resource error
    other.subscribe_service("payments")
    for client, service, address_ in ((payments, "payments", "10.0.0.2:80"), (own, "web", "10.0.0.1:80")):
        await client.until(lambda c, s=service, a=address_: a in c.endpoints(s), timeout=10)
    await other.until(lambda c: "10.0.0.2:80" in c.endpoints("payments"), timeout=10)

    # web may read only itself now: the stream that holds payments ends, the other goes on.
    pki.policy(narrow('"web"'), name="narrow.toml")
    server.reload()
    assert await payments.ended() == grpc.StatusCode.PERMISSION_DENIED
    await register(admin, "web", "10.0.0.3:80", instance_id="w2")
    await own.until(lambda c: "10.0.0.3:80" in c.endpoints("web"), timeout=10)

    # Deny web altogether: its remaining stream ends too; api's goes on.
    pki.policy(narrow('"web"', deny=f'deny = ["{svc("web")}"]'), name="narrow.toml")
    server.reload()
    assert await own.ended() == grpc.StatusCode.UNAUTHENTICATED
    await register(admin, "payments", "10.0.0.4:80", instance_id="p2")
    await other.until(lambda c: "10.0.0.4:80" in c.endpoints("payments"), timeout=10)

    denied = _denials(Path(server.config.audit_log))
    assert [(d["identity"], d["method"], d["code"], d.get("service")) for d in denied] == [
        (svc("web"), "StreamAggregatedResources", "PERMISSION_DENIED", "payments"),
        (svc("web"), "StreamAggregatedResources", "UNAUTHENTICATED", None),
    ]
    for client in (payments, own, other):
        await client.close()
    for channel in [*channels, admin.channel]:
        await channel.close()


def _denials(audit_log: Path) -> list[dict[str, str]]:
    lines = (json.loads(line) for line in audit_log.read_text().splitlines() if line.strip())
    return [line for line in lines if line["event"] == "denied"]
