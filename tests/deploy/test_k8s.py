"""Each region's overlay rendered with `kubectl kustomize`, validated strictly against the
Kubernetes 1.30 and 1.37 schemas (kubernetes-validate ships them), and held to what
deploy/README.md promises of the rendered objects."""

from __future__ import annotations

import tomllib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.support import (
    DEPLOY,
    MIN_ETCD,
    NEAREST,
    REGIONS,
    etcd_version,
    flag,
    peer_regions,
    port,
    run,
    seconds,
    tool,
)

KUBERNETES = ("1.30.0", "1.37.0")
Obj = dict[str, Any]

_rendered: dict[str, list[Obj]] = {}


def render(region: str) -> list[Obj]:
    if region not in _rendered:
        result = run(tool("kubectl"), "kustomize", str(DEPLOY / "k8s/overlays" / region))
        assert result.returncode == 0, result.stderr
        _rendered[region] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _rendered[region]


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container(obj: Obj, name: str) -> Obj:
    return next(c for c in pod_spec(obj)["containers"] if c["name"] == name)


def server_config(objects: list[Obj]) -> dict[str, Any]:
    maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("discovery-config-")]
    assert len(maps) == 1, "one generated discovery-config (a hash suffix: a change rolls the pods)"
    return tomllib.loads(maps[0]["data"]["server.toml"])


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


WORKLOADS = ("Deployment", "StatefulSet", "CronJob")


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("region", REGIONS)
def test_overlay_validates_strictly(region: str, version: str) -> None:
    objects = render(region)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "StatefulSet", "Deployment", "CronJob", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{region} {obj['kind']}/{obj['metadata']['name']} against {version}: {e.message}")


def test_validation_catches_an_unknown_field() -> None:
    """The strict check is live: a misspelt field is refused, not ignored."""
    pdb = dict(one(render("us-east"), "PodDisruptionBudget", "etcd"))
    pdb["spec"] = {**pdb["spec"], "maxUnavialable": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pdb, KUBERNETES[-1], strict=True)


@pytest.mark.parametrize("region", REGIONS)
def test_every_object_is_in_the_region_namespace(region: str) -> None:
    for obj in render(region):
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == region
        else:
            assert obj["metadata"]["namespace"] == region, obj["metadata"]["name"]


@pytest.mark.parametrize("region", REGIONS)
def test_disruption_budgets_and_services_select_their_workloads(region: str) -> None:
    objects = render(region)
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        selected = [w for w in workloads if matches(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {len(selected)} workloads"
        assert matches(selector, selected[0]["spec"]["selector"]["matchLabels"])
        assert pdb["spec"].get("maxUnavailable") == 1
    budgeted = {w["metadata"]["name"] for w in workloads}
    assert budgeted == {"etcd", "discovery"}
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert any(matches(selector, w["spec"]["template"]["metadata"]["labels"]) for w in workloads), service


@pytest.mark.parametrize("region", REGIONS)
def test_pods_run_unprivileged_with_a_read_only_root(region: str) -> None:
    for obj in (o for o in render(region) if o["kind"] in WORKLOADS):
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
        assert spec["securityContext"]["runAsUser"] != 0
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]


@pytest.mark.parametrize("region", REGIONS)
def test_etcd_statefulset(region: str) -> None:
    objects = render(region)
    sts = one(objects, "StatefulSet", "etcd")
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"] == {"type": "OnDelete"}  # roll-etcd.sh rolls it
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]
    headless = one(objects, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    pod = pod_spec(sts)
    required = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert [t["topologyKey"] for t in required] == ["kubernetes.io/hostname"]
    assert [t["topologyKey"] for t in pod["topologySpreadConstraints"]] == ["topology.kubernetes.io/zone"]
    etcd = container(sts, "etcd")
    assert etcd_version(etcd["image"]) >= MIN_ETCD, etcd["image"]
    assert "lifecycle" not in etcd, "no preStop member removal: a stopped member comes back with its volume"
    assert "preStop" not in yaml.safe_dump(sts)
    args = etcd["args"]
    assert seconds(flag(args, "--grpc-keepalive-min-time")) <= 1.0
    members = flag(args, "--initial-cluster").split(",")
    assert [m.split("=")[0] for m in members] == ["etcd-0", "etcd-1", "etcd-2"]
    assert all(m.endswith(".etcd.$(POD_NAMESPACE).svc:2380") for m in members), members
    # probes on the plaintext metrics listener; client-certificate auth stays on 2379
    metrics = flag(args, "--listen-metrics-urls")
    assert metrics.startswith("http://"), metrics
    named = {p["name"]: p["containerPort"] for p in etcd["ports"]}
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = etcd[probe]["httpGet"]
        assert get["path"] == path and named[get["port"]] == port(metrics), probe
    assert "--client-cert-auth" in args and "--peer-client-cert-auth" in args
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"etcd-client-tls", "etcd-peer-tls"}


@pytest.mark.parametrize("region", REGIONS)
def test_etcd_snapshot_cronjob(region: str) -> None:
    objects = render(region)
    job = one(objects, "CronJob", "etcd-snapshot")
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    save = pod_spec(job)["initContainers"][0]
    assert save["args"][-3:-1] == ["snapshot", "save"]
    assert etcd_version(save["image"]) >= MIN_ETCD
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["etcd-snapshots"]
    one(objects, "PersistentVolumeClaim", "etcd-snapshots")


@pytest.mark.parametrize("region", REGIONS)
def test_discovery_deployment(region: str) -> None:
    objects = render(region)
    deployment = one(objects, "Deployment", "discovery")
    config = server_config(objects)
    assert config["region"] == region
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = pod_spec(deployment)
    server = container(deployment, "discovery")
    assert server["args"][0] == "serve"
    assert flag(server["args"], "--advertise") == "$(POD_IP):" + str(port(config["listen"]))
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in server["env"]
    # native gRPC probes on the plaintext health listener
    health = port(config["health_listen"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == health, probe
    assert health != port(config["listen"])
    # preStop pause, then SIGTERM and the server's own grace: the pod's grace is longer
    pause = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pause[1]) + config.get("grace_seconds", 5.0)
    anti = pod["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"]
    # config, policy and certificates mounted where server.toml looks
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = volumes["config"]["configMap"]["name"]
    assert config_map.startswith("discovery-config-"), "the generated (hashed) ConfigMap"
    assert flag(server["args"], "--config") == mounts["config"] + "/server.toml"
    assert config["policy_file"] == mounts["policy"] + "/policy.toml"
    assert volumes["policy"]["configMap"]["name"].startswith("discovery-policy-")
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        assert config[key].startswith(mounts["tls"] + "/"), key
    for key in ("etcd_ca", "etcd_cert", "etcd_key"):
        assert config[key].startswith(mounts["etcd-tls"] + "/"), key
    assert volumes["tls"]["secret"]["secretName"] == "discovery-tls"
    assert volumes["etcd-tls"]["secret"]["secretName"] == "discovery-etcd-tls"
    # every listener the server has is a container port
    ports = {(p["containerPort"], p.get("protocol", "TCP")) for p in server["ports"]}
    for key in ("listen", "health_listen", "http_listen", "metrics_listen", "dns_listen"):
        assert (port(config[key]), "TCP") in ports, key
    assert (port(config["dns_listen"]), "UDP") in ports
    assert port(config["dns_listen"]) >= 1024, "unprivileged in the container"


@pytest.mark.parametrize("region", REGIONS)
def test_server_config_etcd_and_peers(region: str) -> None:
    config = server_config(render(region))
    assert config["etcd"] == [f"etcd-{i}.etcd.{region}.svc:2379" for i in range(3)]
    peers = peer_regions(config)
    assert region not in peers
    assert sorted(peers) == sorted(r for r in REGIONS if r != region)
    assert peers == NEAREST[region]


@pytest.mark.parametrize("region", REGIONS)
def test_services(region: str) -> None:
    objects = render(region)
    config = server_config(objects)
    dns = one(objects, "Service", "discovery-dns")
    assert {(p["port"], p["protocol"]) for p in dns["spec"]["ports"]} == {(53, "UDP"), (53, "TCP")}
    peer = one(objects, "Service", "discovery-peer")
    assert peer["spec"]["type"] == "LoadBalancer" and peer["metadata"].get("annotations"), "internal LB: the overlay's"
    client = one(objects, "Service", "discovery")
    assert [p["port"] for p in client["spec"]["ports"]] == [port(config["listen"])]
    http = one(objects, "Service", "discovery-http")
    assert {p["port"] for p in http["spec"]["ports"]} == {port(config["http_listen"]), port(config["metrics_listen"])}


def _sources(policy: Obj, port_number: int) -> list[Obj]:
    return [
        source
        for rule in policy["spec"]["ingress"]
        if any(p["port"] == port_number for p in rule["ports"])
        for source in rule["from"]
    ]


@pytest.mark.parametrize("region", REGIONS)
def test_network_policies(region: str) -> None:
    objects = render(region)
    etcd = one(objects, "NetworkPolicy", "etcd")
    assert etcd["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "etcd"}
    peer_sources = _sources(etcd, 2380)
    assert peer_sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "etcd"}}}]
    client_apps = {s["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for s in _sources(etcd, 2379)}
    assert client_apps == {"discovery", "etcd", "etcd-snapshot"}
    discovery = one(objects, "NetworkPolicy", "discovery")
    grpc_sources = _sources(discovery, 7400)
    blocks = [s["ipBlock"]["cidr"] for s in grpc_sources if "ipBlock" in s]
    assert len(blocks) == len(REGIONS) - 1, "one address block per other region"
    assert "192.0.2.0/24" not in blocks, "the base's placeholder is replaced by the overlay"


@pytest.mark.parametrize("version", KUBERNETES)
def test_restore_job_validates_once_filled_in(version: str) -> None:
    text = (DEPLOY / "k8s/runbooks/etcd-restore.yaml").read_text()
    filled = text.replace("MEMBER", "etcd-1").replace("SNAPSHOT", "etcd-20261201T001700Z.db")
    job = yaml.safe_load(filled)
    kubernetes_validate.validate(job, version, strict=True)
    pod = job["spec"]["template"]["spec"]
    (restore,) = pod["containers"]
    assert etcd_version(restore["image"]) >= MIN_ETCD
    assert flag(restore["args"], "--data-dir") == "/var/lib/etcd/data", "where the StatefulSet's etcd looks"
    assert flag(restore["args"], "--name") == "etcd-1"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims == {"data-etcd-1", "etcd-snapshots"}
    sts = one(render("us-east"), "StatefulSet", "etcd")
    assert flag(container(sts, "etcd")["args"], "--data-dir") == "/var/lib/etcd/data"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] + "-etcd-1" == "data-etcd-1"
