"""Shared helpers of tests/deploy: the shipped files, the tools (a missing tool fails the
test: .ci/run installs them from tests/deploy/requirements.txt), durations and versions."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
REGIONS = ("us-east", "eu-west", "ap-south")
MIN_ETCD = (3, 5, 13)


def tool(name: str) -> str:
    """The tool's path: on PATH or beside this Python (the venv's bin/, where pip puts them)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=search)
    if found is None:
        pytest.fail(
            f"{name} is not installed: pip install -r tests/deploy/requirements.txt (.ci/run does)",
            pytrace=False,
        )
    return found


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def seconds(text: str) -> float:
    """A Go/compose duration ("500ms", "1s", "1m30s") in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def etcd_version(image: str) -> tuple[int, ...]:
    match = re.fullmatch(r".*/etcd:v(\d+)\.(\d+)\.(\d+)", image)
    assert match, f"etcd image {image!r} is not pinned to a vX.Y.Z tag"
    return tuple(int(g) for g in match.groups())


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {args}"
    return values[0]


def port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def peer_regions(config: dict[str, Any]) -> list[str]:
    return [entry.split("=", 1)[0].strip() for entry in config.get("peers", [])]


def load_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


# nearest first, the order the shipped files use
NEAREST = {"us-east": ["eu-west", "ap-south"], "eu-west": ["us-east", "ap-south"], "ap-south": ["eu-west", "us-east"]}
