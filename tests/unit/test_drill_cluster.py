"""The drill's cluster file: what ``discovery dev`` writes, what a person may write, and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from discovery.drill.cluster import ClusterFile, ClusterFileError

PATH = Path("/tmp/dc/cluster.json")


def dev_style() -> dict[str, Any]:
    """As ``discovery dev`` describes its cluster."""
    return {
        "regions": {
            "us-east": {
                "servers": [{"address": "127.0.0.1:7400", "pid": 10}, {"address": "127.0.0.1:7401", "pid": 11}],
                "etcd": [{"address": "127.0.0.1:40213", "pid": 9}],
            },
            "eu-west": {
                "servers": [{"address": "127.0.0.1:7410", "pid": 20}],
                "etcd": [{"address": "127.0.0.1:40214", "pid": 19}],
            },
        },
        "state_dir": "/tmp/dc",
        "control": "127.0.0.1:39145",
        "routes": {
            "us-east": {"eu-west": ["127.0.0.1:41877"]},
            "eu-west": {"us-east": ["127.0.0.1:41878", "127.0.0.1:41879"]},
        },
    }


def plain() -> dict[str, Any]:
    """Written by hand: addresses as strings, no control endpoint, no routes."""
    return {
        "regions": {
            "a": {"servers": ["10.0.0.1:7400"], "etcd": ["10.0.0.1:2379", "10.0.0.2:2379"]},
            "b": {"servers": ["10.1.0.1:7400", "10.1.0.2:7400"]},
        }
    }


def parse_error(raw: Any) -> str:
    with pytest.raises(ClusterFileError) as info:
        ClusterFile.parse(PATH, raw)
    return str(info.value)


def test_a_dev_cluster_file_gives_regions_in_file_order() -> None:
    cluster = ClusterFile.parse(PATH, dev_style())
    assert cluster.names == ("us-east", "eu-west")
    assert cluster.regions[0].servers == ("127.0.0.1:7400", "127.0.0.1:7401")
    assert cluster.regions[0].etcd == ("127.0.0.1:40213",)
    assert cluster.path == PATH


def test_a_dev_cluster_file_gives_control_and_routes() -> None:
    cluster = ClusterFile.parse(PATH, dev_style())
    assert cluster.control == "127.0.0.1:39145"
    assert cluster.routes == {
        "us-east": {"eu-west": ("127.0.0.1:41877",)},
        "eu-west": {"us-east": ("127.0.0.1:41878", "127.0.0.1:41879")},
    }


def test_plain_host_port_strings_are_addresses() -> None:
    cluster = ClusterFile.parse(PATH, plain())
    assert cluster.region("a").servers == ("10.0.0.1:7400",)
    assert cluster.region("a").etcd == ("10.0.0.1:2379", "10.0.0.2:2379")
    assert cluster.region("b").servers == ("10.1.0.1:7400", "10.1.0.2:7400")


def test_without_control_or_routes_there_are_none() -> None:
    cluster = ClusterFile.parse(PATH, plain())
    assert cluster.control is None
    assert cluster.routes == {}
    assert cluster.region("b").etcd == ()


def test_an_empty_control_is_none() -> None:
    raw = plain() | {"control": ""}
    assert ClusterFile.parse(PATH, raw).control is None


def test_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(dev_style()))
    cluster = ClusterFile.load(path)
    assert cluster.names == ("us-east", "eu-west")
    assert cluster.path == path


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ClusterFileError, match="no such file") as info:
        ClusterFile.load(path)
    assert str(path) in str(info.value)


def test_a_file_that_is_not_json_says_so(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text("regions: [a, b]\n")
    with pytest.raises(ClusterFileError, match="cannot read it as JSON"):
        ClusterFile.load(path)


@pytest.mark.parametrize("raw", [[], {"regions": {}}, {"regions": []}, {"servers": ["h:1"]}])
def test_no_regions_says_so(raw: Any) -> None:
    assert "non-empty 'regions' object" in parse_error(raw)


def test_a_region_without_servers_is_named() -> None:
    raw = plain()
    raw["regions"]["b"]["servers"] = []
    assert "region 'b' lists no servers" in parse_error(raw)


def test_a_region_with_no_servers_key_is_named() -> None:
    raw = plain()
    del raw["regions"]["b"]["servers"]
    assert "region 'b' lists no servers" in parse_error(raw)


def test_one_region_is_not_enough_for_a_drill() -> None:
    raw = plain()
    del raw["regions"]["b"]
    assert "at least two regions, the file has 1" in parse_error(raw)


@pytest.mark.parametrize(
    "item",
    ["10.0.0.1", 7400, None, {"pid": 3}, {"address": 7400}],
    ids=["no-port", "int", "null", "no-address", "int-address"],
)
def test_a_bad_address_is_named(item: Any) -> None:
    raw = plain()
    raw["regions"]["b"]["servers"] = [item]
    message = parse_error(raw)
    assert "regions.b.servers" in message
    assert "is not host:port" in message


def test_a_bad_etcd_address_is_named() -> None:
    raw = plain()
    raw["regions"]["a"]["etcd"] = ["localhost"]
    assert "regions.a.etcd: 'localhost' is not host:port" in parse_error(raw)


def test_servers_not_a_list_is_named() -> None:
    raw = plain()
    raw["regions"]["a"]["servers"] = "10.0.0.1:7400"
    assert "regions.a.servers must be a list" in parse_error(raw)


def test_a_region_that_is_not_an_object_is_named() -> None:
    raw = plain()
    raw["regions"]["a"] = ["10.0.0.1:7400"]
    assert "regions.a.servers must be a list" in parse_error(raw)


def test_errors_name_the_file() -> None:
    assert str(PATH) in parse_error({"regions": {}})


def test_a_route_that_is_not_a_list_is_named() -> None:
    raw = plain() | {"routes": {"a": {"b": "127.0.0.1:41877"}}}
    assert "routes" in parse_error(raw)


def test_routes_that_are_not_an_object_are_named() -> None:
    raw = plain() | {"routes": ["127.0.0.1:41877"]}
    assert "routes" in parse_error(raw)


def test_servers_seen_from_go_through_the_proxy_routes() -> None:
    cluster = ClusterFile.parse(PATH, dev_style())
    assert cluster.servers_seen_from("us-east", "eu-west") == ("127.0.0.1:41877",)
    assert cluster.servers_seen_from("eu-west", "us-east") == ("127.0.0.1:41878", "127.0.0.1:41879")


def test_servers_seen_from_without_routes_are_the_servers_themselves() -> None:
    cluster = ClusterFile.parse(PATH, plain())
    assert cluster.servers_seen_from("a", "b") == ("10.1.0.1:7400", "10.1.0.2:7400")


def test_servers_seen_from_a_region_without_a_route_to_that_peer_are_the_servers() -> None:
    raw = dev_style()
    raw["routes"]["us-east"] = {}
    cluster = ClusterFile.parse(PATH, raw)
    assert cluster.servers_seen_from("us-east", "eu-west") == ("127.0.0.1:7410",)


def test_an_unknown_region_names_the_known_ones() -> None:
    cluster = ClusterFile.parse(PATH, dev_style())
    with pytest.raises(ClusterFileError) as info:
        cluster.region("ap-south")
    message = str(info.value)
    assert "no region 'ap-south'" in message
    assert "us-east, eu-west" in message


def test_servers_seen_from_an_unknown_region_without_a_route_raises() -> None:
    cluster = ClusterFile.parse(PATH, plain())
    with pytest.raises(ClusterFileError, match="no region 'c'"):
        cluster.servers_seen_from("a", "c")


def test_a_cluster_file_error_is_a_value_error() -> None:
    # run_drill turns ValueErrors from region() into usage errors.
    assert issubclass(ClusterFileError, ValueError)


def test_tls_paths_are_relative_to_the_file_or_absolute() -> None:
    raw = plain() | {"tls": {"ca": "tls/ca.pem", "cert": "/etc/x/admin.pem", "key": "tls/admin-key.pem"}}
    raw["tls"]["trust_domain"] = "example.org"
    cluster = ClusterFile.parse(PATH, raw)
    assert cluster.tls is not None
    assert (cluster.tls.ca, cluster.tls.cert, cluster.tls.key) == (
        "/tmp/dc/tls/ca.pem",
        "/etc/x/admin.pem",
        "/tmp/dc/tls/admin-key.pem",
    )
    assert not cluster.tls.insecure and cluster.trust_domain == "example.org"


def test_without_tls_the_clients_take_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = ClusterFile.parse(PATH, plain())
    assert cluster.tls is None and cluster.trust_domain == ""
    monkeypatch.setenv("DISCOVERY_INSECURE", "1")
    assert cluster.client_tls().insecure
    monkeypatch.delenv("DISCOVERY_INSECURE")
    with pytest.raises(ClusterFileError, match="no TLS settings"):
        cluster.client_tls()


def test_tls_files_that_cannot_be_read_are_named_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    cluster = ClusterFile.parse(path, plain() | {"tls": {"ca": "ca.pem", "cert": "a.pem", "key": "a-key.pem"}})
    with pytest.raises(ClusterFileError, match=r"cluster\.json: tls: TLS ca file .*ca\.pem .*cannot read"):
        cluster.client_tls()


@pytest.mark.parametrize("tls", ["x", {"ca": "ca.pem"}, {"ca": 1, "cert": "c", "key": "k"}])
def test_a_bad_tls_object_is_named(tls: Any) -> None:
    assert "tls" in parse_error(plain() | {"tls": tls})
