"""HTTP helpers for tests of the HTTP door (discovery/http/): JSON gets with a deadline, and
an SSE reader that parses events as they come."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=10.0)
HTTP = {"http_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}  # both listeners, any port


def base(server: Any) -> str:
    scheme = server.http.scheme
    return f"{scheme}://127.0.0.1:{server.http.port}"


async def get_json(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with session.get(url, timeout=TIMEOUT, **kwargs) as response:
        body = await response.read()
        assert response.content_type == "application/json", (url, response.status, response.content_type, body[:200])
        return response.status, json.loads(body), response


@dataclass
class Event:
    event: str
    id: str | None
    data: dict[str, Any]


@dataclass
class EventStream:
    """Reads ``text/event-stream`` into ``events``; ``next()`` waits (with a deadline) for one."""

    response: aiohttp.ClientResponse
    events: list[Event] = field(default_factory=list)
    _buffer: bytes = b""

    async def next(self, timeout: float = 10.0, skip_keepalives: bool = True) -> Event:
        async with asyncio.timeout(timeout):
            while True:
                event = await self._read_one()
                if skip_keepalives and event.event == "keepalive":
                    continue
                return event

    async def _read_one(self) -> Event:
        while b"\n\n" not in self._buffer:
            chunk = await self.response.content.readany()
            if not chunk:
                raise EOFError("the event stream ended")
            self._buffer += chunk
        block, self._buffer = self._buffer.split(b"\n\n", 1)
        fields: dict[str, str] = {}
        for line in block.decode().splitlines():
            name, _, value = line.partition(": ")
            fields[name] = value
        if "data" not in fields:  # the retry: line
            return await self._read_one()
        event = Event(fields.get("event", "message"), fields.get("id"), json.loads(fields["data"]))
        self.events.append(event)
        return event

    async def changes_until(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The next ``count`` changes, across as many events as they come in."""
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while len(out) < count:
                event = await self.next()
                assert event.event == "changes", event
                out += event.data["changes"]
        return out
