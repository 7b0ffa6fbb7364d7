"""The one RetryPolicy: backoff with jitter, capped, for as long as an outage lasts."""

from __future__ import annotations

from discovery_client import RetryPolicy


def test_the_delay_doubles_to_its_cap_within_the_jitter() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=2.0, jitter=0.2)
    for attempt, expected in ((0, 0.1), (1, 0.2), (3, 0.8), (5, 2.0), (50, 2.0)):
        assert expected * 0.8 <= policy.delay(attempt) <= expected * 1.2


def test_a_long_outage_stays_at_the_cap() -> None:
    # The view and the replicator count failed attempts for as long as etcd or a peer is gone:
    # at 2 s apiece, 1,100 attempts is 37 minutes; 2.0 ** 1100 overflows a float.
    assert RetryPolicy(jitter=0).delay(1100) == 2.0
    assert RetryPolicy(jitter=0, multiplier=1e6).delay(10_000) == 2.0


def test_a_status_grpc_lost_under_a_write_reopens_the_stream_instead_of_failing() -> None:
    """grpc.aio answers INTERNAL "Internal error from Core" to a Heartbeat write that meets
    the server's end of the stream (seen by hundreds of clients after a region froze): the
    keep-alive opens a new stream, where the server's own answer is heard, instead of raising
    an internal error to the application."""
    import grpc
    import grpc.aio
    import pytest

    from discovery_client.errors import is_lost_status
    from discovery_client.keepalive import LeaseKeeper, StreamBroken

    def rpc(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    lost = rpc(grpc.StatusCode.INTERNAL, "Internal error from Core")
    assert is_lost_status(lost)
    assert not is_lost_status(rpc(grpc.StatusCode.INTERNAL, "a real server fault"))
    assert not is_lost_status(rpc(grpc.StatusCode.NOT_FOUND, "Internal error from Core"))
    keepalive = LeaseKeeper.__new__(LeaseKeeper)  # only _raise_for, which reads the lease
    keepalive._lease = lambda: 7  # type: ignore[method-assign]
    with pytest.raises(StreamBroken, match="INTERNAL"):
        keepalive._raise_for(lost, 7, "127.0.0.1:1")
