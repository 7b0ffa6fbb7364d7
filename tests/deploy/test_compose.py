"""deploy/compose/compose.yaml validated against the Compose Specification's JSON schema
(vendored in tests/deploy/compose-spec/) and held to the same rules as the Kubernetes files."""

from __future__ import annotations

import json
import sys
from typing import Any

import jsonschema
import pytest
import yaml

from discovery.devtools.process import free_port
from tests.deploy.support import (
    DEPLOY,
    MIN_ETCD,
    NEAREST,
    REGIONS,
    ROOT,
    etcd_version,
    flag,
    load_toml,
    peer_regions,
    port,
    run,
    seconds,
)

COMPOSE = DEPLOY / "compose/compose.yaml"


def compose() -> dict[str, Any]:
    with COMPOSE.open() as f:
        return yaml.safe_load(f)  # type: ignore[no-any-return]


def schema() -> dict[str, Any]:
    return json.loads((ROOT / "tests/deploy/compose-spec/compose-spec.json").read_text())  # type: ignore[no-any-return]


def services(region: str, kind: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if n.startswith(f"{region}-{kind}-")}


def test_compose_file_matches_the_specification() -> None:
    validator = jsonschema.Draft7Validator(schema())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors


def test_schema_check_is_live() -> None:
    broken = compose()
    broken["services"]["us-east-etcd-1"]["healthcheck"]["intervall"] = "5s"
    assert list(jsonschema.Draft7Validator(schema()).iter_errors(broken))


@pytest.mark.parametrize("region", REGIONS)
def test_etcd_members(region: str) -> None:
    members = services(region, "etcd")
    assert len(members) == 3
    volumes = set()
    for member in members.values():
        assert etcd_version(member["image"]) >= MIN_ETCD
        args = member["command"]
        assert seconds(flag(args, "--grpc-keepalive-min-time")) <= 1.0
        cluster = flag(args, "--initial-cluster").split(",")
        assert sorted(m.split("=")[0] for m in cluster) == sorted(members)
        assert member["networks"] == [region], "etcd on its region's network only"
        (volume,) = member["volumes"]
        assert volume.endswith(":/var/lib/etcd") and flag(args, "--data-dir") == "/var/lib/etcd"
        volumes.add(volume.split(":")[0])
        assert member["healthcheck"]["test"][0] == "CMD"
        assert "endpoint" in member["healthcheck"]["test"] and "health" in member["healthcheck"]["test"]
        assert "ports" not in member, "etcd is not published"
        assert "lifecycle" not in member
    assert len(volumes) == 3 and volumes <= set(compose()["volumes"]), "a volume each"


@pytest.mark.parametrize("region", REGIONS)
def test_discovery_servers(region: str) -> None:
    servers = services(region, "discovery")
    assert len(servers) == 2
    for name, server in servers.items():
        (mount,) = server["volumes"]
        source, target = mount.split(":")[:2]
        config = load_toml(COMPOSE.parent / source)
        assert config["region"] == region
        assert server["command"][:3] == ["serve", "--config", target]
        assert server["command"][3:] == ["--advertise", f"{name}:{port(config['listen'])}"]
        assert sorted(server["networks"]) == sorted([region, "wan"])
        for published in server["ports"]:
            assert published.startswith("127.0.0.1:"), published
        health = server["healthcheck"]["test"]
        assert health[:3] == ["CMD", "discovery", "health"]
        assert health[health.index("--server") + 1] == f"127.0.0.1:{port(config['health_listen'])}"
        assert seconds(server["stop_grace_period"]) > config.get("grace_seconds", 5.0)
        assert server["read_only"] is True
        depends = server["depends_on"]
        assert set(depends) == set(services(region, "etcd"))
        assert all(d["condition"] == "service_healthy" for d in depends.values())
        assert config["etcd"] == [f"{m}:2379" for m in sorted(services(region, "etcd"))]
        peers = peer_regions(config)
        assert region not in peers and peers == NEAREST[region]
        for entry in config["peers"]:
            peer_region, addresses = entry.split("=", 1)
            assert addresses.split(",") == [f"{s}:7400" for s in sorted(services(peer_region, "discovery"))]


def test_published_ports_are_distinct_and_the_drill_file_names_them() -> None:
    published = [p.split(":")[1] for s in compose()["services"].values() for p in s.get("ports", [])]
    assert len(published) == len(set(published))
    drill = json.loads((DEPLOY / "compose/drill-cluster.json").read_text())
    assert list(drill["regions"]) == list(REGIONS)
    for region, entry in drill["regions"].items():
        grpc_ports = sorted(
            p.split(":")[1] for s in services(region, "discovery").values() for p in s["ports"] if p.endswith(":7400")
        )
        assert sorted(a.split(":")[1] for a in entry["servers"]) == grpc_ports


def test_server_healthcheck_command_runs() -> None:
    """The servers' healthcheck is a real command: `discovery health` with exactly these
    arguments parses and, with nothing serving at the address, exits 4 (not SERVING), not 2."""
    (name, server), *_ = services("us-east", "discovery").items()
    command = server["healthcheck"]["test"][1:]
    at = command.index("--server") + 1
    command[at] = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = run(sys.executable, "-m", "discovery", *command[1:], timeout=60)
    assert result.returncode == 4, f"{name}: {command}: {result.returncode} {result.stdout}{result.stderr}"
