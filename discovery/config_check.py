"""``discovery serve --check-config``: everything ``serve`` checks before it starts, with
neither etcd nor a listener: the settings (``config.load`` validates them), the TLS files
(readable, the key matching its certificate, not expired), the policy, etcd's client TLS
files and the audit log's path. A failure is the InvalidArgument ``serve`` would stop with,
naming the setting. etcd names are not resolved: a config is checked where its deployment's
names need not exist (in CI, in an image build).

``render`` gives the effective configuration as a TOML file ``serve --config`` reads back.
No setting holds a secret (keys are file paths), so every one is printed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from pathlib import Path

from discovery.config import ServerConfig
from discovery.errors import InvalidArgument
from discovery.security.policy import Policy, PolicyError
from discovery.security.tls import MaterialError, TlsFiles, load_material
from discovery.store import EtcdTls, check_tls

__all__ = ["check", "render"]


def check(config: ServerConfig) -> list[str]:
    """Check what ``serve`` reads at start; returns what was checked, one line each.
    InvalidArgument naming the setting when something would stop ``serve``."""
    done = [f"settings: region {config.region}, etcd {','.join(config.etcd)} (not contacted, names not resolved)"]
    done.append(_check_audit_log(config))
    if config.insecure:
        done.append("TLS: none (insecure: development only)")
    else:
        try:
            material = load_material(TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca))
        except MaterialError as exc:
            raise InvalidArgument("tls_cert", str(exc)) from None  # as Server._load_security names it
        done.append(f"TLS: {config.tls_cert} (valid until {material.not_after:%Y-%m-%d %H:%M} UTC)")
        try:
            Policy.load(config.policy_file)
        except PolicyError as exc:
            raise InvalidArgument("policy_file", str(exc)) from None
        done.append(f"policy: {config.policy_file}")
    if config.etcd_tls:
        user = check_tls(EtcdTls(config.etcd_ca, config.etcd_cert, config.etcd_key, config.etcd_server_name))
        done.append(f"etcd TLS: {config.etcd_ca}" + (f", etcd user {user!r}" if user else ", no client certificate"))
    return done


def _check_audit_log(config: ServerConfig) -> str:
    """Whether serve could open the audit log for append, without creating it here."""
    path = config.audit_log
    if not path or path == "-":
        return f"audit log: {'standard output' if path else 'off'}"
    target = Path(path)
    if target.exists():
        problem = "" if target.is_file() and os.access(target, os.W_OK) else "exists and is not a writable file"
    else:
        parent = target.parent
        writable = parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
        problem = "" if writable else f"{parent} is not a writable directory"
    if not problem:
        return f"audit log: {path} (writable)"
    if config.audit_fail_open:
        return f"audit log: {path} cannot be written ({problem}); audit_fail_open: serve would start and log it"
    raise InvalidArgument("audit_log", f"{path}: {problem}: fix the path or its permissions, or set audit_fail_open")


def render(config: ServerConfig, checked: list[str]) -> str:
    """The effective configuration as TOML, what was checked as comments above it."""
    lines = ["# discovery serve --check-config: OK", *(f"#   {line}" for line in checked), "[server]"]
    for field in fields(ServerConfig):
        lines.append(f"{field.name} = {_toml(getattr(config, field.name))}")
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string (\uXXXX escapes included)
