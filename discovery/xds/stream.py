"""One ADS stream's protocol state (state of the world), without gRPC: what the client
subscribes to, what it was sent, what it ACKed or NACKed, and what to send next.

The rules a stock gRPC client needs (docs/xds.md):

- Answer a request only when it changes the subscription (or is the first for its type).
  An ACK repeats the names with the last nonce; answering it would loop forever.
- A NACK (``error_detail`` set) is logged and recorded; nothing is resent: the client keeps
  its last good config until the next change produces something new.
- Listener and Cluster responses always carry the full set the client subscribes to, since
  a response that omits one deletes it. A service with no instance still has all four
  resources, its endpoints empty (see ``Builder.valid``); only a name that can be no service
  is left out, and named in ``resource_errors`` as NOT_FOUND (which gRPC reads only with
  GRPC_EXPERIMENTAL_XDS_DATA_ERROR_HANDLING; otherwise it gives up after 15 s).
- RouteConfiguration and ClusterLoadAssignment are sent per resource, only when changed.
- An empty name list unsubscribes from the type; it never means "everything".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from envoy.config.core.v3.base_pb2 import ControlPlane, Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse, ResourceName
from google.rpc.status_pb2 import Status

from discovery.xds import resources as rs
from discovery.xds.hub import Built, XdsHub

log = logging.getLogger(__name__)

_FULL_SET = frozenset({rs.LISTENER, rs.CLUSTER})
_NOT_FOUND = 5  # google.rpc.Code
_PERMISSION_DENIED = 7
_KEEP_NONCES = 16  # responses per type awaiting an answer; older ones are superseded anyway


@dataclass(slots=True)
class Sent:
    """One response: what it carried per name (None: left out as no service at all)."""

    nonce: str
    version: str
    at: float
    resources: dict[str, Built | None]


Delivered = tuple[str, Built | None, float]  # (version, resource or None for "does not exist", when)


@dataclass(slots=True)
class Nack:
    version: str
    resource: Built | None
    details: str
    at: float


@dataclass(slots=True)
class TypeState:
    names: frozenset[str] = frozenset()
    dirty: set[str] = field(default_factory=set)
    sent: dict[str, Delivered] = field(default_factory=dict)
    acked: dict[str, Delivered] = field(default_factory=dict)
    nacked: dict[str, Nack] = field(default_factory=dict)
    outstanding: dict[str, Sent] = field(default_factory=dict)  # nonce -> response
    version: int = 0


class StreamState:
    """Created per ADS stream; ``handle`` each request, ``take`` responses when ``wake`` is set."""

    _ids = itertools.count(1)

    def __init__(self, hub: XdsHub, peer: str = "", may_read: Callable[[str], bool] | None = None) -> None:
        self.hub = hub
        # The caller's read grant: names it may not read are left out, named in resource_errors
        # as PERMISSION_DENIED (asked again on every response, so a policy reload applies).
        self._may_read = may_read or _everything
        self.id = next(self._ids)
        self.peer = peer
        self.node = Node()
        self.connected_at = time.time()
        self.types: dict[str, TypeState] = {t: TypeState() for t in rs.TYPE_URLS}
        self.forced: set[str] = set()  # types whose subscription changed: answer in full
        self.wake = asyncio.Event()
        self._nonces = itertools.count(1)
        self._watched: set[str] = set()
        hub.streams.add(self)

    @property
    def perspective(self) -> str:
        """The region whose instances come first: the client's (node.locality.region, from
        its bootstrap), else this server's."""
        return self.node.locality.region or self.hub.region

    # --- requests ---------------------------------------------------------------------

    def handle(self, request: DiscoveryRequest) -> None:
        if request.HasField("node") and not self.node.ListFields():
            self.node.CopyFrom(request.node)  # gRPC sends the node on the first request only
        state = self.types.get(request.type_url)
        if state is None:
            log.debug("xds: stream %d asked for unsupported type %s; ignored", self.id, request.type_url)
            return
        if request.response_nonce:
            self._answer(request, state)
        names = frozenset(request.resource_names)
        if names != state.names or (names and not request.response_nonce):  # a change, or a first request
            self._subscribe(request.type_url, state, names)

    def _answer(self, request: DiscoveryRequest, state: TypeState) -> None:
        sent = state.outstanding.pop(request.response_nonce, None)
        if sent is None:  # a nonce from a previous stream, or one answered or superseded already
            if request.HasField("error_detail"):
                log.warning(
                    "xds: client %s (%s) NACKed %s with an unknown nonce %s: %s",
                    self.node.id or "?",
                    self.peer,
                    rs.SHORT_NAMES[request.type_url],
                    request.response_nonce,
                    request.error_detail.message,
                )
            return
        if request.HasField("error_detail"):
            details = request.error_detail.message
            for name, resource in sent.resources.items():
                if resource is not None:
                    state.nacked[name] = Nack(sent.version, resource, details, time.time())
            log.warning(
                "xds: client %s (%s) NACKed %s version %s (%s); it keeps its last accepted config: %s",
                self.node.id or "?",
                self.peer,
                rs.SHORT_NAMES[request.type_url],
                sent.version,
                ", ".join(sorted(sent.resources)) or "no resources",
                details,
            )
            return
        for name, resource in sent.resources.items():
            if name in state.names:  # an ACK may come after the name was unsubscribed
                state.acked[name] = (sent.version, resource, time.time())
                state.nacked.pop(name, None)

    def _subscribe(self, type_url: str, state: TypeState, names: frozenset[str]) -> None:
        for gone in state.names - names:
            state.sent.pop(gone, None)
            state.acked.pop(gone, None)
            state.nacked.pop(gone, None)
        state.names = names
        self._rewatch()
        if names:
            self.forced.add(type_url)
            self.wake.set()
        else:
            self.forced.discard(type_url)

    def _rewatch(self) -> None:
        wanted = {name for state in self.types.values() for name in state.names}
        self.hub.unwatch(self, self._watched - wanted)
        self.hub.watch(self, wanted - self._watched)
        self._watched = wanted

    # --- pushes -----------------------------------------------------------------------

    def touch(self, services: Iterable[str] | None) -> None:
        """Called by the hub: these services' endpoints (None: all) may have changed. Only
        endpoints depend on the view; the other types change with the subscription alone,
        and re-checking a full Listener and Cluster set per push cost O(names) per stream."""
        state = self.types[rs.ENDPOINTS]
        names = state.names if services is None else state.names.intersection(services)
        if names:
            state.dirty.update(names)
            self.wake.set()

    def take(self) -> list[bytes]:
        """The responses due now, encoded; records them as sent."""
        self.wake.clear()
        out = []
        for type_url in rs.TYPE_URLS:
            response = self._response(type_url, self.types[type_url], type_url in self.forced)
            if response is not None:
                out.append(response)
        self.forced.clear()
        return out

    def _response(self, type_url: str, state: TypeState, forced: bool) -> bytes | None:
        dirty, state.dirty = state.dirty & state.names, set()
        if not state.names or not (forced or dirty):
            return None
        perspective = self.perspective
        if type_url in _FULL_SET:
            # Every subscribed name goes out together (an omission deletes), but only if
            # anything differs from what the client holds.
            chosen = {name: self._build(type_url, name, perspective) for name in sorted(state.names)}
            if not forced and all(_same(state.sent.get(n), r) for n, r in chosen.items()):
                return None
        else:
            candidates = sorted(state.names if forced else dirty)
            chosen = {n: self._build(type_url, n, perspective) for n in candidates}
            if not forced:
                chosen = {n: r for n, r in chosen.items() if not _same(state.sent.get(n), r)}
            if not chosen:
                return None
        return self._record(type_url, state, chosen)

    def _build(self, type_url: str, name: str, perspective: str) -> Built | None:
        if not self._may_read(name):
            return None
        return self.hub.builder.get(type_url, name, perspective)

    def _record(self, type_url: str, state: TypeState, chosen: dict[str, Built | None]) -> bytes:
        state.version += 1
        version, nonce, now = str(state.version), str(next(self._nonces)), time.time()
        for name, resource in chosen.items():
            state.sent[name] = (version, resource, now)
        state.outstanding[nonce] = Sent(nonce, version, now, chosen)
        while len(state.outstanding) > _KEEP_NONCES:
            del state.outstanding[next(iter(state.outstanding))]
        header = DiscoveryResponse(version_info=version, type_url=type_url, nonce=nonce)
        for name in (n for n, r in chosen.items() if r is None):
            if self._may_read(name):
                error = Status(code=_NOT_FOUND, message=f"{name!r} is not a valid service name")
            else:
                error = Status(code=_PERMISSION_DENIED, message=f"this client may not read {name!r}")
            header.resource_errors.add(resource_name=ResourceName(name=name), error_detail=error)
        if self.hub.control_plane:
            header.control_plane.CopyFrom(ControlPlane(identifier=self.hub.control_plane))
        encoded: bytes = header.SerializeToString()
        return encoded + b"".join(r.field for r in chosen.values() if r is not None)

    def held(self) -> set[str]:
        """The names this stream has sent resources for (not resource errors) and still
        subscribes to: what the client holds, and what a policy reload must still allow."""
        return {
            name
            for state in self.types.values()
            for name, (_, resource, _) in state.sent.items()
            if resource is not None and name in state.names
        }

    def close(self) -> None:
        self.hub.unwatch(self, self._watched)
        self._watched = set()
        self.hub.streams.discard(self)


def _everything(_: str) -> bool:
    return True


def _same(sent: Delivered | None, resource: Built | None) -> bool:
    if sent is None:
        return False
    before = sent[1]
    if before is None or resource is None:
        return before is resource
    return before.field == resource.field
