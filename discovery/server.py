"""The regional server: the only place the pieces are wired together."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from importlib.metadata import PackageNotFoundError, version

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from discovery import telemetry
from discovery.api import (
    AdminServicer,
    LookupServicer,
    RegistryServicer,
    ReplicationServicer,
    add_lookup_to_server,
)
from discovery.api.admission import Admission
from discovery.api.decoding import DecodeRequests
from discovery.api.health_checks import HealthChecksServicer
from discovery.config import ServerConfig
from discovery.dns import DnsListener, dns_listener
from discovery.errors import InvalidArgument, PermissionDenied, StoreUnavailable
from discovery.health import HealthChecks, PeerCredentials, ProtectionSettings
from discovery.http import HttpDoor, PrometheusExport, Sources
from discovery.keys import KeySchema
from discovery.registry import Registry
from discovery.replication import Election, RegionStates, ReplicationSettings, Replicator, Session, StallMonitor
from discovery.replication.transport import GrpcFeed, PeerTls
from discovery.security.audit import AuditLog, AuditUnavailable
from discovery.security.guard import Guard
from discovery.security.policy import PolicyError, PolicyFile
from discovery.security.tls import MaterialError, ServerCertificates, TlsFiles
from discovery.store import PROBE, EtcdTls, Store, StoreHealth
from discovery.tasks import TaskSet
from discovery.view import View
from discovery.xds import SERVICE_NAMES as XDS_SERVICE_NAMES
from discovery.xds import AdsServicer, CsdsServicer, XdsHub, add_ads_to_server, add_csds_to_server
from discovery_pb.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    health_checks_pb2,
    health_checks_pb2_grpc,
    lookup_pb2,
    registry_pb2,
    registry_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
)

log = logging.getLogger(__name__)


def _listen(server: grpc.aio.Server, address: str, field: str, certificates: ServerCertificates | None) -> int:
    try:
        if certificates is None:
            return int(server.add_insecure_port(address))
        return int(server.add_secure_port(address, certificates.credentials()))
    except RuntimeError as exc:
        raise InvalidArgument(field, f"cannot listen on {address} ({exc}): is it in use?") from None


SERVICE_NAMES = (
    registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
    lookup_pb2.DESCRIPTOR.services_by_name["Lookup"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    replication_pb2.DESCRIPTOR.services_by_name["Replication"].full_name,
    health_checks_pb2.DESCRIPTOR.services_by_name["HealthChecks"].full_name,
    *XDS_SERVICE_NAMES,
)
HEALTH_PROBE_SECONDS = 2.0
_MAX_MESSAGE = 1024 * 1024

try:
    VERSION = version("discovery")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0+source"


class Server:
    """A regional discovery server: Registry, Lookup, Admin and Replication over one etcd
    view, plus a replicator per peer region (running only where this server wins its election),
    and xDS (ADS and CSDS) for stock gRPC clients from the same view.

    ``async with Server(config) as server`` returns once the view is loaded and the port
    listens (``server.port``). Leaving the block stops it, in this order:

    1. the DNS port (docs/dns.md) closes; health turns NOT_SERVING, so balancers stop sending
       new calls;
    2. Watch, Replication and ADS streams end at once (UNAVAILABLE, so clients resume elsewhere),
       as do reads waiting for a revision; the port stops accepting; unary calls get
       ``grace_seconds``;
    3. the replicators and health checks stop and their leases are revoked, so other servers
       of the region take over at once; then the view's watch and the etcd health probe stop;
    4. the etcd client closes;
    5. (the caller, `discovery serve`, then flushes telemetry: it set it up).

    Whatever fails on the way (a broken task, the gRPC server's stop), the later steps still
    run, so the lease and the etcd client are never left open; the first failure is raised.
    """

    def __init__(self, config: ServerConfig, *, startup_timeout: float = 30.0, tracing: bool = False) -> None:
        self.config = config
        self._startup_timeout = startup_timeout
        self._tracing = tracing
        self.keys = KeySchema(config.key_prefix)
        self.store = Store(
            config.etcd,
            op_timeout=config.etcd_timeout_seconds,
            keepalive=config.etcd_keepalive_seconds,
            tls=EtcdTls(config.etcd_ca, config.etcd_cert, config.etcd_key, config.etcd_server_name)
            if config.etcd_tls
            else None,
            health_key=self.keys.root + PROBE + b"health",  # inside the prefix: RBAC allows it
        )
        self.view = View(self.store, self.keys, history=config.history, history_bytes=config.history_bytes)
        self.registry = Registry(self.store, self.keys, config.region)
        self.registry.min_check_interval_ms = round(config.health_min_interval_seconds * 1000)
        self.health: HealthChecks | None = None  # built in start(): it needs the bound address
        self.states = RegionStates(
            self.view,
            self.keys,
            config.region,
            config.proximity,
            stale_after=config.stale_after_seconds,
            max_staleness=config.max_staleness_seconds,
        )
        self.session = Session(self.store, config.election_ttl_seconds)
        self.stalls = StallMonitor()
        self.replicators: dict[str, Replicator] = {}
        self.elections: dict[str, Election] = {}
        self._replication: ReplicationServicer | None = None
        self.etcd_health = StoreHealth(False, 0, "not probed yet")
        self._health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        # Two sets because the lease is revoked between them (step 3 of the order above).
        self._replicating = TaskSet("server")
        self._background = TaskSet("server")
        self._resources = contextlib.AsyncExitStack()
        self._lookup: LookupServicer | None = None
        self._registry_api: RegistryServicer | None = None
        self.xds = XdsHub(self.view, self.states, control_plane=f"discovery {VERSION} region {config.region}")
        self._ads: AdsServicer | None = None
        self.port = 0
        self.health_port = 0
        self._health_grpc: grpc.aio.Server | None = None
        # Security (docs/security.md): nothing is read from disk until start().
        self.audit = AuditLog(config.audit_log, region=config.region, fail_open=config.audit_fail_open)
        self.certificates: ServerCertificates | None = None
        self.policy: PolicyFile | None = None
        self.guard: Guard | None = None
        self._etcd_reload = asyncio.Event()
        self.admission = Admission(config.max_pending_writes)
        self.dns: DnsListener | None = None  # docs/dns.md: only with dns_listen
        self.dns_port = 0
        # HTTP (docs/http.md): its own meter provider, so /metrics shows this server's figures.
        self.metrics_export = PrometheusExport(config.region) if config.http_listen or config.metrics_listen else None
        self.http: HttpDoor | None = None
        self._admin: AdminServicer | None = None

    async def __aenter__(self) -> Server:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _load_security(self) -> None:
        """Certificates, policy and audit log, read before anything listens: a bad file stops
        the start with the file and the problem named."""
        config = self.config
        try:
            self.audit.ensure_writable()
        except AuditUnavailable as exc:
            raise InvalidArgument("audit_log", f"{config.audit_log}: {exc}") from None
        if not config.insecure:
            files = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
            try:
                self.certificates = ServerCertificates(
                    files, poll_seconds=config.reload_poll_seconds, on_event=self._security_event
                )
            except MaterialError as exc:
                raise InvalidArgument("tls_cert", str(exc)) from None
            try:
                self.policy = PolicyFile(config.policy_file, on_event=self._security_event)
            except PolicyError as exc:
                raise InvalidArgument("policy_file", str(exc)) from None
        else:
            log.warning(
                "region %s: serving WITHOUT TLS (--insecure): anyone who can reach %s may register, "
                "deregister and read everything; use it for development only",
                config.region,
                config.listen,
            )
        self.guard = Guard(
            region=config.region,
            trust_domain=config.trust_domain,
            policy=self.policy,
            audit=self.audit,
            counts=self.view,
        )

    def _security_event(self, kind: str, message: str) -> None:
        """Certificate and policy reloads go to the audit log as well as the log."""
        event = kind if kind.startswith("policy_") else f"certificate_{kind}"
        self.audit.record(event, message=message)
        if kind == "policy_reloaded":
            # Grants are checked when a stream opens; a reload that revokes one (or denies an
            # identity) ends the streams that relied on it, instead of letting them run on.
            ended = sum(
                api.streams.revoke()
                for api in (self._lookup, self._registry_api, self._replication, self._ads)
                if api is not None
            )
            if self.http is not None:
                ended += self.http.events.revoke()
            if ended:
                log.warning("region %s: policy reload ended %d streams it no longer allows", self.config.region, ended)

    def _certificate_expiry(self) -> float | None:
        if self.certificates is None:
            return None
        return (self.certificates.not_after - datetime.datetime.now(datetime.UTC)).total_seconds()

    def _certificate_failures(self) -> int:
        return 0 if self.certificates is None else self.certificates.reload_failures

    def reload(self) -> None:
        """SIGHUP: look at certificates and policy now, and reopen the audit log (rotation)."""
        if self.certificates is not None:
            self.certificates.request_reload()
        if self.policy is not None:
            self.policy.request_reload()
        self.audit.reopen()
        self._etcd_reload.set()

    async def _reload_etcd_tls(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.reload_poll_seconds):
                    await self._etcd_reload.wait()
            self._etcd_reload.clear()
            await self.store.reload_tls()

    async def start(self) -> None:
        self._load_security()
        await self._resources.enter_async_context(self.store)
        await self._check_etcd_access()
        self._background.start("view", self.view.run())
        try:
            async with asyncio.timeout(self._startup_timeout):
                await self.view.ready.wait()
        except TimeoutError:
            raise StoreUnavailable(
                f"could not load the view from etcd at {','.join(self.config.etcd)} within "
                f"{self._startup_timeout:g}s: {self.view.last_error or 'no answer'}"
            ) from None
        self._background.start("etcd-probe", self._probe_etcd())
        self._background.start("stall-monitor", self.stalls.run())
        self._background.start("xds", self.xds.run())
        if self.certificates is not None:
            self._background.start("tls-reload", self.certificates.run())
        if self.policy is not None:
            self._background.start("policy-reload", self.policy.run(self.config.reload_poll_seconds))
        if self.config.etcd_tls:
            self._background.start("etcd-tls-reload", self._reload_etcd_tls())
        self._grpc = self._build_grpc()
        self.port = _listen(self._grpc, self.config.listen, "listen", self.certificates)
        await self._grpc.start()
        if self.config.health_listen:
            # Probes that cannot present a certificate (Kubernetes' gRPC probes) see health only.
            self._health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_grpc)
            self.health_port = _listen(self._health_grpc, self.config.health_listen, "health_listen", None)
            await self._health_grpc.start()
        if self.config.dns_listen:
            await self._start_dns()
        if self.metrics_export is not None:
            self.http = HttpDoor(self._http_sources(), self.metrics_export)
            await self.http.start()
            self.instruments.observe_http(self.http.refused, self.http.slow)
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._start_replicators()
        if self.health is not None:
            identity = self.config.advertise or self.address
            if identity.rpartition(":")[0] in ("0.0.0.0", "[::]"):
                log.warning(
                    "region %s: health checks: other servers cannot reach %s for a re-check; set advertise",
                    self.config.region,
                    identity,
                )
            self.health.membership.set_identity(identity)
            self._replicating.start("health checks", self.health.run())
            # Joined before start() returns: the region's checkers (and etcd's revision) are
            # settled for whoever started this server; checks are not worth failing a start.
            try:
                async with asyncio.timeout(min(self._startup_timeout, 10.0)):
                    await self.health.membership.ready.wait()
            except TimeoutError:
                log.warning("region %s: not yet among the region's health checkers", self.config.region)
        log.info("region %s serving on %s (etcd %s)", self.config.region, self.address, ",".join(self.config.etcd))

    async def _start_dns(self) -> None:
        config, guard = self.config, self.guard
        assert guard is not None  # _load_security ran
        self.dns = dns_listener(
            self.view,
            self.states,
            listen=config.dns_listen,
            domain=config.dns_domain,
            ttl=config.dns_ttl_seconds,
            rate_limit=config.dns_rate_limit,
            visible=guard.dns_visible,
        )
        try:
            self.dns_port = await self.dns.start()
        except OSError as exc:
            raise InvalidArgument(
                "dns_listen", f"cannot listen on {config.dns_listen} ({exc}): is it in use?"
            ) from None
        log.info("region %s serving DNS for %s on UDP and TCP port %d", config.region, config.dns_domain, self.dns_port)
        counters = self.dns.counters
        self.instruments.observe_dns(
            lambda: {k: v for k, v in vars(counters).items() if isinstance(v, int)}, lambda: counters.by_rcode
        )

    async def _stop_dns(self) -> None:
        if self.dns is not None:
            await self.dns.stop()
            self.dns = None

    def _start_replicators(self) -> None:
        peers = self.config.peer_map()
        if not peers:
            return
        identity = self.config.advertise or self.address
        peer_tls = None
        if not self.config.insecure:
            files = TlsFiles(self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca)
            peer_tls = PeerTls(files, self.config.trust_domain)
        settings = ReplicationSettings(
            region=self.config.region,
            identity=identity,
            silence=self.config.stale_after_seconds,
            resume_grace=self.config.resume_grace_seconds,
        )
        self._replicating.start("election-session", self.session.run())
        for origin, endpoints in peers.items():
            feed = GrpcFeed(origin, requester=settings.region, silence=settings.silence, tls=peer_tls)
            replicator = Replicator(origin, endpoints, feed=feed, store=self.store, keys=self.keys, settings=settings)
            election = Election(self.store, self.session, self.keys.election(origin), identity)
            self.replicators[origin], self.elections[origin] = replicator, election
            self._replicating.start(f"replicator {origin}", election.run(replicator.lead))

    def _recovered_at_ms(self) -> int:
        """When this server last came back from being impaired (frozen, or its etcd lost under
        the same leader), on the wall clock of this moment: a feed message's ``time_ms``
        minus this is a monotonic duration, whatever steps the wall clock took since."""
        latest = max(self.stalls.last_recovery(), self.view.recovered_at)
        if not latest:
            return 0
        return int((time.time() - (time.monotonic() - latest)) * 1000)

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    def _build_grpc(self) -> grpc.aio.Server:
        interceptors: list[grpc.aio.ServerInterceptor] = [DecodeRequests()]
        if self._tracing:
            from opentelemetry.instrumentation.grpc import aio_server_interceptor

            interceptors.append(aio_server_interceptor())  # type: ignore[no-untyped-call]
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.keepalive_time_ms", 10_000),  # a dead Watch client is noticed in ~15 s
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 1_000),  # clients may ping every 1 s
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        meter = self.metrics_export.meter if self.metrics_export is not None else None
        instruments = self.instruments = telemetry.Instruments(meter) if meter else telemetry.Instruments()
        instruments.observe_replication(self.states.origins)
        instruments.observe_certificates(self._certificate_expiry, self._certificate_failures)
        instruments.observe_server(
            lambda: self.view.revision, self.view.stale_seconds, lambda: self.etcd_health.healthy, self._open_streams
        )
        guard = self.guard
        assert guard is not None  # _load_security ran
        self._registry_api = RegistryServicer(
            self.registry,
            self.keys,
            self.view,
            instruments,
            guard=guard,
            admission=self.admission,
            head_revision=self._head_revision,
        )
        registry_pb2_grpc.add_RegistryServicer_to_server(self._registry_api, server)
        self._lookup = LookupServicer(
            self.view,
            self.states,
            instruments,
            guard,
            max_wait=self.config.max_wait_seconds,
            watch_keepalive=self.config.watch_keepalive_seconds,
        )
        add_lookup_to_server(self._lookup, server)
        self._admin = AdminServicer(
            self.view,
            self.states,
            list(self.config.etcd),
            lambda: self.etcd_health,
            VERSION,
            guard=guard,
            health_checks=lambda: self.health.status() if self.health is not None else None,
        )
        admin_pb2_grpc.add_AdminServicer_to_server(self._admin, server)
        self._replication = ReplicationServicer(
            self.view,
            self.config.region,
            self.store.health,
            heartbeat=self.config.replication_heartbeat_seconds,
            guard=guard,
            recovered_at_ms=self._recovered_at_ms,
        )
        replication_pb2_grpc.add_ReplicationServicer_to_server(self._replication, server)
        self._ads = AdsServicer(self.xds, guard)
        add_ads_to_server(self._ads, server)
        add_csds_to_server(CsdsServicer(self.xds, guard), server)
        if self.config.health_checks:
            self.health = self._health_checks(instruments)
            health_checks_pb2_grpc.add_HealthChecksServicer_to_server(
                HealthChecksServicer(self.health.checker, guard), server
            )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server

    def _open_streams(self) -> dict[str, int]:
        return {
            "ads": len(self._ads.streams) if self._ads is not None else 0,
            "events": len(self.http.events) if self.http is not None else 0,
        }

    def _http_sources(self) -> Sources:
        assert self._lookup is not None and self._admin is not None and self.guard is not None
        return Sources(
            config=self.config,
            view=self.view,
            states=self.states,
            lookup=self._lookup,
            admin=self._admin,
            guard=self.guard,
            instruments=self.instruments,
            etcd_health=lambda: self.etcd_health,
            certificates=self.certificates,
        )

    async def _check_etcd_access(self) -> None:
        """Wait for etcd as the view would (it may come up after us), but stop at once when it
        answers that this server's etcd user lacks its prefix: no retry can fix that."""
        last: StoreUnavailable | None = None
        try:
            async with asyncio.timeout(self._startup_timeout):
                while True:
                    try:
                        await self.store.check_access(self.keys.root)
                        return
                    except PermissionDenied as exc:
                        raise PermissionDenied(f"{exc}; this server cannot work without it") from None
                    except StoreUnavailable as exc:
                        last = exc
                        await asyncio.sleep(0.5)
        except TimeoutError:
            raise StoreUnavailable(
                f"could not reach etcd at {','.join(self.config.etcd)} within {self._startup_timeout:g}s: {last}"
            ) from None

    async def _head_revision(self) -> int:
        health = await self.store.health()
        if not health.healthy:
            raise StoreUnavailable(health.error)
        return health.revision

    async def _probe_etcd(self) -> None:
        while True:
            try:
                self.etcd_health = await self.store.health()
            except Exception as exc:  # Status must not report the last probe forever
                log.exception("etcd health probe failed unexpectedly")
                self.etcd_health = StoreHealth(False, 0, f"health probe failed: {exc}")
            await asyncio.sleep(HEALTH_PROBE_SECONDS)

    async def stop(self) -> None:
        """Shut down in the documented order; safe to call twice."""
        steps = (
            self._stop_dns,  # 1: a DNS answer needs nothing else of the server
            self._stop_serving,  # 1, 2
            self._replicating.stop,  # 3
            self.session.close,
            self._leave_health_checks,
            self._background.stop,
            self._resources.aclose,  # 4
            self._close_audit,
            self._close_metrics,
        )
        failure: BaseException | None = None
        for step in steps:
            try:
                await step()
            except Exception as exc:
                log.exception("server stop: %s failed", getattr(step, "__qualname__", step))
                failure = failure or exc
            except BaseException as exc:  # cancelled: the later steps still revoke the lease and close etcd
                failure = failure or exc
        if failure is not None:
            raise failure

    async def _close_metrics(self) -> None:
        if self.metrics_export is not None:
            self.metrics_export.shutdown()
            self.metrics_export = None

    def _health_checks(self, instruments: telemetry.Instruments) -> HealthChecks:
        """This server's share of the region's health checks (docs/health-checks.md); its
        identity, which other servers call for a re-check, is its advertised address."""
        config = self.config
        peer_tls = None
        if not config.insecure:
            files = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
            peer_tls = PeerCredentials(files, config.trust_domain, config.region)
        return HealthChecks(
            self.view,
            self.store,
            self.keys,
            region=config.region,
            identity=config.advertise or self.address,
            instruments=instruments,
            member_ttl=config.election_ttl_seconds,
            protection=ProtectionSettings(
                share=config.health_mass_share,
                min_targets=config.health_mass_min_targets,
                hold_intervals=config.health_hold_intervals,
            ),
            peer_tls=peer_tls,
        )

    async def _leave_health_checks(self) -> None:
        if self.health is not None:
            await self.health.close()

    async def _close_audit(self) -> None:
        self.audit.close()

    async def _stop_serving(self) -> None:
        if self._grpc is None:
            return
        await self._health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.drain()
        for api in (self._lookup, self._registry_api, self._replication, self._ads):
            if api is not None:
                await api.streams.end_all()
        self.view.end_subscriptions()  # reads waiting for a revision end now
        if self.http is not None:  # its event streams ended with the subscriptions
            await self.http.stop()
            self.http = None
        await self._grpc.stop(self.config.grace_seconds)
        self._grpc = None
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
            self._health_grpc = None
