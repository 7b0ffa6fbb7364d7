"""Views persisted to a file, so a process that starts while every server is unreachable
can still resolve (stale) what the previous process knew."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from discovery_client.model import InstanceKey
from discovery_pb.v1.types_pb2 import Instance

log = logging.getLogger(__name__)
FORMAT = 1


class FileCache:
    """One JSON file: ``{"format": 1, "services": {name: {"revision", "region", "saved_at",
    "instances": [base64 Instance, ...]}}}``. Written atomically (temporary file, then
    rename) at most every ``interval`` seconds; services this process does not watch are
    kept as the file had them."""

    def __init__(self, path: str | os.PathLike[str], interval: float) -> None:
        self.path = Path(path)
        self._interval = interval
        self._services: dict[str, dict[str, Any]] = {}
        self._merged = False  # with the file's contents, read on first need
        self._dirty = False
        self._writer: asyncio.Task[None] | None = None

    async def load(self, service: str) -> tuple[dict[InstanceKey, Any], int] | None:
        """The persisted instances of ``service`` and their revision, if the file has them."""
        services = await self._loaded()
        entry = services.get(service)
        if entry is None:
            return None
        try:
            instances = [Instance.FromString(base64.b64decode(s)) for s in entry["instances"]]
            return {(i.region, i.instance_id): i for i in instances}, int(entry["revision"])
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("discovery client: ignoring the cached view of %s in %s: %s", service, self.path, exc)
            return None

    def update(self, service: str, instances: Mapping[InstanceKey, Any], revision: int, region: str) -> None:
        """Record a view to be written soon."""
        entry = {
            "revision": revision,
            "region": region,
            "saved_at": time.time(),
            "instances": [base64.b64encode(i.SerializeToString()).decode() for i in instances.values()],
        }
        self._services[service] = entry
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_soon(), name="discovery-cache-file")

    async def _loaded(self) -> dict[str, dict[str, Any]]:
        if not self._merged:
            on_disk = await asyncio.to_thread(self._read)
            self._services = on_disk | self._services  # ours are newer
            self._merged = True
        return self._services

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("discovery client: ignoring unreadable cache file %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("services"), dict):
            log.warning("discovery client: ignoring cache file %s of an unknown format", self.path)
            return {}
        services: dict[str, dict[str, Any]] = data["services"]
        return services

    async def _write_soon(self) -> None:
        await asyncio.sleep(self._interval)
        await self.flush()

    async def flush(self) -> None:
        """Write now if anything changed since the last write."""
        if not self._dirty:
            return
        services = await self._loaded()
        self._dirty = False
        text = json.dumps({"format": FORMAT, "services": services}, separators=(",", ":"))
        try:
            await asyncio.to_thread(_write_atomically, self.path, text)
        except OSError as exc:
            log.warning("discovery client: could not write cache file %s: %s", self.path, exc)

    async def close(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self.flush()


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
