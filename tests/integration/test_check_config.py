"""`discovery serve --check-config`: the checks serve makes before it starts, without etcd
or a listener; the effective configuration printed as a config serve reads back; exit 2
naming the setting, in serve's own words. Every config file shipped is checked."""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from discovery.config import ServerConfig, load
from discovery.devtools.etcd import EtcdServerTls
from discovery.security.policy import Policy
from tests.support.helpers import serve_help_config
from tests.support.secure import Pki

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "discovery"]


def check(tmp_path: Path, settings: dict[str, Any], *flags: str) -> tuple[int, str, str]:
    config = tmp_path / "server.toml"
    config.write_text("[server]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items()))
    done = run_serve(config, "--check-config", *flags)
    return done.returncode, done.stdout, done.stderr


def serve(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``serve`` itself on the config ``check`` wrote, for what stops it before it listens."""
    return run_serve(tmp_path / "server.toml")


def run_serve(config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "serve", "--config", str(config), *flags], capture_output=True, text=True, timeout=60, check=False
    )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def secure(pki: Pki, tmp_path: Path) -> dict[str, Any]:
    """A config serve would start with: mTLS, a policy, an audit log, etcd over TLS by name."""
    settings = pki.settings("us-east", audit=tmp_path / "audit.jsonl")
    del settings["reload_poll_seconds"]
    etcd_files = EtcdServerTls.issue(pki.ca, pki.dir / "etcd")
    return {
        "region": "us-east",
        "listen": "0.0.0.0:7400",
        "health_listen": "0.0.0.0:7401",
        "etcd": ["etcd-0.etcd.us-east.svc:2379", "etcd-1.etcd.us-east.svc:2379", "[fd00::3]:2379"],
        "etcd_ca": str(etcd_files.ca),
        "etcd_cert": str(etcd_files.root_cert),
        "etcd_key": str(etcd_files.root_key),
        "etcd_server_name": "etcd.us-east.svc",
        **settings,
    }


def test_a_good_config_passes_and_prints_what_serve_reads_back(secure: dict[str, Any], tmp_path: Path) -> None:
    with socket.socket() as busy:  # the listen port taken: serve could not bind, the check never tries
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = check(tmp_path, {**secure, "listen": f"127.0.0.1:{port}"})
    assert (code, err) == (0, ""), err
    assert "etcd user 'root'" in out and "policy: " in out and "(writable)" in out
    printed = tmp_path / "printed.toml"
    printed.write_text(out)
    again = load(str(printed), {})
    original = load(str(tmp_path / "server.toml"), {})
    assert again == original
    assert again.etcd == ("etcd-0.etcd.us-east.svc:2379", "etcd-1.etcd.us-east.svc:2379", "[fd00::3]:2379")
    assert not (tmp_path / "audit.jsonl").exists()  # checked, not created


def test_flags_win_over_the_file_as_in_serve(secure: dict[str, Any], tmp_path: Path) -> None:
    code, out, _ = check(tmp_path, secure, "--listen", "127.0.0.1:9999", "--etcd", "localhost:2379")
    assert code == 0
    config = tomllib.loads(out)["server"]
    assert config["listen"] == "127.0.0.1:9999" and config["etcd"] == ["localhost:2379"]


def _bad_key(pki: Pki) -> str:
    return str(pki.client("spiffe://test.local/other").key_path)


@pytest.mark.parametrize(
    ("change", "key", "says"),
    [
        ({"colour": "blue"}, "config", "unknown settings: colour"),
        ({"etcd": ["etcd_0.svc:2379"]}, "etcd", "not a valid hostname"),
        ({"etcd": ["::1:2379"]}, "etcd", "[ADDR]:PORT"),
        ({"listen": "0.0.0.0:99999"}, "listen", "port"),
        ({"health_listen": "127.0.0.1:7400"}, "health_listen", "port 7400 is listen's too"),
        ({"tls_cert": "/nonexistent/server.pem"}, "tls_cert", "/nonexistent/server.pem"),
        ({"tls_key": "KEY-OF-ANOTHER"}, "tls_cert", "KEY-OF-ANOTHER"),
        ({"policy_file": "/nonexistent/policy.toml"}, "policy_file", "/nonexistent/policy.toml"),
        ({"policy_file": "NOT-A-POLICY"}, "policy_file", "NOT-A-POLICY"),
        ({"audit_log": "/nonexistent/audit.jsonl"}, "audit_log", "/nonexistent is not a writable directory"),
        ({"etcd_ca": "/nonexistent/etcd-ca.pem"}, "etcd_ca", "/nonexistent/etcd-ca.pem"),
        ({"etcd_key": "KEY-OF-ANOTHER"}, "etcd_cert", "is not the key of"),
        ({"etcd_server_name": ""}, "etcd_server_name", "required with 3 etcd endpoints over TLS"),
        ({"tls_client_ca": ""}, "tls_client_ca", "required with"),
    ],
)
def test_what_would_stop_serve_exits_2_naming_the_setting(  # noqa: PLR0917  # pytest passes them so
    secure: dict[str, Any], pki: Pki, tmp_path: Path, change: dict[str, Any], key: str, says: str
) -> None:
    settings = {**secure, **change}
    for name, value in change.items():
        if value == "KEY-OF-ANOTHER":
            settings[name] = _bad_key(pki)
            says = settings[name] if says == "KEY-OF-ANOTHER" else says
        if value == "NOT-A-POLICY":
            (tmp_path / "bad-policy.toml").write_text("[[grant]]\nidentity = 3\n")
            settings[name] = str(tmp_path / "bad-policy.toml")
            says = settings[name]
    code, out, err = check(tmp_path, settings)
    assert code == 2 and out == ""
    assert err.startswith(f"discovery serve: error: {key}: ") and says in err, err
    assert len(err.strip().splitlines()) == 1


def test_an_audit_log_that_cannot_be_written_passes_with_fail_open(secure: dict[str, Any], tmp_path: Path) -> None:
    code, out, _ = check(tmp_path, {**secure, "audit_log": "/nonexistent/a.jsonl", "audit_fail_open": True})
    assert code == 0 and "audit_fail_open: serve would start and log it" in out


def test_serve_stops_with_the_same_words(secure: dict[str, Any], tmp_path: Path) -> None:
    """A file serve reads at start, refused by both in one format (serve reads certificates
    before it looks for etcd, so it stops without one here)."""
    settings = {**secure, "tls_cert": "/nonexistent/server.pem", "etcd": ["127.0.0.1:1"], "etcd_ca": ""}
    settings = {k: v for k, v in settings.items() if k not in ("etcd_cert", "etcd_key", "etcd_server_name")}
    checked = check(tmp_path, settings)
    served = serve(tmp_path)
    assert checked[0] == served.returncode == 2
    assert checked[2].strip() == served.stderr.strip().splitlines()[-1].strip()


@pytest.mark.parametrize("name", ["etcd_ca", "etcd_cert"])
def test_serve_names_a_bad_etcd_tls_file_as_check_config_does(
    secure: dict[str, Any], tmp_path: Path, name: str
) -> None:
    """Not an internal error from inside the etcd client: the setting, and exit 2."""
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    settings = {**secure, name: str(tmp_path / "junk.pem")}
    checked = check(tmp_path, settings)
    served = serve(tmp_path)
    assert checked[0] == served.returncode == 2, served.stderr
    last = served.stderr.strip().splitlines()[-1].strip()
    assert last == checked[2].strip() and last.startswith(f"discovery serve: error: {name}: "), last
    assert "internal error" not in served.stderr


# --- every config file shipped ------------------------------------------------------------

_FIELDS = {f for f in ServerConfig.__dataclass_fields__}
_PATHS = ("tls_cert", "tls_key", "tls_client_ca", "policy_file", "etcd_ca", "etcd_cert", "etcd_key", "audit_log")


def _shipped() -> Iterator[Path]:
    yield from sorted(ROOT.glob("deploy/**/*.toml"))


def _is_server_config(path: Path) -> bool:
    data = tomllib.loads(path.read_text())
    return bool(set(data.get("server", data)) & _FIELDS)


def _help_example(tmp_path: Path) -> Path:
    path = tmp_path / "help-example.toml"
    path.write_text(serve_help_config())
    return path


@pytest.mark.parametrize(
    "name", ["serve --help example", *(str(p.relative_to(ROOT)) for p in _shipped() if _is_server_config(p))]
)
def test_every_shipped_config_passes(name: str, pki: Pki, tmp_path: Path) -> None:
    """Each config as shipped, its files (which live where it is deployed) replaced by this
    test's (a shipped policy of the same name where there is one), its region given where the
    deployment gives it by flag."""
    path = _help_example(tmp_path) if name.startswith("serve") else ROOT / name
    data = tomllib.loads(path.read_text())
    values = data.get("server", data)
    server = pki.server("us-east")
    etcd_files = EtcdServerTls.issue(pki.ca, pki.dir / "etcd")
    local = {
        "tls_cert": server.cert_path,
        "tls_key": server.key_path,
        "tls_client_ca": pki.ca_path,
        "policy_file": pki.policy(),
        "etcd_ca": etcd_files.ca,
        "etcd_cert": etcd_files.root_cert,
        "etcd_key": etcd_files.root_key,
        "audit_log": tmp_path / "audit.jsonl",
    }
    flags: list[str] = []
    for key in _PATHS:
        given = values.get(key)
        if not given or given == "-" or Path(given).exists() or (key == "audit_log" and Path(given).parent.is_dir()):
            continue
        replacement = local[key]
        if key == "policy_file":
            shipped = [p for p in _shipped() if p.name == Path(given).name and not _is_server_config(p)]
            replacement = shipped[0] if shipped else replacement
        flags += [f"--{key.replace('_', '-').replace('policy-file', 'policy')}", str(replacement)]
    if "region" not in values:
        flags += ["--region", "us-east"]
    done = run_serve(path, "--check-config", *flags)
    assert done.returncode == 0, done.stderr


def test_every_other_toml_shipped_is_a_policy_that_loads() -> None:
    """Under deploy/, a TOML file that is not a server config is a policy (given to
    --policy): each must load as serve would load it."""
    for path in _shipped():
        if not _is_server_config(path):
            Policy.load(path)
