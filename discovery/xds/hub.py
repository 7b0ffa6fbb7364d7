"""The xDS side of the view: builds resources once per change and tells the streams that
want them.

One view subscription for the whole hub (not one per ADS stream): a change is turned into a
resource once, however many streams subscribe to it, and each stream is only marked dirty, so
a stream that writes slowly coalesces any number of changes into its next response. Region
freshness is no view change (it is time passing), so the hub also polls it and re-evaluates
every stream when a region turns stale or fresh again.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.message import Message

from discovery.errors import InvalidArgument
from discovery.model import served, validate_service
from discovery.replication.state import RegionStates
from discovery.view import View, updates
from discovery.xds import resources as rs

log = logging.getLogger(__name__)

FRESHNESS_INTERVAL = 0.25  # seconds between checks of which regions are stale
_WARNED_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Built:
    """One resource as sent: the message (for CSDS), packed, and already encoded as a
    ``resources`` entry of a DiscoveryResponse, so that a response to any number of streams
    is a concatenation, not a serialization per stream."""

    type_url: str
    name: str
    message: Message
    packed: AnyPb
    field: bytes


def build(type_url: str, name: str, message: Message) -> Built:
    packed = AnyPb()
    packed.Pack(message)
    return Built(type_url, name, message, packed, DiscoveryResponse(resources=[packed]).SerializeToString())


class Watcher(Protocol):
    """A stream's side of the hub: told which services changed."""

    def touch(self, services: Iterable[str] | None) -> None: ...  # None: everything


class Builder:
    """Builds a service's resources from the view; rebuilds only when the service's records
    or the regions' freshness changed. Replaceable (``XdsHub.builder``) to inject faults."""

    def __init__(self, view: View, states: RegionStates) -> None:
        self.view = view
        self.states = states
        self.epoch = 0  # moves when some region turns stale, fresh, or unservable
        # Least recently used first: entries per (type, name, client region) come and go.
        self._cache: OrderedDict[tuple[str, str, str], tuple[int, int, Built | None]] = OrderedDict()
        self._warned: set[tuple[str, str, str]] = set()

    def get(self, type_url: str, name: str, perspective: str) -> Built | None:
        """The resource, or None for a name that can be no service (see ``valid``)."""
        if type_url == rs.ENDPOINTS:
            generation, epoch = self.view.service_generation(name), self.epoch
        else:  # the rest depends on the name alone
            perspective, generation, epoch = "", 0, 0
        key = (type_url, name, perspective)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == generation and hit[1] == epoch:
            self._cache.move_to_end(key)
            return hit[2]
        built = self._build(type_url, name, perspective)
        self._cache[key] = (generation, epoch, built)
        self._cache.move_to_end(key)
        # Room for every type of every service seen from a few client regions; past that the
        # least recently used go one by one (clearing all at once rebuilt everything, often).
        limit = 8 * self.view.service_count + 4096
        while len(self._cache) > limit:
            self._cache.popitem(last=False)
        return built

    @staticmethod
    def valid(name: str) -> bool:
        """Every name a service could have gets its resources, registered or not: a service
        with no instance has an empty ClusterLoadAssignment, so a stock client fails its calls
        at once and recovers the moment an instance registers. Leaving its Listener out would
        not tell the client so: gRPC waits 15 s for a Listener it has never received before
        calling it missing."""
        try:
            validate_service(name)
        except InvalidArgument:
            return False
        return True

    def _build(self, type_url: str, name: str, perspective: str) -> Built | None:
        if not self.valid(name):
            return None
        if type_url == rs.ENDPOINTS:
            return build(type_url, name, self.load_assignment(name, perspective))
        if type_url == rs.ROUTE:
            return build(type_url, name, rs.route_configuration(name))
        message = rs.listener(name) if type_url == rs.LISTENER else rs.cluster(name)
        return build(type_url, name, message)

    def load_assignment(self, name: str, perspective: str) -> Message:
        states = self.states
        # As served (model.served): a failing check shows as UNHEALTHY, like NOT_SERVING.
        instances = [served(r.instance) for r in self.view.service(name) if states.servable(r.region)]
        present = {i.region for i in instances}
        order = rs.region_order(perspective or states.region, states.region, states.peers, present)
        stale = {region: states.freshness(region).stale for region in present}
        cla, skipped = rs.load_assignment(name, instances, order, stale)
        for item in skipped:
            self._warn(name, item)
        message: Message = cla
        return message

    def _warn(self, name: str, item: rs.Skipped) -> None:
        key = (name, item.instance.instance_id, item.reason)
        if key in self._warned:
            return
        if len(self._warned) > _WARNED_LIMIT:
            self._warned.clear()
        self._warned.add(key)
        log.warning(
            "xds: %s instance %s (%s, region %s) left out of its endpoints: %s",
            name,
            item.instance.instance_id,
            item.instance.address,
            item.instance.region,
            item.reason,
        )

    def freshness_signature(self) -> tuple[tuple[str, bool, bool], ...]:
        states = self.states
        regions = dict.fromkeys((states.region, *states.peers))
        return tuple((r, states.freshness(r).stale, states.servable(r)) for r in regions)


class XdsHub:
    """Owns the xDS view subscription. Run ``run()`` as a task."""

    def __init__(
        self,
        view: View,
        states: RegionStates,
        *,
        control_plane: str = "",
        freshness_interval: float = FRESHNESS_INTERVAL,
    ) -> None:
        self.view = view
        self.states = states
        self.region = states.region
        self.control_plane = control_plane  # sent to clients as DiscoveryResponse.control_plane
        self.builder = Builder(view, states)
        self._interval = freshness_interval
        self._watchers: dict[str, set[Watcher]] = {}
        self.streams: set[object] = set()  # every open stream's state, for CSDS

    def watch(self, watcher: Watcher, services: Iterable[str]) -> None:
        for service in services:
            self._watchers.setdefault(service, set()).add(watcher)

    def unwatch(self, watcher: Watcher, services: Iterable[str]) -> None:
        for service in services:
            watching = self._watchers.get(service)
            if watching is not None:
                watching.discard(watcher)
                if not watching:
                    del self._watchers[service]

    async def run(self) -> None:
        signature = self.builder.freshness_signature()
        # The idle batch is the freshness poll: regions turn stale with no change in the view.
        batches = updates(self.view, since=None, idle=self._interval)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                try:
                    changed = {change.service for change in batch.changes}
                    if changed:
                        self.notify(changed)
                    now = self.builder.freshness_signature()
                    if now != signature:
                        log.info("xds: region freshness changed (%s); re-evaluating every stream", _describe(now))
                        signature = now
                        self.builder.epoch += 1
                        self.notify_all()
                except Exception:  # a bug must not end every push for good
                    log.exception("xds: failed to notify streams of a change")

    def notify(self, services: set[str]) -> None:
        touched: dict[Watcher, list[str]] = {}
        for service in services:
            for watcher in self._watchers.get(service, ()):
                touched.setdefault(watcher, []).append(service)
        for watcher, names in touched.items():
            watcher.touch(names)

    def notify_all(self) -> None:
        watchers = {w for ws in self._watchers.values() for w in ws}
        for watcher in watchers:
            watcher.touch(None)


def _describe(signature: tuple[tuple[str, bool, bool], ...]) -> str:
    return ", ".join(
        f"{region} {'stale' if stale else 'fresh'}{'' if servable else ' (not served)'}"
        for region, stale, servable in signature
    )
