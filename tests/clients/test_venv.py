"""A service that only resolves installs grpcio and protobuf: in a fresh virtual environment
with just those two, discovery_client imports and resolves against a real server, and
nothing of the server (discovery, etcd3aio, OpenTelemetry) is importable or imported."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import register

REPO = Path(__file__).resolve().parents[2]

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


async def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240) -> str:
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


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_client_needs_only_grpcio_and_protobuf(etcd, servers, connect, tmp_path: Path) -> None:
    server = await servers.start(etcd)
    await register(connect(server), "web", "10.0.0.1:80")

    venv = tmp_path / "venv"
    await run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    await run(*pip, "grpcio>=1.85,<2", "protobuf>=6.31,<8", cwd=tmp_path)

    # The client package and the generated stubs, without the server package beside them.
    path = tmp_path / "path"
    path.mkdir()
    (path / "discovery_client").symlink_to(REPO / "clients" / "discovery_client")
    (path / "discovery_pb").symlink_to(REPO / "discovery_pb")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(path), "HOME": str(tmp_path)}

    out = await run(python, "-c", SCRIPT, f"127.0.0.1:{server.port}", cwd=tmp_path, env=env, timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["addresses"] == ["10.0.0.1:80"]
    assert result["importable"] == [] and result["imported"] == []
    assert result["client"].startswith(str(path))
