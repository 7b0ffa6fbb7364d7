"""The in-memory view of one service and the answers computed from it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from discovery_client.model import Endpoint, InstanceKey, Query, Resolution, select

AnswerKey = tuple[Any, ...]


class ServiceCache:
    """The instances of one service, fed by its Watch (or the cache file), and the answers
    to every query asked so far.

    Read without locks from any thread: every update builds new objects and swaps the
    references (``instances``, ``_answers``), so a reader sees the old view or the new one,
    never half of each, and an answer computed from the old view lands in the old dict.
    """

    def __init__(self, service: str, local: str, proximity: Sequence[str]) -> None:
        self.service = service
        self._local = local
        self._proximity = tuple(proximity)
        self.instances: Mapping[InstanceKey, Any] = {}  # protobuf Instance messages
        self._endpoints: dict[InstanceKey, Endpoint] = {}
        self.revision = 0
        self.source = ""
        self.has_view = False
        self.connected = False
        self.server_stale = False
        self.held = False
        self._answers: dict[AnswerKey, Resolution] = {}
        self.listeners: list[Callable[[], None]] = []

    @property
    def stale(self) -> bool:
        return not self.connected or self.server_stale

    def answer(self, key: AnswerKey, query: Callable[[], Query]) -> Resolution:
        """The cached Resolution for ``key``, computed (from ``query()``) on first use."""
        answers = self._answers
        hit = answers.get(key)
        if hit is None:
            endpoints = select(self._endpoints.values(), query(), self._local, self._proximity)
            hit = Resolution(self.service, endpoints, self.revision, self.stale, self.source, self.held)
            answers[key] = hit
        return hit

    def set_instances(self, instances: Mapping[InstanceKey, Any]) -> None:
        """Replace the view; Endpoint objects of unchanged instances are reused."""
        old_pb, old_ep = self.instances, self._endpoints
        endpoints = {}
        for key, inst in instances.items():
            same = old_pb.get(key) is inst or old_pb.get(key) == inst
            endpoints[key] = old_ep[key] if same and key in old_ep else Endpoint.from_proto(inst)
        self.instances, self._endpoints, self.has_view = instances, endpoints, True
        self._answers = {}
        for listener in list(self.listeners):
            listener()

    def set_state(
        self,
        *,
        revision: int | None = None,
        connected: bool | None = None,
        server_stale: bool | None = None,
        source: str | None = None,
        held: bool | None = None,
    ) -> None:
        """Update what answers report about freshness; answers are recomputed only on a change."""
        before = (self.revision, self.connected, self.server_stale, self.source, self.held)
        if revision is not None:
            self.revision = revision
        if connected is not None:
            self.connected = connected
        if server_stale is not None:
            self.server_stale = server_stale
        if source is not None:
            self.source = source
        if held is not None:
            self.held = held
        if (self.revision, self.connected, self.server_stale, self.source, self.held) != before:
            self._answers = {}
