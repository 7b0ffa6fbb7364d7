"""``discovery xds-bootstrap`` and ``discovery xds-clients``, as a user runs them."""

from __future__ import annotations

import json

from tests.integration.test_cli import run
from tests.support.helpers import register


async def test_a_stock_client_runs_on_the_printed_bootstrap_and_shows_in_xds_clients(
    server, connect, backends, stock_clients
) -> None:
    (w1,) = await backends.start("w1")
    await register(connect(server), "web", w1.address, instance_id="w1")
    code, out, err = await run("xds-bootstrap", "--server", server.address, "--region", "us-east")
    assert code == 0 and not err, err
    config = json.loads(out)
    assert config["xds_servers"][0]["server_uri"] == server.address
    assert config["node"]["locality"] == {"region": "us-east"}

    client = await stock_clients.start(server.address, "web", config=out)
    await client.until(lambda c: c.answers()[-3:] == ["w1"] * 3, timeout=15)

    code, out, err = await run("xds-clients", "--server", server.address, "--json")
    assert code == 0, err
    rows = {(r["type"], r["name"]): (r["node"], r["client"], r["sync"]) for r in json.loads(out)}
    fine = ("discovery-xds-client", "ACKED", "SYNCED")
    assert rows == {("Listener", "web"): fine, ("Cluster", "web"): fine, ("ClusterLoadAssignment", "web"): fine}
    code, out, _ = await run("xds-clients", "--server", server.address)
    assert code == 0 and out.splitlines()[0].split() == [
        "stream",
        "node",
        "peer",
        "type",
        "name",
        "version",
        "client",
        "sync",
        "error",
    ]


async def test_xds_bootstrap_rejects_a_bad_address_with_exit_2() -> None:
    code, out, err = await run("xds-bootstrap", "--server", "no-port")
    assert code == 2 and not out and "--server" in err and len(err.splitlines()) == 1
