"""What the HTTP door reads of its server: the same objects the gRPC servicers answer from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from discovery.api import AdminServicer, LookupServicer
from discovery.config import ServerConfig
from discovery.replication.state import RegionStates
from discovery.security.guard import Guard
from discovery.security.tls import ServerCertificates
from discovery.store import StoreHealth
from discovery.telemetry import Instruments
from discovery.view import View


@dataclass(frozen=True)
class Sources:
    config: ServerConfig
    view: View
    states: RegionStates
    lookup: LookupServicer  # Resolve's validation, authorization and answer
    admin: AdminServicer  # Status's answer
    guard: Guard
    instruments: Instruments
    etcd_health: Callable[[], StoreHealth]
    certificates: ServerCertificates | None  # None: plaintext (insecure)
