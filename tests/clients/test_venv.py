"""The client is its own distribution: `pip install ./clients/python` into a fresh virtual
environment brings discovery-client, grpcio and protobuf (and what those two need), nothing
else; the installed client resolves against a real server, and nothing of the server
(discovery, etcd3aio, OpenTelemetry) is importable or imported."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import textwrap
from importlib.metadata import Distribution, distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.helpers import register

REPO = Path(__file__).resolve().parents[2]
CLIENT_DIST = REPO / "clients" / "python"

SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.util, json, sys
    server_side = ("discovery", "etcd3aio", "opentelemetry", "grpc_health")
    importable = [m for m in server_side if importlib.util.find_spec(m) is not None]
    import discovery_client
    from discovery_client import ClientConfig, DiscoveryClient

    async def main():
        config = ClientConfig(region="us-east", servers=(sys.argv[1],), call_timeout=5.0)
        async with DiscoveryClient(config) as client:
            return (await client.resolve("web")).addresses

    addresses = asyncio.run(main())
    imported = sorted({m.split(".")[0] for m in sys.modules} & set(server_side))
    print(json.dumps({"addresses": addresses, "importable": importable, "imported": imported,
                      "client": discovery_client.__file__}))
    """
)


async def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"{args[:3]} failed ({proc.returncode}):\n{err.decode()[-3000:]}"
    return out.decode()


def requirements(dist: Distribution) -> set[str]:
    """The distributions ``dist`` needs on this interpreter, extras not asked for left out."""
    out = set()
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.add(canonicalize_name(req.name))
    return out


def closure(root: str, installed: dict[str, Distribution]) -> set[str]:
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += requirements(installed[name])
    return seen


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_client_distribution_brings_only_grpcio_and_protobuf(etcd, servers, connect, tmp_path: Path) -> None:
    server = await servers.start(etcd)
    await register(connect(server), "web", "10.0.0.1:80")

    venv = tmp_path / "venv"
    await run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)  # no system site-packages
    python = str(venv / "bin" / "python")
    pip_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [python, "-m", "pip", "--disable-pip-version-check"]

    async def pip_list() -> set[str]:
        listed = json.loads(await run(*pip, "list", "--format", "json", cwd=tmp_path, env=pip_env))
        return {canonicalize_name(d["name"]) for d in listed}

    before = await pip_list()  # the venv's own tools (pip, setuptools)
    # setuptools writes build/ and an egg-info beside the sources it builds; building a copy
    # keeps the shared checkout (and a concurrent run of this test) out of it.
    source = tmp_path / "clients-python"
    shutil.copytree(CLIENT_DIST, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    await run(*pip, "install", "--quiet", str(source), cwd=tmp_path, env=pip_env)
    added = await pip_list() - before

    purelib = (
        await run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
    ).strip()
    installed = {canonicalize_name(d.metadata["Name"]): d for d in distributions(path=[purelib])}
    assert requirements(installed["discovery-client"]) == {"grpcio", "protobuf"}
    assert added == closure("discovery-client", installed), f"installed beyond the client's needs: {sorted(added)}"

    # No PYTHONPATH: only the venv. The test server is plaintext, so the explicit switch.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "DISCOVERY_INSECURE": "1"}
    out = await run(python, "-c", SCRIPT, f"127.0.0.1:{server.port}", cwd=tmp_path, env=env, timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["addresses"] == ["10.0.0.1:80"]
    assert result["importable"] == [] and result["imported"] == []
    assert result["client"].startswith(purelib)  # the installed copy, not the checkout
