"""The cluster a drill runs against, as ``cluster.json`` describes it.

``discovery dev`` writes the file; for a real deployment, write one by hand with the same
keys (see docs/drills.md): per region, in proximity order, its servers and etcd endpoints.
``control`` (the dev cluster's fault endpoint) and ``routes`` (the fault proxy's address of
each peer server, per pair of regions) are optional: without them, faults come from
``--inject``/``--heal`` commands. ``tls`` (``{"ca", "cert", "key", "trust_domain"}``, paths
relative to the file's directory or absolute; `discovery dev` names its admin certificate)
secures the drill's clients; without it they take the ``DISCOVERY_TLS_*`` /
``DISCOVERY_INSECURE`` environment, as every client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from discovery.devtools.control import ControlClient, ControlError
from discovery_client import ConfigError, TlsConfig


class ClusterFileError(ValueError):
    """The cluster file is missing, unreadable or does not describe a cluster."""


@dataclass(frozen=True)
class ClusterRegion:
    name: str
    servers: tuple[str, ...]
    etcd: tuple[str, ...]


@dataclass(frozen=True)
class ClusterFile:
    path: Path
    regions: tuple[ClusterRegion, ...]  # file order: nearest first, as the servers are peered
    control: str | None = None
    routes: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    tls: TlsConfig | None = None  # the file's "tls"; None: the environment's settings
    trust_domain: str = ""

    @classmethod
    def load(cls, path: Path) -> ClusterFile:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterFileError(f"{path}: no such file (start `discovery dev` and pass its cluster.json)") from None
        except (OSError, ValueError) as exc:
            raise ClusterFileError(f"{path}: cannot read it as JSON: {exc}") from None
        return cls.parse(path, raw)

    @classmethod
    def parse(cls, path: Path, raw: Any) -> ClusterFile:
        if not isinstance(raw, dict) or not isinstance(raw.get("regions"), dict) or not raw["regions"]:
            raise ClusterFileError(f"{path}: expected an object with a non-empty 'regions' object")
        regions = []
        for name, body in raw["regions"].items():
            servers = _addresses(path, body, name, "servers")
            if not servers:
                raise ClusterFileError(f"{path}: region {name!r} lists no servers")
            regions.append(ClusterRegion(name, servers, _addresses(path, body, name, "etcd")))
        if len(regions) < 2:
            raise ClusterFileError(f"{path}: a drill needs at least two regions, the file has {len(regions)}")
        routes: dict[str, dict[str, tuple[str, ...]]] = {}
        raw_routes = raw.get("routes") or {}
        if not isinstance(raw_routes, dict) or not all(isinstance(t, dict) for t in raw_routes.values()):
            raise ClusterFileError(f"{path}: 'routes' must be an object of objects: {{from: {{to: [host:port]}}}}")
        for src, targets in raw_routes.items():
            routes[src] = {
                dst: _addresses(path, {"routes": addrs}, f"{src}->{dst}", "routes") for dst, addrs in targets.items()
            }
        control = raw.get("control")
        tls, trust_domain = _tls(path, raw.get("tls"))
        return cls(
            path,
            tuple(regions),
            control if isinstance(control, str) and control else None,
            routes,
            tls,
            trust_domain,
        )

    def client_tls(self) -> TlsConfig:
        """How the drill's clients reach the servers: the file's ``tls``, else the
        environment's settings; validated (files readable, TLS or insecure chosen)."""
        tls = self.tls if self.tls is not None else TlsConfig.from_env()
        try:
            return tls.validate()
        except ConfigError as exc:
            where = f"{self.path}: tls: " if self.tls is not None else ""
            raise ClusterFileError(f"{where}{exc}") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.regions)

    def region(self, name: str) -> ClusterRegion:
        for region in self.regions:
            if region.name == name:
                return region
        raise ClusterFileError(f"no region {name!r} in {self.path} (regions: {', '.join(self.names)})")

    def servers_seen_from(self, src: str, dst: str) -> tuple[str, ...]:
        """The addresses a client in ``src`` dials for ``dst``'s servers: through the fault
        proxy when the cluster has one, so a cut-off region's clients are cut off too."""
        return self.routes.get(src, {}).get(dst) or self.region(dst).servers


def _tls(path: Path, raw: Any) -> tuple[TlsConfig | None, str]:
    """The file's ``tls`` object: CA, certificate and key paths (relative ones from the file's
    directory) and the trust domain; (None, "") when there is none."""
    if raw is None:
        return None, ""
    if not isinstance(raw, dict):
        raise ClusterFileError(f"{path}: 'tls' must be an object: {{ca, cert, key, trust_domain}}")
    values = {}
    for key in ("ca", "cert", "key", "trust_domain"):
        value = raw.get(key, "")
        if not isinstance(value, str):
            raise ClusterFileError(f"{path}: tls.{key} must be a string, not {value!r}")
        values[key] = value
    if not values["ca"] or not values["cert"] or not values["key"]:
        raise ClusterFileError(f"{path}: tls needs ca, cert and key (file paths)")
    base = path.parent
    ca, cert, key = (str(base / values[k]) for k in ("ca", "cert", "key"))  # an absolute path stays as is
    return TlsConfig(ca=ca, cert=cert, key=key), values["trust_domain"]


def _addresses(path: Path, body: Any, region: str, key: str) -> tuple[str, ...]:
    items = body.get(key, []) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise ClusterFileError(f"{path}: regions.{region}.{key} must be a list")
    out = []
    for item in items:
        address = item.get("address") if isinstance(item, dict) else item
        if not isinstance(address, str) or ":" not in address:
            raise ClusterFileError(f"{path}: regions.{region}.{key}: {item!r} is not host:port or {{'address': ...}}")
        out.append(address)
    return tuple(out)


class FaultError(RuntimeError):
    """A fault could not be injected or healed."""


class Control:
    """The dev cluster's control endpoint, awaited without blocking the drill's load."""

    def __init__(self, cluster: ClusterFile, timeout: float = 60.0) -> None:
        self.cluster = cluster
        self._client = ControlClient(cluster.control, timeout) if cluster.control else None

    @property
    def available(self) -> bool:
        return self._client is not None

    async def call(self, op: str, **args: Any) -> Any:
        if self._client is None:
            raise FaultError(
                f"{self.cluster.path} names no control endpoint (only `discovery dev` has one): "
                "give the fault as --inject and --heal commands"
            )
        try:
            return await asyncio.to_thread(self._client.call, op, **args)
        except ControlError as exc:
            raise FaultError(f"{op}: {exc}") from None


async def run_hook(command: str, what: str, timeout: float = 120.0) -> str:
    """An operator's own fault command (``--inject``/``--heal``), through the shell, in its
    own process group: a timeout or a cancel (Ctrl-C) kills the whole group, so an inject
    can never finish after the heal. Output goes to a file, so a background child that keeps
    it open does not hold the drill."""
    with tempfile.TemporaryFile() as out:
        proc = await asyncio.create_subprocess_shell(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            raise FaultError(f"{what} command did not finish within {timeout:g}s: {shlex.quote(command)}") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.shield(proc.wait())
        out.seek(0)
        text = out.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise FaultError(f"{what} command exited with {proc.returncode}: {text[-300:] or '(no output)'}")
    return text
