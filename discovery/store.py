"""The only module that talks to etcd.

Every call has a deadline: a hung etcd (SIGSTOP) accepts TCP and never answers, so only
deadlines and gRPC keep-alive notice it. Failures surface as ``StoreUnavailable`` with a
message that names etcd; compaction under a watch surfaces as ``Compacted`` so the view can
re-list (skipping ahead would lose events).

Over TLS (``EtcdTls``) the client certificate is etcd's user (``--client-cert-auth``: its CN);
RBAC confines each region's user to its key prefix. ``check_access`` proves at start that the
user may read and write the prefix, so a server without the grant stops with a message that
names the user, instead of retrying forever; a refusal later surfaces as ``StoreForbidden`` (UNAVAILABLE to callers).
``reload_tls`` swaps in a client with new files: new operations use it, those under way finish
on the old one, and the watch moves over at the revision it had reached (so no event is lost
or repeated). etcd's NOSPACE alarm turns writes into ``ResourceExhausted("etcd_space")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from etcd3aio import EtcdError, EtcdPermissionDeniedError
from etcd3aio._protobuf import (  # the generated etcd API that etcd3aio ships
    KVStub,
    LeaseKeepAliveRequest,
    LeaseStub,
    RangeRequest,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio._protobuf import rpc_pb2 as _rpc  # type: ignore[attr-defined]  # not re-exported
from etcd3aio.connections import ConnectionManager
from etcd3aio.kv import KVService, prefix_range_end
from etcd3aio.lease import LeaseService

from discovery import etcd_endpoints
from discovery.errors import (
    Compacted,
    Conflict,
    Fenced,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StoreForbidden,
    StoreUnavailable,
)
from discovery.groupcommit import GroupCommit, Retry
from discovery.tasks import stop_task

log = logging.getLogger(__name__)

# A listing's pages: the first of _PAGE keys, the next sized from the bytes per key seen so
# far to about _PAGE_BYTES (far below gRPC's 4 MiB message limit), within _PAGE_MIN.._PAGE_MAX.
# Few pages matter: etcd walks every key to the end of the range to count them for each page,
# so 100,000 keys in pages of 1000 took 1.2-1.6 s, in pages of about 7000 under 0.5 s.
_PAGE = 1000
_PAGE_BYTES = 2 << 20
_PAGE_MIN, _PAGE_MAX = 100, 10_000
_EVENT_DELETE = 1  # mvccpb.Event.DELETE
_PUT_BATCH = 100  # puts per group-commit transaction: under etcd's --max-txn-ops (128 by default)
_PUT_BATCH_BYTES = 512 * 1024  # ... and bytes: well under etcd's --max-request-bytes (1.5 MiB by default)
# What etcd answers when one put of a transaction cannot be applied (an expired lease, a
# request too large): the batch is split rather than failing every caller in it.
_ONE_PUTS_FAULT = frozenset(
    {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
)
_REQUIRE_LEADER = (("hasleader", "true"),)  # etcd ends the watch when its member loses the leader

# Keys under ``<prefix>_probe/`` are the store's own: no key schema name starts with "_", and
# the view keeps a non-instance key only as opaque metadata, so probes never reach a caller.
PROBE = b"_probe/"
DEFAULT_HEALTH_KEY = b"/discovery/v1/" + PROBE + b"health"  # inside the default prefix
_PROBE_TTL = 10  # a probe key left by a crash between put and delete goes with its lease

NOSPACE_ADVICE = (
    "region's etcd is out of space (NOSPACE alarm): writes are refused until an operator compacts, "
    "defragments and disarms it; reads keep serving (docs/security.md runbook)"
)
_NOSPACE_RETRY = 30.0  # seconds: recovery takes an operator, not a retry loop
# etcd endpoints given by name are resolved again this often, and after a failure (at most
# once per _RESOLVE_MIN); while none resolves, every _RESOLVE_MIN (docs: README, etcd by name).
RESOLVE_EVERY = 30.0
_RESOLVE_MIN = 1.0
_RBAC_ADVICE = "grant it a role with readwrite on that prefix (docs/security.md, etcd RBAC)"


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """etcd over TLS: the CA bundle that signed etcd's certificates, and the client
    certificate and key etcd maps to a user (its CN, under ``--client-cert-auth``). Paths, read
    at connect and by ``Store.reload_tls``. ``server_name``: the name etcd's certificate is
    checked against; required with several endpoints (one gRPC channel balances over them),
    with one it defaults to the endpoint's host."""

    ca: str | Path
    cert: str | Path = ""
    key: str | Path = ""
    server_name: str = ""


@dataclass(frozen=True, slots=True)
class _Material:
    """What the files of an ``EtcdTls`` held when read, checked to work together."""

    ca: bytes
    cert: bytes | None
    key: bytes | None
    identity: str  # the certificate's CN: etcd's user name for this server
    expires: datetime.datetime | None


def _read(path: str | Path, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(setting, f"cannot read {path}: {exc.strerror or exc}") from None


def _read_material(tls: EtcdTls) -> _Material:
    """Read and check the files: InvalidArgument naming the setting and the file when they
    cannot work, so a server does not start on them and a half-written rotation is never put
    to use."""
    ca = _read(tls.ca, "etcd_ca")
    try:
        x509.load_pem_x509_certificates(ca)
    except ValueError:
        raise InvalidArgument("etcd_ca", f"{tls.ca}: not a PEM certificate bundle") from None
    if not tls.cert:
        return _Material(ca, None, None, "", None)
    cert, key = _read(tls.cert, "etcd_cert"), _read(tls.key, "etcd_key")
    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
    except ValueError:
        raise InvalidArgument("etcd_cert", f"{tls.cert}: not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise InvalidArgument("etcd_key", f"{tls.key}: not an unencrypted PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise InvalidArgument("etcd_cert", f"{tls.key} is not the key of {tls.cert}")
    if leaf.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        raise InvalidArgument("etcd_cert", f"{tls.cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    identity = str(names[0].value) if names else ""
    return _Material(ca, cert, key, identity, leaf.not_valid_after_utc)


def check_tls(tls: EtcdTls) -> str:
    """Read and check the files as ``Store`` will at connect (``discovery serve
    --check-config``): the etcd user the certificate names (its CN), "" without one.
    InvalidArgument naming the setting and the file when they cannot work."""
    return _read_material(tls).identity


class _Client:
    """One gRPC channel to etcd and what runs on it. Replaced whole when the TLS files change
    (gRPC channel credentials cannot be reloaded); the old one closes once nothing uses it."""

    def __init__(self, channel: grpc.aio.Channel, material: _Material | None) -> None:
        self.channel = channel
        self.kv = KVService(channel)
        self.lease = LeaseService(channel)
        self.keepalive = _LeaseKeepAliveStream(channel)
        self.material = material
        self.users = 0  # operations and streams under way
        self.idle = asyncio.Event()
        self.idle.set()
        self.retired = False
        self.watches: set[asyncio.Queue[Any]] = set()  # request queues of watches on this channel

    def enter(self) -> None:
        self.users += 1
        self.idle.clear()

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.idle.set()

    async def close(self) -> None:
        await self.keepalive.close()
        await self.channel.close()


@dataclass(frozen=True, slots=True)
class Write:
    """One operation of a fenced transaction: a put, or a delete when ``value`` is None."""

    key: bytes
    value: bytes | None


@dataclass(frozen=True, slots=True)
class _Put:
    key: bytes
    value: bytes
    lease: int
    expect: int | None  # the mod_revision the key must still have (0: absent), None: unconditional


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Event:
    deleted: bool
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response.

    ``events`` are in revision order and ``revision`` says everything up to it has been
    delivered (for a progress notification, ``events`` is empty). ``created``: the watch has
    just been established (revision 0, no events): etcd is answering. ``requested``: the
    answer to ``request_progress``, which etcd before 3.5.8 may send ahead of events still
    due (issue 15220): to be confirmed before it counts, and never a point to resume from.
    """

    revision: int
    events: list[Event] = field(default_factory=list)
    created: bool = False
    requested: bool = False


@dataclass(frozen=True, slots=True)
class StoreHealth:
    healthy: bool
    revision: int
    error: str


class Store:
    """An etcd cluster, as the rest of the server needs it.

    Args:
        endpoints: ``IPv4:PORT``, ``[IPv6]:PORT`` or ``NAME:PORT`` of the members; requests
            rotate over every address (a name's A and AAAA records: discovery/etcd_endpoints.py).
        op_timeout: deadline of one operation, retries included (seconds).
        keepalive: gRPC keep-alive interval and timeout (seconds); a hung member is noticed
            in about twice this. etcd must permit it (``--grpc-keepalive-min-time``).
        tls: connect over TLS with these files (plaintext without).
        health_key: the key ``health`` reads; inside the server's prefix, where RBAC lets it
            read (``<prefix>_probe/health``).
        tls_grace: after ``reload_tls`` (or the names resolving to other addresses), the
            longest the old client stays open for what is still under way on it (seconds).
        lookup: how a name is resolved (the system resolver; tests give a table).
        resolve_every: how often names are resolved again (seconds).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        op_timeout: float = 3.0,
        keepalive: float = 1.0,
        tls: EtcdTls | None = None,
        health_key: bytes = DEFAULT_HEALTH_KEY,
        tls_grace: float = 30.0,
        lookup: etcd_endpoints.Lookup = etcd_endpoints.system_lookup,
        resolve_every: float = RESOLVE_EVERY,
    ) -> None:
        self.endpoints = list(endpoints)
        self._parsed = etcd_endpoints.parse(self.endpoints)
        self._lookup = lookup
        self._resolve_every = resolve_every
        self.addresses: tuple[str, ...] = ()  # what the current client dials
        self._by_endpoint: Mapping[str, tuple[str, ...]] = {}  # each endpoint's last good addresses
        self._unresolved = ""  # why no endpoint resolves, while none does
        self._resolve_now = asyncio.Event()  # a failure: the addresses may have moved
        self._resolver: asyncio.Task[None] | None = None
        self._material: _Material | None = None
        self._op_timeout = op_timeout
        self._tls = tls
        self._health_key = health_key
        self._tls_grace = tls_grace
        self._server_name = ""
        if tls is not None:
            self._server_name = tls.server_name or _server_name(self._parsed)
        ms = int(keepalive * 1000)
        self._manager = ConnectionManager(self.endpoints, keepalive_time_ms=ms, keepalive_timeout_ms=ms)
        options = dict(self._manager.grpc_options)
        options.update(
            {
                # Keep pinging while a call is open even when no data flows: an idle watch on a
                # hung etcd sends nothing, and by default gRPC stops pinging after two pings.
                "grpc.http2.max_pings_without_data": 0,
                # What bounds the wait for a ping's answer in current gRPC (the keep-alive
                # timeout alone does not: a SIGSTOPped etcd went unnoticed for good).
                "grpc.http2.ping_timeout_ms": ms,
                # No pings without a call: etcd allows none (three earn a GOAWAY, after which
                # gRPC pings this channel half as often for good).
                "grpc.keepalive_permit_without_calls": 0,
                # Reconnect within a second of etcd coming back, not after gRPC's default
                # backoff that grows to two minutes while it is down.
                "grpc.initial_reconnect_backoff_ms": 100,
                "grpc.max_reconnect_backoff_ms": max(1000, ms),
            }
        )
        self._manager.grpc_options = list(options.items())
        self._client: _Client | None = None
        self._retiring: dict[_Client, asyncio.Task[None]] = {}  # clients replaced by reload_tls, and their closers
        self._reloading = asyncio.Lock()  # the poll loop and SIGHUP may ask at once
        self._reload_error = ""  # why the files last failed to load, logged once
        self._watch_requests: asyncio.Queue[Any] | None = None  # of the current watch, once created
        self.cluster_id = 0  # of the etcd cluster, from the last listing (a rebuilt cluster has a new one)
        # etcd's raft term, from the last response header that had one: a new term means a new
        # leader, and a new leader extends every lease (none expires because of the change).
        self.raft_term = 0
        # Concurrent puts go to etcd together, a transaction per batch (docs/capacity.md).
        self._puts: GroupCommit[_Put, tuple[int, KeyValue | None]] = GroupCommit(
            self._send_puts,
            key=lambda p: p.key,
            weight=lambda p: len(p.key) + len(p.value),
            max_batch=_PUT_BATCH,
            max_weight=_PUT_BATCH_BYTES,
        )

    async def __aenter__(self) -> Store:
        """Connect. Over TLS, unreadable or mismatched files raise InvalidArgument here (naming
        the setting and the file): a server must not start on them."""
        material = await asyncio.to_thread(_read_material, self._tls) if self._tls is not None else None
        self._material = material
        try:
            resolved = await etcd_endpoints.resolve(self._parsed, self._lookup)
            self.addresses, self._by_endpoint = resolved.addresses, resolved.by_endpoint
        except StoreUnavailable as exc:
            # Not fatal here: etcd may come up (and its names appear in DNS) after us. Every
            # operation fails with this until a name resolves; the caller decides how long to wait.
            self._unresolved = str(exc)
            log.warning("%s", exc)
        else:
            self._client = self._connect(material)
        if not all(e.literal for e in self._parsed):
            self._resolver = asyncio.create_task(self._follow_names(), name="etcd-resolve")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _connect(self, material: _Material | None) -> _Client:
        self._manager.target = etcd_endpoints.target(self.addresses)
        if material is None:
            return _Client(self._manager.get_channel(), None)
        channel = self._manager.get_channel(
            ca_cert=material.ca, cert_key=material.key, cert_chain=material.cert, tls_server_name=self._server_name
        )
        return _Client(channel, material)

    async def close(self) -> None:
        if self._resolver is not None:
            await stop_task(self._resolver)
            self._resolver = None
        await self._puts.close()
        for client, task in list(self._retiring.items()):
            await stop_task(task)
            await client.close()
        self._retiring.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def identity(self) -> str:
        """Who etcd takes this server for, for messages: its user, from the certificate's CN."""
        material = self._client.material if self._client else None
        if self._tls is None or not self._tls.cert:
            return "this server (it presents no client certificate, so etcd knows no user for it)"
        if material is None or not material.identity:
            return f"this server's certificate {self._tls.cert} (it has no CN, which etcd takes as the user)"
        return f"user {material.identity!r} (the CN of {self._tls.cert})"

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._current().channel

    def _current(self) -> _Client:
        if self._client is None:
            raise StoreUnavailable(self._unresolved or "etcd client is closed")
        return self._client

    async def _follow_names(self) -> None:
        """Resolve the names again every ``resolve_every`` and soon after a failure (a
        member rescheduled elsewhere answers under its name at a new address); a new answer
        moves every operation and the watch to a channel over the new addresses. At most one
        resolution a second (failures come in bursts); a surprise is logged, never the end of it."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RESOLVE_MIN if self._client is None else self._resolve_every):
                    await self._resolve_now.wait()
            self._resolve_now.clear()
            try:
                await self._resolve_again()
            except Exception:
                log.exception("etcd: resolving %s failed; trying again", ",".join(self.endpoints))
            await asyncio.sleep(_RESOLVE_MIN)

    async def _resolve_again(self) -> None:
        try:
            resolved = await etcd_endpoints.resolve(self._parsed, self._lookup, keep=self._by_endpoint)
        except StoreUnavailable as exc:
            if self._client is None:
                self._unresolved = str(exc)
            elif str(exc) != self._unresolved:  # the addresses we have may still work: kept
                log.warning("%s; still dialling %s", exc, ", ".join(self.addresses))
                self._unresolved = str(exc)
            return
        if resolved.failures and resolved.addresses != self.addresses:
            log.warning("etcd: do not resolve now (their last addresses kept): %s", ", ".join(resolved.failures))
        self._unresolved = ""
        self._by_endpoint = resolved.by_endpoint
        if resolved.addresses == self.addresses:
            return
        async with self._reloading:
            log.info(
                "etcd: %s now resolve to %s (were %s): moving to them",
                ",".join(self.endpoints),
                ", ".join(resolved.addresses),
                ", ".join(self.addresses) or "none",
            )
            self.addresses = resolved.addresses
            old = self._client
            self._client = self._connect(old.material if old is not None else self._material)
        if old is not None:
            self._retire(old)

    def _failed(self) -> None:
        """An operation failed: the names may resolve elsewhere by now."""
        self._resolve_now.set()

    @contextlib.asynccontextmanager
    async def _call(self, what: str, timeout: float | None = None, key: bytes = b"") -> AsyncIterator[_Client]:
        """Run an operation on the current client, bounded by the op timeout, and turn etcd's
        failures into ours: a refusal into StoreForbidden, NOSPACE into ResourceExhausted,
        the rest into StoreUnavailable. ``key`` names what was refused."""
        limit = timeout or self._op_timeout
        client = self._current()
        client.enter()
        try:
            async with asyncio.timeout(limit):
                yield client
        except TimeoutError:
            self._failed()
            raise StoreUnavailable(
                f"etcd at {','.join(self.endpoints)} did not answer {what} within {limit:g}s"
            ) from None
        except (EtcdError, grpc.aio.AioRpcError) as exc:
            error = self._translate(exc, what, key)
            if isinstance(error, StoreUnavailable):
                self._failed()
            raise error from None
        finally:
            client.leave()

    def _translate(self, exc: BaseException, what: str, key: bytes) -> Exception:
        rpc = exc if isinstance(exc, grpc.aio.AioRpcError) else None
        code = rpc.code() if rpc else None
        if isinstance(exc, EtcdPermissionDeniedError) or code == grpc.StatusCode.PERMISSION_DENIED:
            where = f" on {key.decode(errors='replace')!r}" if key else ""
            return StoreForbidden(
                f"etcd refuses {self.identity} {what}{where}: its role must grant readwrite on this server's "
                "key prefix (docs/security.md, etcd RBAC)"
            )
        if rpc and code == grpc.StatusCode.RESOURCE_EXHAUSTED and "space exceeded" in (rpc.details() or ""):
            return ResourceExhausted("etcd_space", NOSPACE_ADVICE, retry_after=_NOSPACE_RETRY)
        return StoreUnavailable(f"etcd at {','.join(self.endpoints)} failed {what}: {_describe(exc)}")

    # --- access and certificates ------------------------------------------------------

    async def check_access(self, prefix: bytes) -> None:
        """Prove that etcd lets this server read and write under ``prefix``: a read, then a
        put and delete of a probe key (``<prefix>_probe/...``, on a short lease). Raises
        PermissionDenied naming etcd's user and the prefix, so a server without the grant
        stops at start; StoreUnavailable when etcd does not answer."""
        probe = prefix + PROBE + f"access-{uuid.uuid4().hex}".encode()
        try:
            async with self._call("a read", key=prefix) as client:
                await client.kv.get(prefix, prefix_range_end(prefix), limit=1, keys_only=True, timeout=self._op_timeout)
            lease = await self.grant(_PROBE_TTL)
            try:
                async with self._call("a write", key=probe) as client:
                    await client.kv.put(probe, b"", lease=lease, timeout=self._op_timeout)
                    await client.kv.delete(probe, timeout=self._op_timeout)
            finally:
                with contextlib.suppress(StoreUnavailable):
                    await self.revoke(lease)
        except StoreForbidden:
            raise PermissionDenied(
                f"etcd refuses {self.identity} on prefix {prefix.decode(errors='replace')!r}: {_RBAC_ADVICE}"
            ) from None
        except ResourceExhausted:
            # NOSPACE refuses every put before etcd looks at the user: the write grant cannot be
            # proved now, and stopping would take the reads (which still work) down with it.
            log.warning("etcd: cannot prove write access to %r while etcd is out of space (NOSPACE)", prefix)

    async def reload_tls(self) -> bool:
        """Use the TLS files anew if they changed: a new client takes every new operation,
        what is under way finishes on the old one (closed once idle, or after the grace), and
        the watch moves over. Files that do not work together keep the current client, with
        the reason in the log. True when a new client is in use."""
        if self._tls is None or self._client is None:
            return False
        async with self._reloading:
            try:
                material = await asyncio.to_thread(_read_material, self._tls)
            except InvalidArgument as exc:
                if str(exc) != self._reload_error:  # once per reason, not at every poll
                    log.error("etcd TLS: keeping the current client certificate: %s", exc)
                self._reload_error = str(exc)
                return False
            self._reload_error = ""
            old = self._client
            if old is None or old.material == material:
                return False
            self._client = self._connect(material)
        log.info(
            "etcd TLS: new client certificate in use (etcd user %r, valid until %s)",
            material.identity,
            f"{material.expires:%Y-%m-%d %H:%M} UTC" if material.expires else "-",
        )
        self._retire(old)
        return True

    def _retire(self, old: _Client) -> None:
        """``old`` has been replaced: what is under way on it finishes there, the watch moves over."""
        old.retired = True
        for requests in old.watches:  # an answer wakes the watch, which then moves over
            requests.put_nowait(WatchRequest(progress_request=_rpc.WatchProgressRequest()))
        self._retiring[old] = asyncio.create_task(self._close_when_idle(old), name="etcd-client-retire")

    async def _close_when_idle(self, client: _Client) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._tls_grace):
                while client.users:
                    await client.idle.wait()
        if client.users:
            log.warning("etcd: closing the previous client with %d operations still on it", client.users)
        await client.close()
        self._retiring.pop(client, None)
        log.info("etcd: the previous client is closed")

    # --- writes -----------------------------------------------------------------------

    async def put(
        self,
        key: bytes,
        value: bytes,
        ttl: int = 0,
        *,
        lease: int = 0,
        expect_mod_revision: int | None = None,
    ) -> tuple[int, int, KeyValue | None]:
        """Put ``key`` committed: on a new lease of ``ttl`` seconds when ttl > 0, on ``lease``
        when given (a session's), else on none.

        Returns (revision, the lease it is on or 0, the key as it was before or None). The
        previous record is returned so the caller can revoke a lease only that record used:
        re-registration moves the key to a fresh lease. With ``expect_mod_revision`` (0: the
        key must not exist) the put happens only if the key is still as the caller saw it, else
        ``Conflict`` carries what is there: an authorization decided on a record must not apply
        to another one written meanwhile.
        """
        lease_id = lease
        if ttl > 0 and not lease:
            async with self._call("a lease grant", key=key) as client:
                lease_id = (await client.lease.grant(ttl, timeout=self._op_timeout)).ID
        try:
            async with asyncio.timeout(self._op_timeout):
                revision, previous = await self._puts.submit(_Put(key, value, lease_id, expect_mod_revision))
        except TimeoutError:
            raise StoreUnavailable(
                f"etcd at {','.join(self.endpoints)} did not answer a put within {self._op_timeout:g}s"
            ) from None
        except Conflict:
            if lease_id and not lease:
                with contextlib.suppress(StoreUnavailable):
                    await self.revoke(lease_id)
            raise
        return revision, lease_id, previous

    async def _send_puts(self, puts: list[_Put]) -> list[tuple[int, KeyValue | None] | BaseException]:
        """One transaction for the puts a ``GroupCommit`` gathered (distinct keys). Their
        conditions are all its compares: when one fails nothing is written, the puts whose
        condition held go again (``Retry``) and the others get ``Conflict`` with what is there."""
        conditional = [p for p in puts if p.expect is not None]
        async with self._call("a put", key=puts[0].key) as client:
            kv = client.kv
            try:
                txn = await kv.txn(
                    [
                        _rpc.Compare(
                            result=_rpc.Compare.EQUAL, target=_rpc.Compare.MOD, key=p.key, mod_revision=p.expect
                        )
                        for p in conditional
                    ],
                    [kv.txn_op_put(p.key, p.value, lease=p.lease, prev_kv=True) for p in puts],
                    [kv.txn_op_get(p.key) for p in conditional],
                    timeout=self._op_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                if len(puts) == 1 or exc.code() not in _ONE_PUTS_FAULT:
                    raise
                txn = None
        if txn is None:
            # One put's own fault (its lease has expired, it is too large) fails the whole
            # transaction: each goes alone, so only that one's caller hears of it.
            alone = await asyncio.gather(*(self._send_puts([p]) for p in puts), return_exceptions=True)
            return [r if isinstance(r, BaseException) else r[0] for r in alone]
        if txn.succeeded:
            revision = int(txn.header.revision)
            return [
                (revision, _kv(r.response_put.prev_kv) if r.response_put.HasField("prev_kv") else None)
                for r in txn.responses
            ]
        found = {p.key: r.response_range.kvs for p, r in zip(conditional, txn.responses, strict=True)}
        results: list[tuple[int, KeyValue | None] | BaseException] = []
        for p in puts:
            kvs = found.get(p.key)
            current = _kv(kvs[0]) if kvs else None
            held = p.expect is None or (current.mod_revision if current else 0) == p.expect
            results.append(Retry() if held else Conflict(current))
        return results

    async def put_many(
        self, items: Sequence[tuple[bytes, bytes]], lease: int = 0, *, expected: Sequence[int] | None = None
    ) -> tuple[int, list[KeyValue | None]]:
        """Put every (key, value) on ``lease`` in one transaction (all or none); returns the
        revision and each key as it was before. With ``expected`` (a mod_revision per item, 0:
        absent) only if every key is still as the caller saw it, else ``Conflict`` whose
        ``currents`` has every key as it is now. Callers keep ``items`` within etcd's
        --max-txn-ops (128 by default)."""
        keys = [k for k, _ in items]
        compares = (
            [
                _rpc.Compare(result=_rpc.Compare.EQUAL, target=_rpc.Compare.MOD, key=k, mod_revision=rev)
                for k, rev in zip(keys, expected, strict=True)
            ]
            if expected is not None
            else []
        )
        async with self._call("a batch put", key=keys[0] if keys else b"") as client:
            kv = client.kv
            resp = await kv.txn(
                compares,
                [kv.txn_op_put(k, v, lease=lease, prev_kv=True) for k, v in items],
                [kv.txn_op_get(k) for k in keys] if compares else [],
                timeout=self._op_timeout,
            )
        if not resp.succeeded:
            currents: list[object] = [
                _kv(r.response_range.kvs[0]) if r.response_range.kvs else None for r in resp.responses
            ]
            raise Conflict(None, currents)
        previous = [_kv(r.response_put.prev_kv) if r.response_put.HasField("prev_kv") else None for r in resp.responses]
        return int(resp.header.revision), previous

    async def delete(self, key: bytes) -> tuple[int, KeyValue]:
        """Delete ``key``; returns (revision, the key as it was). NotFound when it did not exist."""
        async with self._call("a delete", key=key) as client:
            # Not retried: a retry after a delete that did commit would answer NotFound.
            resp = await client.kv.delete(key, prev_kv=True, timeout=self._op_timeout, max_attempts=1)
        if resp.deleted == 0:
            raise NotFound(key.decode(errors="replace"))
        return resp.header.revision, _kv(resp.prev_kvs[0])

    async def revoke(self, lease_id: int) -> None:
        async with self._call("a lease revoke") as client:
            with contextlib.suppress(EtcdError, grpc.aio.AioRpcError):  # already gone is fine
                await client.lease.revoke(lease_id, timeout=self._op_timeout)

    async def keep_alive(self, lease_id: int, timeout: float | None = None) -> int:
        """Refresh a lease once; returns its remaining TTL. NotFound when it has expired."""
        client: _Client | None = None
        try:
            async with self._call("a lease keep-alive", timeout) as client:
                ttl = await client.keepalive.refresh(lease_id)
        except StoreUnavailable:
            # A hung stream would swallow every later refresh: the next one opens a new stream.
            if client is not None:
                await client.keepalive.close()
            raise
        if ttl <= 0:
            raise NotFound(f"lease {lease_id:x} has expired")
        return ttl

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (etcd grants at least about 2 s)."""
        async with self._call("a lease grant") as client:
            return int((await client.lease.grant(ttl, timeout=self._op_timeout)).ID)

    async def create(self, key: bytes, value: bytes, lease: int) -> tuple[int, KeyValue | None]:
        """Create ``key`` on ``lease`` unless it exists: an election campaign.

        Returns (the key's create revision if this call created it else 0, the key as it is).
        """
        async with self._call("a create", key=key) as client:
            kv = client.kv
            resp = await kv.txn(
                [kv.txn_compare_create_revision(key, 0)],
                [kv.txn_op_put(key, value, lease=lease)],
                [kv.txn_op_get(key)],
                timeout=self._op_timeout,
            )
        if resp.succeeded:
            return int(resp.header.revision), KeyValue(key, value, resp.header.revision, lease)
        found = resp.responses[0].response_range.kvs
        if not found:
            return 0, None
        held = found[0]
        # Ours already: a retry of a create that did commit (its answer was lost).
        created = int(held.create_revision) if held.lease == lease and held.value == value else 0
        return created, KeyValue(held.key, held.value, held.mod_revision, held.lease)

    async def fenced(self, fence: tuple[bytes, int], writes: Sequence[Write]) -> int:
        """Apply ``writes`` in one transaction if the key ``fence[0]`` still has create
        revision ``fence[1]``: a deposed writer's late write fails with ``Fenced``.

        Retries (inside the op deadline) are safe: puts and deletes of fixed values apply the
        same twice. Returns the transaction's revision.
        """
        async with self._call("a fenced write", key=writes[0].key if writes else fence[0]) as client:
            kv = client.kv
            ops = [kv.txn_op_delete(w.key) if w.value is None else kv.txn_op_put(w.key, w.value) for w in writes]
            resp = await kv.txn([kv.txn_compare_create_revision(fence[0], fence[1])], ops, timeout=self._op_timeout)
        if not resp.succeeded:
            raise Fenced(f"{fence[0].decode(errors='replace')} is no longer ours (created at {fence[1]})")
        return int(resp.header.revision)

    async def put_fenced(
        self,
        key: bytes,
        value: bytes,
        *,
        lease: int,
        mod_revision: int,
        fence: tuple[bytes, int],
        members: tuple[bytes, int],
    ) -> int:
        """A health check's verdict (discovery/health/): put ``key`` on ``lease`` only if it
        still has ``mod_revision``, the writer's membership key ``fence[0]`` still has create
        revision ``fence[1]``, and no key under the prefix ``members[0]`` was created after
        revision ``members[1]`` (the writer's view of its region's checkers is current).
        ``Conflict`` carries the key as it is when the record changed; ``Fenced`` when the
        membership did."""
        prefix, listed_at = members
        async with self._call("a health verdict", key=key) as client:
            kv = client.kv
            resp = await kv.txn(
                [
                    _rpc.Compare(
                        result=_rpc.Compare.EQUAL, target=_rpc.Compare.MOD, key=key, mod_revision=mod_revision
                    ),
                    kv.txn_compare_create_revision(fence[0], fence[1]),
                    kv.txn_compare_create_revision(
                        prefix, listed_at + 1, result=_rpc.Compare.LESS, range_end=prefix_range_end(prefix)
                    ),
                ],
                [kv.txn_op_put(key, value, lease=lease)],
                [kv.txn_op_get(key)],
                timeout=self._op_timeout,
            )
        if resp.succeeded:
            return int(resp.header.revision)
        found = resp.responses[0].response_range.kvs
        if not found or found[0].mod_revision != mod_revision:
            raise Conflict(_kv(found[0]) if found else None)
        raise Fenced(f"{fence[0].decode(errors='replace')}: this checker's membership changed")

    async def get(self, key: bytes) -> KeyValue | None:
        async with self._call("a read", key=key) as client:
            resp = await client.kv.get(key, timeout=self._op_timeout)
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease)

    async def compact(self, revision: int) -> None:
        async with self._call("a compaction") as client:
            await client.kv.compact(revision, physical=True, timeout=self._op_timeout)

    # --- reads ------------------------------------------------------------------------

    async def list_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` at one revision (paged, so any size fits a message)."""
        items: list[KeyValue] = []
        revision = 0
        async for at, page in self.list_pages(prefix):
            revision = at
            items += page
        return revision, items

    async def list_pages(self, prefix: bytes) -> AsyncGenerator[tuple[int, list[KeyValue]], None]:
        """``list_prefix`` a page at a time, each with the revision they are all read at (the
        first page's), so that a reader can take each in before the next comes."""
        end = prefix_range_end(prefix)
        revision, start, limit, size, count = 0, prefix, _PAGE, 0, 0
        while True:
            async with self._call("a range read", key=prefix) as client:
                resp = await client.kv.get(start, end, revision=revision, limit=limit, timeout=self._op_timeout)
            revision = revision or resp.header.revision
            self.cluster_id, self.raft_term = resp.header.cluster_id, resp.header.raft_term
            kvs = resp.kvs
            yield revision, [KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease) for kv in kvs]
            if not resp.more or not kvs:
                return
            start = kvs[-1].key + b"\0"
            size += resp.ByteSize()
            count += len(kvs)
            limit = max(_PAGE_MIN, min(_PAGE_MAX, _PAGE_BYTES * count // max(size, 1)))
            del resp, kvs

    async def health(self) -> StoreHealth:
        """A linearizable read of one key (``health_key``): fails when etcd is down, hung or
        without quorum, or refuses this server."""
        try:
            async with self._call("a health read", key=self._health_key) as client:
                resp = await client.kv.get(self._health_key, timeout=self._op_timeout)
            self.raft_term = resp.header.raft_term
            return StoreHealth(True, resp.header.revision, "")
        except StoreUnavailable as exc:
            return StoreHealth(False, 0, str(exc))

    async def unchanged_since(self, prefix: bytes, revision: int, count: int, at: int) -> bool:
        """Whether the keys under ``prefix`` at revision ``at`` are exactly the ``count`` keys
        that were there at ``revision``: none modified after it and none gone. Two reads, used
        to trust a progress answer (never on a Resolve's own path). etcd applies
        ``min_mod_revision`` to the keys returned, not to ``count``: hence keys_only."""
        end = prefix_range_end(prefix)
        async with self._call("a range count", key=prefix) as client:
            stub = KVStub(client.channel)
            modified = await stub.Range(
                RangeRequest(key=prefix, range_end=end, revision=at, keys_only=True, min_mod_revision=revision + 1),
                timeout=self._op_timeout,
            )
            total = await stub.Range(
                RangeRequest(key=prefix, range_end=end, revision=at, count_only=True), timeout=self._op_timeout
            )
        return not modified.kvs and total.count == count

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncGenerator[WatchBatch, None]:
        """Events under ``prefix`` from ``start_revision`` on, never skipping one.

        Raises ``Compacted`` when the start revision is gone and ``StoreUnavailable`` when the
        stream breaks; the caller re-lists or resumes. The first batch says the watch is
        created; progress notifications (etcd's own and answers to ``request_progress``)
        arrive as batches without events. After ``reload_tls`` the watch moves to the new
        client by itself, from the revision it had delivered.
        """
        resume = start_revision - 1  # everything up to here has been delivered
        announced = False
        while True:
            client = self._current()
            async with contextlib.aclosing(self._watch_on(client, prefix, resume + 1)) as batches:
                async for batch in batches:
                    if batch.created:
                        if resume < 0:  # from "now" (revision 0): now is the created header's revision
                            resume = batch.revision
                        if not announced:
                            announced = True
                            yield WatchBatch(0, created=True)
                        continue
                    if batch.events or not batch.requested:
                        resume = max(resume, batch.revision)
                    yield batch
            log.info("etcd: the watch of %r moves to the new client at revision %d", prefix, resume + 1)

    async def _watch_on(self, client: _Client, prefix: bytes, start_revision: int) -> AsyncGenerator[WatchBatch, None]:
        """One watch stream on ``client``; returns (rather than raising) once the client is retired."""
        requests: asyncio.Queue[Any] = asyncio.Queue()
        create = WatchCreateRequest(
            key=prefix, range_end=prefix_range_end(prefix), start_revision=start_revision, progress_notify=True
        )
        requests.put_nowait(WatchRequest(create_request=create))
        call = WatchStub(client.channel).Watch(metadata=_REQUIRE_LEADER)
        writer = asyncio.create_task(_pump(requests, call), name="etcd-watch-writer")
        client.enter()
        client.watches.add(requests)
        try:
            while (resp := await call.read()) is not grpc.aio.EOF:
                self.raft_term = resp.header.raft_term or self.raft_term
                self._check_watch(resp)
                if resp.created:
                    self._watch_requests = requests
                    yield WatchBatch(resp.header.revision, created=True)
                if resp.events or not resp.created:
                    yield _batch(resp)
                if client.retired:
                    return
            if client.retired:  # closed under us after the grace: go on with the new client
                return
            self._failed()
            raise StoreUnavailable(f"etcd at {','.join(self.endpoints)} closed the watch stream")
        except grpc.aio.AioRpcError as exc:
            if client.retired:
                return
            self._failed()
            raise StoreUnavailable(f"etcd watch at {','.join(self.endpoints)} broke: {_describe(exc)}") from None
        finally:
            client.watches.discard(requests)
            if self._watch_requests is requests:
                self._watch_requests = None
            call.cancel()
            await stop_task(writer)
            client.leave()

    def _check_watch(self, resp: Any) -> None:
        if resp.compact_revision > 0:
            raise Compacted(resp.compact_revision)
        if resp.canceled:
            reason = resp.cancel_reason or "no reason"
            raise StoreUnavailable(
                f"etcd at {','.join(self.endpoints)} cancelled the watch: {reason}"
                + (f" (as {self.identity})" if "permission" in reason else "")
            )

    def request_progress(self) -> None:
        """Ask the current watch to report the revision it has delivered everything up to
        (a no-op while no watch is established). etcd before 3.5.8 may answer ahead of events
        it has still to send (etcd issue 15220): check the answer with ``unchanged_since``."""
        if self._watch_requests is not None:
            self._watch_requests.put_nowait(WatchRequest(progress_request=_rpc.WatchProgressRequest()))


class _LeaseKeepAliveStream:
    """One LeaseKeepAlive stream shared by every heartbeat of this server.

    Responses carry the lease id, so waiters are matched by id. A stream that errors or
    times out is dropped and the next refresh opens a new one.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._requests: asyncio.Queue[Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}

    async def refresh(self, lease_id: int) -> int:
        if self._reader is None or self._reader.done():
            self._open()
        assert self._requests is not None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(lease_id, []).append(fut)
        self._requests.put_nowait(LeaseKeepAliveRequest(ID=lease_id))
        try:
            return await fut
        finally:
            waiting = self._waiters.get(lease_id)
            if waiting and fut in waiting:
                waiting.remove(fut)

    def _open(self) -> None:
        self._requests = asyncio.Queue()
        call = LeaseStub(self._channel).LeaseKeepAlive()
        self._reader = asyncio.create_task(self._read(call, self._requests), name="etcd-keepalive-reader")

    async def _read(self, call: Any, requests: asyncio.Queue[Any]) -> None:
        writer = asyncio.create_task(_pump(requests, call), name="etcd-keepalive-writer")
        try:
            while (resp := await call.read()) is not grpc.aio.EOF:
                for fut in self._waiters.pop(resp.ID, []):
                    if not fut.done():
                        fut.set_result(resp.TTL)
        except grpc.aio.AioRpcError as exc:
            self._fail(StoreUnavailable(f"etcd lease keep-alive stream broke: {_describe(exc)}"))
        finally:
            call.cancel()
            await stop_task(writer)
            self._fail(StoreUnavailable("etcd lease keep-alive stream ended"))

    def _fail(self, exc: Exception) -> None:
        waiters, self._waiters = self._waiters, {}
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(exc)

    async def close(self) -> None:
        if self._reader is not None:
            await stop_task(self._reader)
            self._reader = None


async def _pump(requests: asyncio.Queue[Any], call: Any) -> None:
    """Write queued requests to a bidirectional stream. A task the stream's owner starts and
    stops: gRPC's own consumer of a request iterator is left pending when the call ends."""
    try:
        while True:
            await call.write(await requests.get())
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        call.cancel()  # the call is over; its reader sees why


def _batch(resp: Any) -> WatchBatch:
    events = [
        Event(ev.type == _EVENT_DELETE, KeyValue(ev.kv.key, ev.kv.value, ev.kv.mod_revision, ev.kv.lease))
        for ev in resp.events
    ]
    # A batch's header may run ahead of its events while etcd catches up an unsynced watcher,
    # so the position is the last event's revision; only an empty (progress) response vouches
    # for its header revision.
    if events:
        return WatchBatch(events[-1].kv.mod_revision, events)
    # watch_id -1: an answer to a progress request, sent to every watch
    return WatchBatch(resp.header.revision, requested=resp.watch_id == -1)


def _server_name(endpoints: Sequence[etcd_endpoints.Endpoint]) -> str:
    """The name to check etcd's certificate against when the config gives none: the one
    endpoint's host (a name that resolves to several members: each certificate carries it)."""
    if len(endpoints) != 1:
        raise ValueError(
            f"etcd over TLS at {','.join(e.text for e in endpoints)}: several endpoints need a TLS server name "
            "(etcd_server_name: a DNS name every member's certificate carries), since one channel balances over them"
        )
    return endpoints[0].host


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        details = exc.details() or ""
        if "too_many_pings" in details:  # etcd's default allows a ping every 5 s only
            details += " (etcd refuses our keep-alive pings: start it with --grpc-keepalive-min-time=1s or lower)"
        return f"{exc.code().name}: {details}"
    return str(exc) or type(exc).__name__


def _kv(kv: Any) -> KeyValue:
    return KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease)
