"""`discovery serve --check-config` on every config file shipped under deploy/: it validates
everything serve would, without etcd, and exits 0, or 2 naming the offending key.

The Kubernetes configs name files mounted from Secrets (/etc/discovery/tls/...): here the
certificates come from a CA made for the test, given as flags (flags win over the file), and
the policy is the one the base ships (deploy/k8s/base/policy.toml). Every other key is the
file's own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from discovery.security.certs import CA_CERT, CertificateAuthority, server_id
from tests.deploy.support import DEPLOY, REGIONS, load_toml, run

COMPOSE_CONFIGS = sorted((DEPLOY / "compose/config").glob("*.toml"))
K8S_CONFIGS = sorted((DEPLOY / "k8s/overlays").glob("*/server.toml"))
POLICY = DEPLOY / "k8s/base/policy.toml"


def check_config(config: Path, *flags: str) -> tuple[int, str]:
    result = run(sys.executable, "-m", "discovery", "serve", "--check-config", "--config", str(config), *flags)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertificateAuthority, Path]:
    directory = tmp_path_factory.mktemp("ca")
    return CertificateAuthority.create(directory), directory / CA_CERT


def tls_flags(ca: tuple[CertificateAuthority, Path], region: str, directory: Path) -> list[str]:
    authority, ca_path = ca
    config = load_toml(DEPLOY / f"k8s/overlays/{region}/server.toml")
    server_identity = server_id(config["trust_domain"], region)
    server = authority.issue(spiffe_id=server_identity, dns=("localhost",), out=directory / "server")
    etcd = authority.issue(common_name=f"discovery-{region}", out=directory / "etcd")
    return [
        f"--tls-cert={server.cert_path}",
        f"--tls-key={server.key_path}",
        f"--tls-client-ca={ca_path}",
        f"--policy={POLICY}",
        f"--etcd-ca={ca_path}",
        f"--etcd-cert={etcd.cert_path}",
        f"--etcd-key={etcd.key_path}",
    ]


def test_every_region_ships_both_configs() -> None:
    assert [p.stem for p in COMPOSE_CONFIGS] == sorted(REGIONS)
    assert sorted(p.parent.name for p in K8S_CONFIGS) == sorted(REGIONS)


@pytest.mark.parametrize("config", COMPOSE_CONFIGS, ids=lambda p: p.stem)
def test_compose_config_checks(config: Path) -> None:
    code, output = check_config(config)
    assert code == 0, output
    assert config.stem in output, "prints the effective configuration"


@pytest.mark.parametrize("config", K8S_CONFIGS, ids=lambda p: p.parent.name)
def test_kubernetes_config_checks(config: Path, ca: tuple[CertificateAuthority, Path], tmp_path: Path) -> None:
    code, output = check_config(config, *tls_flags(ca, config.parent.name, tmp_path))
    assert code == 0, output
    assert config.parent.name in output, "prints the effective configuration"


def test_check_config_names_the_offending_key(tmp_path: Path) -> None:
    """The check is live: a shipped file with its own region among its peers is refused."""
    config = COMPOSE_CONFIGS[0]
    region = load_toml(config)["region"]
    broken = tmp_path / "broken.toml"
    broken.write_text(config.read_text().replace("peers = [", f'peers = [\n  "{region}=127.0.0.1:7400",', 1))
    code, output = check_config(broken)
    assert code == 2, output
    assert "peers" in output
