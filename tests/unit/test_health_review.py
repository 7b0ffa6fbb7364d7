"""Health-check faults found in review, each pinned: a checker that lost a check to a newer
member while retrying a verdict does not write it; a stalled TLS backend fails within the
check's timeout; one target never has two probes under way."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from discovery.errors import Conflict
from discovery.health.checker import CRITICAL, PASSING, Checker, Target
from discovery.health.membership import Membership, owner
from discovery.health.probes import probe
from discovery.health.protection import ProtectionSettings, SelfProtection
from discovery.health.spec import Spec
from discovery.keys import InstanceKey
from discovery.store import KeyValue
from discovery.telemetry import Instruments
from discovery.view.index import Record
from discovery_pb.v1.types_pb2 import HealthCheck, Instance
from tests.support.secure import Pki

KEY = InstanceKey("r1", "db", "x")
RECORD = Instance(
    service="db", instance_id="x", region="r1", address="127.0.0.1:1", check=HealthCheck(kind=HealthCheck.TCP)
)


class _Keys:
    def instance_key(self, key: InstanceKey) -> bytes:
        return b"k"


def _checker(view: Any, store: Any, membership: Membership) -> Checker:
    return Checker(
        view,
        store,
        _Keys(),  # type: ignore[arg-type]
        region="r1",
        membership=membership,
        protection=SelfProtection(ProtectionSettings(), None),  # type: ignore[arg-type]
        instruments=Instruments(),
    )


async def test_a_retried_verdict_is_dropped_once_another_member_owns_the_check() -> None:
    # Member names such that A owns the check among {A, B0} and C0 takes it once it joins.
    assert owner(["A", "B0"], "/".join(KEY)) == "A" and owner(["A", "B0", "C0"], "/".join(KEY)) == "C0"
    membership = Membership(None, b"p/health/members/r1/", "A", ttl=3)  # type: ignore[arg-type]
    membership.fence = (membership.key, 5)
    membership.members, membership.listed_at = ("A", "B0"), 11
    attempts: list[int] = []

    class View:
        record = Record(RECORD, 10, 0)

        def get(self, key: InstanceKey) -> Record:
            return self.record

        async def wait_for(self, revision: int, timeout: float) -> None:
            # Meanwhile C0 joined, took the check and wrote PASSING; A's list now has C0.
            passing = Instance()
            passing.CopyFrom(RECORD)
            passing.check_result.state = PASSING
            self.record = Record(passing, 15, 0)
            membership.members, membership.listed_at = ("A", "B0", "C0"), 20

    class Store:
        async def put_fenced(self, key: bytes, value: bytes, **fence: Any) -> int:
            attempts.append(fence["mod_revision"])
            raise Conflict(KeyValue(key, b"", 15, 0))  # the record moved on (C0's verdict)

    checker = _checker(View(), Store(), membership)
    target = checker.targets[KEY] = Target(KEY, Spec.of(RECORD.check), RECORD.address, 0)
    checker.mine.add(KEY)
    async with asyncio.timeout(5):
        await checker._write(target, CRITICAL, "tcp connect refused, 3 consecutive failures")
    assert attempts == [10]  # no second attempt over C0's verdict
    assert target.state != CRITICAL


def _stalled_tls_server(pki: Pki) -> tuple[int, threading.Event, threading.Thread]:
    """A TLS server that completes each handshake and then neither reads nor writes."""
    issued = pki.ca.issue(common_name="backend", ips=("127.0.0.1",), out=pki.dir / "backend")
    assert issued.cert_path and issued.key_path
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(issued.cert_path, issued.key_path)
    listener = socket.create_server(("127.0.0.1", 0))
    stop, held = threading.Event(), []

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                conn.settimeout(5)
                held.append(ctx.wrap_socket(conn, server_side=True))
            except (TimeoutError, OSError):
                continue
        listener.close()
        for conn in held:  # closed here, not left to the garbage collector's warning
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], stop, thread


async def test_a_stalled_tls_backend_fails_within_the_timeout(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    port, stop, thread = _stalled_tls_server(pki)
    try:
        spec = Spec.of(
            HealthCheck(
                kind=HealthCheck.HTTP,
                http_path="/health",
                tls=True,
                tls_ca_pem=pki.ca_path.read_text(),
                timeout_ms=300,
                interval_ms=1000,
            )
        )
        started = time.monotonic()
        async with asyncio.timeout(10):
            outcome = await probe(spec, f"127.0.0.1:{port}")
        assert not outcome.healthy and "timed out" in outcome.reason, outcome
        assert time.monotonic() - started < 2.0  # not the TLS close's 30 s wait
    finally:
        stop.set()
        thread.join(timeout=5)
