"""The replicator's feed over gRPC: ``Replication.Stream`` from one of the origin's servers.

The only module of the replication package that speaks gRPC. Inter-region calls never sit on
a request path, and a hung peer is noticed by gRPC keep-alive and by the origin's heartbeats
stopping (``silence`` seconds), not by TCP. Every failure reaches the loop as ``FeedLost``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import grpc
import grpc.aio

from discovery.replication.feed import FeedLost
from discovery.security.certs import server_id
from discovery.security.tls import MaterialError, PeerMismatch, TlsFiles, channel_credentials, check_peer, peer_uris
from discovery_pb.v1 import replication_pb2 as pb
from discovery_pb.v1.replication_pb2_grpc import ReplicationStub

PEER_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 1_000),
    ("grpc.keepalive_timeout_ms", 1_000),
    ("grpc.http2.ping_timeout_ms", 1_000),  # what actually bounds the wait for a ping's answer
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


@dataclass(frozen=True, slots=True)
class PeerTls:
    """How a replicator dials peers over mTLS: our own certificate (``files``: the server's
    certificate, key and CA bundle) and the identity every server of the origin must present,
    ``spiffe://<trust_domain>/discovery/server/<origin>``."""

    files: TlsFiles
    trust_domain: str


class GrpcFeed:
    """``Feed`` for one origin region, asked for by ``requester`` (the local region); a
    server silent for ``silence`` seconds is lost (it heartbeats several times within it: a
    hung peer, a black hole). With ``tls``, each connection first checks that the server is
    one of the origin's (its URI SAN), and nothing is read from one that is not."""

    def __init__(self, origin: str, *, requester: str, silence: float, tls: PeerTls | None = None) -> None:
        self._origin = origin
        self._requester = requester
        self._silence = silence
        self._tls = tls

    async def _channel(self, endpoint: str) -> grpc.aio.Channel:
        if self._tls is None:
            return grpc.aio.insecure_channel(endpoint, options=PEER_CHANNEL_OPTIONS)
        expected = server_id(self._tls.trust_domain, self._origin)
        try:
            # grpc Python shows a client nothing of the server's certificate: one handshake of
            # our own on the same address reads it (a balancer in between sends both to servers
            # of one region, and the gRPC connection is verified against the same CA).
            uris = await peer_uris(endpoint, self._tls.files, timeout=self._silence)
            check_peer(uris, expected, address=endpoint)
            credentials = await asyncio.to_thread(channel_credentials, self._tls.files)
        except PeerMismatch as exc:
            raise FeedLost(str(exc)) from None
        except (OSError, TimeoutError, MaterialError) as exc:
            raise FeedLost(f"TLS to {endpoint} failed: {exc}") from None
        return grpc.aio.secure_channel(endpoint, credentials, options=PEER_CHANNEL_OPTIONS)

    async def follow(self, endpoint: str, since: int, cluster_id: int) -> AsyncGenerator[pb.StreamResponse, None]:
        request = pb.StreamRequest(
            since_revision=since, origin=self._origin, requester=self._requester, cluster_id=cluster_id
        )
        try:
            async with await self._channel(endpoint) as channel:
                call = ReplicationStub(channel).Stream(request)
                try:
                    while True:
                        # Only the read is timed: the caller's work on a message is not silence.
                        async with asyncio.timeout(self._silence):
                            msg = await call.read()
                        if msg is grpc.aio.EOF:
                            raise FeedLost("the origin ended the stream")
                        yield msg
                finally:
                    call.cancel()
        except grpc.aio.AioRpcError as exc:
            raise FeedLost(f"{exc.code().name}: {exc.details()}") from None
        except TimeoutError:
            raise FeedLost(f"nothing heard for {self._silence:g}s") from None
