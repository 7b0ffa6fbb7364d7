"""The drill's load: outcomes told by the client's status codes (never by message text), the
region that served a call, and the observer's view folded from Watch messages, against
scripted gRPC servers on 127.0.0.1 (no etcd)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
import grpc.aio
import pytest

from discovery.drill.history import History, Outcome
from discovery.drill.load import (
    InstanceKey,
    LoadSettings,
    Observer,
    RegionLoad,
    ViewFold,
    answered_by,
    outcome_of,
    short,
)
from discovery_client import (
    DiscoveryClientError,
    InvalidArgument,
    NotFound,
    ServerError,
    Unavailable,
    Unreachable,
)
from discovery_pb.v1 import lookup_pb2, registry_pb2, types_pb2

OK, FAILED, UNKNOWN = Outcome.OK, Outcome.FAILED, Outcome.UNKNOWN
Code: TypeAlias = grpc.StatusCode
SERVER = "127.0.0.1:1"


def _error(cls: type[DiscoveryClientError], code: Code | None, *attempts: DiscoveryClientError) -> DiscoveryClientError:
    # The message says "deadline" whatever the code: nothing may read it.
    return cls("deadline exceeded: DEADLINE_EXCEEDED", code=code, details="deadline", server=SERVER, attempts=attempts)


TIMED_OUT = _error(Unavailable, Code.DEADLINE_EXCEEDED)
ANSWERED_UNAVAILABLE = _error(Unavailable, Code.UNAVAILABLE)
REFUSED = _error(Unreachable, Code.UNAVAILABLE)


# --- the classification table ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "outcome", "label"),
    [
        (_error(Unavailable, None), UNKNOWN, "no status"),  # the client's own deadline
        (TIMED_OUT, UNKNOWN, "DEADLINE_EXCEEDED"),
        (_error(Unavailable, Code.UNAVAILABLE, TIMED_OUT, ANSWERED_UNAVAILABLE), UNKNOWN, "DEADLINE_EXCEEDED"),
        (_error(Unavailable, Code.UNAVAILABLE, REFUSED, TIMED_OUT, REFUSED), UNKNOWN, "DEADLINE_EXCEEDED"),
        (_error(Unreachable, Code.UNAVAILABLE, REFUSED, REFUSED), FAILED, "UNAVAILABLE (unreachable)"),
        (REFUSED, FAILED, "UNAVAILABLE (unreachable)"),
        (_error(Unavailable, Code.UNAVAILABLE, REFUSED, ANSWERED_UNAVAILABLE), FAILED, "UNAVAILABLE"),
        (ANSWERED_UNAVAILABLE, FAILED, "UNAVAILABLE"),
        (_error(NotFound, Code.NOT_FOUND), FAILED, "NOT_FOUND"),
        (_error(InvalidArgument, Code.INVALID_ARGUMENT), FAILED, "INVALID_ARGUMENT"),
        (_error(ServerError, Code.INTERNAL), FAILED, "INTERNAL"),
        (_error(ServerError, Code.FAILED_PRECONDITION), FAILED, "FAILED_PRECONDITION"),
    ],
    ids=[
        "no-status",
        "deadline",
        "deadline-then-unavailable",
        "one-attempt-of-three-timed-out",
        "unreachable-every-attempt",
        "unreachable",
        "refused-then-answered-unavailable",
        "answered-unavailable",
        "not-found",
        "invalid-argument",
        "internal",
        "failed-precondition",
    ],
)
def test_outcomes_and_labels_come_from_codes(error: DiscoveryClientError, outcome: Outcome, label: str) -> None:
    assert outcome_of(error) is outcome
    assert short(error) == label


def test_the_region_that_served_a_resolve_is_the_one_marked_local() -> None:
    answer = lookup_pb2.ResolveResponse(
        regions=[lookup_pb2.RegionState(region="a", endpoints=1), lookup_pb2.RegionState(region="b", local=True)]
    )
    assert answered_by(answer) == "b"
    # The answering region contributed nothing: the answer does not name it.
    assert answered_by(lookup_pb2.ResolveResponse(regions=[lookup_pb2.RegionState(region="a")])) == ""
    assert answered_by(lookup_pb2.ResolveResponse()) == ""


# --- folding a Watch --------------------------------------------------------------------------


def _instance(iid: str, region: str = "a") -> types_pb2.Instance:
    return types_pb2.Instance(service="s", region=region, instance_id=iid, address="10.0.0.1:80")


def snapshot(revision: int, *iids: str, more: bool = False) -> lookup_pb2.WatchResponse:
    return lookup_pb2.WatchResponse(
        kind=lookup_pb2.WatchResponse.SNAPSHOT, revision=revision, instances=[_instance(i) for i in iids], more=more
    )


def changes(revision: int, *edits: tuple[str, str]) -> lookup_pb2.WatchResponse:
    out = []
    for kind, iid in edits:
        if kind == "put":
            out.append(
                types_pb2.Change(kind=types_pb2.Change.PUT, region="a", instance_id=iid, instance=_instance(iid))
            )
        else:
            out.append(types_pb2.Change(kind=types_pb2.Change.DELETE, region="a", instance_id=iid))
    return lookup_pb2.WatchResponse(kind=lookup_pb2.WatchResponse.CHANGES, revision=revision, changes=out)


def keepalive(revision: int) -> lookup_pb2.WatchResponse:
    return lookup_pb2.WatchResponse(kind=lookup_pb2.WatchResponse.KEEPALIVE, revision=revision)


def keys(*iids: str) -> frozenset[InstanceKey]:
    return frozenset(("a", i) for i in iids)


def test_a_snapshot_in_parts_is_one_view_at_its_last_part() -> None:
    fold = ViewFold()
    assert fold.apply(snapshot(5, "x", more=True)) is None
    assert not fold.has_view and fold.revision == 0  # a resume must not skip the rest of it
    assert fold.apply(snapshot(5, "y")) == keys("x", "y")
    assert fold.has_view and fold.revision == 5


def test_changes_edit_the_view_and_keepalives_only_move_the_revision() -> None:
    fold = ViewFold()
    fold.apply(snapshot(5, "x", "y"))
    assert fold.apply(changes(7, ("delete", "x"), ("put", "z"))) == keys("y", "z")
    assert fold.apply(changes(8, ("put", "z"))) == keys("y", "z")  # an update of one present
    assert fold.apply(keepalive(9)) is None
    assert fold.view == keys("y", "z") and fold.revision == 9


def test_a_snapshot_cut_off_by_a_broken_stream_is_dropped() -> None:
    fold = ViewFold()
    fold.apply(snapshot(5, "x"))
    fold.apply(snapshot(9, "gone-later", more=True))  # the stream breaks here; resumed from 5
    assert fold.revision == 5
    assert fold.apply(snapshot(12, "y", more=True)) is None  # a new snapshot: a new revision
    assert fold.apply(snapshot(12, "z")) == keys("y", "z")
    fold.apply(snapshot(14, "gone-later", more=True))  # broken again; resumed from 12: changes
    assert fold.apply(changes(13, ("delete", "y"))) == keys("z")
    assert fold.apply(snapshot(15, "w")) == keys("w")  # a snapshot replaces the view


# --- scripted servers -------------------------------------------------------------------------


Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start a server with the given generic handlers: {(service, method): handler}."""
    servers: list[grpc.aio.Server] = []

    async def _start(handlers: dict[tuple[str, str], Any]) -> str:
        server = grpc.aio.server()
        by_service: dict[str, dict[str, Any]] = {}
        for (service, method), handler in handlers.items():
            by_service.setdefault(service, {})[method] = handler
        server.add_generic_rpc_handlers(
            tuple(grpc.method_handlers_generic_handler(f"discovery.v1.{s}", m) for s, m in by_service.items())
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield _start
    for server in servers:
        await server.stop(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unary(answer: Callable[[grpc.aio.ServicerContext], Awaitable[bytes]]) -> Any:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await answer(context)

    return grpc.unary_unary_rpc_method_handler(handler)


def aborting(code: Code) -> Any:
    async def answer(context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(code, "etcd did not answer: deadline exceeded")  # text nothing may read
        return b""

    return unary(answer)


async def _hang(context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(60)
    return b""


SETTINGS = LoadSettings(leased=0, op_timeout=0.6)


def region_load(servers: tuple[str, ...], failover: tuple[str, ...] = (), region: str = "a") -> RegionLoad:
    return RegionLoad(
        region=region,
        index=0,
        servers=servers,
        failover=failover,
        service="drill-test",
        history=History(),
        settings=SETTINGS,
    )


async def test_writes_are_unknown_when_they_timed_out_and_failed_when_refused_or_answered(serve: Any) -> None:
    registered = registry_pb2.RegisterResponse(instance_id="churn-0", revision=3).SerializeToString()

    async def ok(context: grpc.aio.ServicerContext) -> bytes:
        return registered

    cases: list[tuple[str, Outcome, tuple[str, ...]]] = [
        (await serve({("Registry", "Register"): unary(ok)}), OK, ("",)),
        (await serve({("Registry", "Register"): unary(_hang)}), UNKNOWN, ("DEADLINE_EXCEEDED", "timeout")),
        (await serve({("Registry", "Register"): aborting(Code.UNAVAILABLE)}), FAILED, ("UNAVAILABLE",)),
        (await serve({("Registry", "Register"): aborting(Code.INVALID_ARGUMENT)}), FAILED, ("INVALID_ARGUMENT",)),
        (f"127.0.0.1:{free_port()}", FAILED, ("UNAVAILABLE (unreachable)",)),
    ]
    for server, outcome, labels in cases:
        load = region_load((server,))
        try:
            await load._register()
        finally:
            await load._writes.close()
            await load._reads.close()
        (op,) = load.history.ops
        assert (op.kind, op.key, op.outcome) == ("register", "churn-0", outcome), (server, op)
        assert op.error in labels, (server, op)
        assert op.served_by == ("a" if outcome is OK else "")
        assert op.latency < SETTINGS.op_timeout + 0.5


async def test_resolves_fail_over_in_order_and_record_the_region_that_answered(serve: Any) -> None:
    answers: list[str] = []

    def answering(region: str) -> Any:
        async def answer(context: grpc.aio.ServicerContext) -> bytes:
            answers.append(region)
            local = lookup_pb2.RegionState(region=region, endpoints=1, local=True)
            return lookup_pb2.ResolveResponse(service="drill-test", regions=[local]).SerializeToString()

        return unary(answer)

    down = f"127.0.0.1:{free_port()}"
    b = await serve({("Lookup", "Resolve"): answering("b")})
    c = await serve({("Lookup", "Resolve"): answering("c")})
    load = region_load((down,), (b, c))
    try:
        await load._resolve()
        await load._resolve()  # the server that answered last is tried first
    finally:
        await load._writes.close()
        await load._reads.close()
    assert [(o.outcome, o.served_by) for o in load.history.ops] == [(OK, "b"), (OK, "b")]
    assert answers == ["b", "b"]


async def test_a_failed_deregistration_keeps_the_instance_for_the_clean_up(serve: Any) -> None:
    server = await serve({("Registry", "Deregister"): aborting(Code.NOT_FOUND)})
    load = region_load((server,))
    try:
        await load._deregister("churn-7")
    finally:
        await load._writes.close()
        await load._reads.close()
    (op,) = load.history.ops
    assert (op.kind, op.key, op.outcome, op.error) == ("deregister", "churn-7", FAILED, "NOT_FOUND")


# --- the observer -----------------------------------------------------------------------------


async def test_the_observer_times_every_change_and_resumes_a_broken_watch(serve: Any) -> None:
    """Stream 1: a snapshot in two parts, x leaves, the stream ends. Stream 2 resumes from the
    last revision: x comes back (a flap the analysis must see)."""
    since: list[int] = []
    step = asyncio.Event()

    async def watch(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        req = lookup_pb2.WatchRequest.FromString(request)
        since.append(req.since_revision)
        if req.since_revision == 0:
            yield snapshot(5, "x", more=True).SerializeToString()
            yield snapshot(5, "y").SerializeToString()
            await step.wait()
            yield changes(6, ("delete", "x")).SerializeToString()
            return  # the stream breaks
        yield changes(7, ("put", "x")).SerializeToString()
        await asyncio.sleep(60)

    server = await serve({("Lookup", "Watch"): grpc.unary_stream_rpc_method_handler(watch)})
    observer = Observer("a", (server,), "drill-test", op_timeout=1.0)
    try:
        await observer.start(timeout=5)
        assert observer.presence.current == keys("x", "y")
        step.set()
        deadline = time.monotonic() + 5
        while len(observer.presence.changes.get(("a", "x"), [])) < 3:
            assert time.monotonic() < deadline, observer.presence.changes
            observer.changed.clear()
            await asyncio.wait_for(observer.changed.wait(), 5)
    finally:
        await observer.close()
    assert since == [0, 6]
    moves = observer.presence.changes[("a", "x")]
    assert [present for _, present in moves] == [True, False, True]
    assert moves[0][0] < moves[1][0] <= moves[2][0]
    assert observer.presence.current == keys("x", "y")


async def test_an_observer_whose_region_does_not_answer_fails_to_start() -> None:
    observer = Observer("a", (f"127.0.0.1:{free_port()}",), "drill-test", op_timeout=0.5)
    try:
        with pytest.raises(Unreachable):
            await observer.start(timeout=5)
    finally:
        await observer.close()


async def test_a_refused_watch_fails_the_observer_at_once(serve: Any) -> None:
    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await context.abort(Code.INVALID_ARGUMENT, "service: bad name")
        yield b""

    server = await serve({("Lookup", "Watch"): grpc.unary_stream_rpc_method_handler(refuse)})
    observer = Observer("a", (server,), "drill-test", op_timeout=1.0)
    try:
        with pytest.raises(InvalidArgument):
            await observer.start(timeout=5)
    finally:
        await observer.close()
