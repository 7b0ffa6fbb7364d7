"""A whole local cluster in the foreground, like ``consul agent -dev``: per region its own
etcd (1 or 3 members) and N discovery servers, all on 127.0.0.1, every region peered with
the others in the order given. For trying and testing, never production.

Every pid reported is the real process (etcd itself, the server's Python), so a signal sent
to it reaches what it names: the drills pause regions, kill servers and etcd leaders through
the methods here, or through the pids in ``cluster.json``. Stopping ends everything this
started; so does the end of this process, however it ends (``discovery.devtools.lifeline``).

A running cluster holds a lock (``flock``) on its state dir. A new cluster refuses to start
where an earlier one is in the way, naming its processes: one running in the same state dir,
its processes left running, its files, or (with a fixed ``base_port``) a cluster in a default
state dir holding the server ports. ``replace=True`` stops those processes and removes those
files instead.

With ``mtls`` (what ``discovery dev`` does unless ``--insecure``) every server requires client
certificates from a development CA in ``STATE_DIR/tls/``, kept across restarts into the same
state dir so the shell environment of ``STATE_DIR/env.sh`` keeps working; see ``DevTls``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from discovery.devtools import lifeline
from discovery.devtools.control import ControlServer
from discovery.devtools.etcd import EtcdCluster
from discovery.devtools.faultproxy import FaultProxy
from discovery.devtools.lifeline import Pinned
from discovery.devtools.process import ServerProcess, StartAborted, free_ports
from discovery.errors import InvalidArgument
from discovery.model import validate_region
from discovery.security.certs import CA_CERT, CA_KEY, CertificateAuthority, server_id

DEFAULT_REGIONS = ("us-east", "eu-west", "ap-south")
STATE_FILE = "cluster.json"
ADMIN_P12 = "admin.p12"  # the admin's identity for a browser (docs/http.md)
ADMIN_P12_PASSWORD = b"discovery"  # a development CA's throwaway identity: the password is documented
TEMP_PREFIX = "discovery-dev-"  # the default state dirs, in the temp dir
TLS_DIR = "tls"  # the development CA and every certificate, in the state dir
POLICY_FILE = "policy.toml"
ENV_FILE = "env.sh"
DEFAULT_TRUST_DOMAIN = "discovery.local"
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?")  # as `discovery serve` accepts

# --replace: how long an earlier `discovery dev` gets for its own orderly stop (its servers
# drain for up to 15 s, then its etcd stops), and an earlier server or etcd left without it.
OWNER_STOP_TIMEOUT = 45.0
PROCESS_STOP_TIMEOUT = 15.0

Progress = Callable[[str], object]
PeerRoute = Callable[[str, str, str], str]  # (from region, to region, server address) -> address to dial


# The advice when an earlier cluster still runs in the state dir.
_STOP_OR_REPLACE = (
    "stop it first (Ctrl-C where it runs, or kill it), or add --replace to stop it and start this one in its place"
)


class DevServer(ServerProcess):
    """One ``discovery serve`` of the cluster: the launcher, and where the server sits.
    ``health_address``: its plaintext health listener (mTLS clusters only); ``http_address``
    and ``metrics_address``: its HTTP door and plain metrics listener, when on (docs/http.md)."""

    def __init__(
        self,
        region: str,
        index: int,
        address: str,
        args: list[str],
        log_path: Path,
        *,
        health_address: str | None,
        http_address: str | None = None,
        metrics_address: str | None = None,
    ) -> None:
        name = f"{region} server-{index} at {address}"
        super().__init__(args, address, log_path, name=name, health_address=health_address)
        self.region = region
        self.index = index
        self.dns_address: str | None = None  # its DNS port (UDP and TCP), with DevCluster(dns=True)
        self.http_address = http_address
        self.metrics_address = metrics_address


@dataclass(frozen=True)
class DevTls:
    """The development PKI of an mTLS cluster, all in ``STATE_DIR/tls/``: the CA (``ca.pem``,
    ``ca-key.pem``), per region the certificate every server of it presents
    (``server-<region>.pem``: URI SAN ``spiffe://<trust_domain>/discovery/server/<region>``,
    and DNS ``localhost`` and IP ``127.0.0.1`` since a gRPC client checks the host it dials),
    and the admin's client certificate (``admin.pem``, ``admin-key.pem``), which the CLI, the
    drills and the tests present. ``STATE_DIR/policy.toml`` says who may do what.

    A CA already in ``tls/`` (a restart into the same state dir) is used again, so the
    certificates issued from it (``discovery certs issue --ca-dir STATE_DIR/tls``) and a
    shell's environment stay good; every other file is written afresh at each start."""

    trust_domain: str
    dir: Path
    ca: Path
    cert: Path  # the admin's certificate and key
    key: Path
    policy: Path
    ca_reused: bool = False

    @property
    def admin(self) -> str:
        return f"spiffe://{self.trust_domain}/admin"

    def server_cert(self, region: str) -> tuple[Path, Path]:
        return self.dir / f"server-{region}.pem", self.dir / f"server-{region}-key.pem"

    def credentials(self) -> grpc.ChannelCredentials:
        """The admin's channel credentials, read now (a channel cannot reload them)."""
        return grpc.ssl_channel_credentials(self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes())

    def describe(self) -> dict[str, str]:
        """cluster.json's ``tls``: the admin's files, absolute, and the trust domain."""
        return {"ca": str(self.ca), "cert": str(self.cert), "key": str(self.key), "trust_domain": self.trust_domain}


def dev_policy(trust_domain: str, regions: Sequence[str]) -> str:
    """The dev cluster's policy: the admin may do everything, with limits no drill reaches;
    ``spiffe://<td>/svc/<name>`` registers ``<name>`` and ``<name>.*`` and reads everything;
    each region's servers replicate. Others are denied (the server's default)."""
    servers = "".join(
        f"\n[[grant]]  # the servers of {r}: they pull the other regions' records\n"
        f'identity = "{server_id(trust_domain, r)}"\nreplicate = true\nread = ["*"]\n'
        for r in regions
    )
    return f"""# Written by `discovery dev` at every start (edits last until the next one; the servers
# reload it when it changes). Identities are the URI SAN of a client certificate.

[limits]  # for identities whose grant names no limits of its own
writes_per_second = 100
write_burst = 200
streams = 100
instances_per_service = 1000
instances = 5000

[region]
max_instances = 100000

[[grant]]  # the identity of STATE_DIR/tls/admin.pem: the CLI (source env.sh), drills, tests
identity = "spiffe://{trust_domain}/admin"
admin = true
register = ["*"]
read = ["*"]

[grant.limits]  # drills write hundreds per second through this one identity
writes_per_second = 20000
write_burst = 40000
streams = 10000
instances_per_service = 100000
instances = 100000

[[grant]]  # a service's certificate: discovery certs issue --id spiffe://{trust_domain}/svc/NAME
identity = "spiffe://{trust_domain}/svc/*"
register = ["{{name}}", "{{name}}.*"]
read = ["*"]
{servers}
[dns]  # DNS names no caller: whoever reaches a DNS port sees these (docs/dns.md)
visible = ["*"]
"""


@dataclass
class Region:
    name: str
    etcd: EtcdCluster
    servers: list[DevServer] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def pids(self) -> list[int]:
        """Every running process of the region: servers and etcd members."""
        return [s.pid for s in self.servers if s.running()] + [m.pid for m in self.etcd.members if m.running()]


@dataclass
class DevCluster:
    """A local multi-region cluster. ``start()`` returns once every server serves and
    ``cluster.json`` is written; ``stop()`` ends every process it started (safe to call twice,
    also after a failed or aborted start, and from another thread via ``abort()`` first).

    ``base_port=0`` picks free ports, so clusters can run side by side; otherwise the servers
    take ``base_port``, ``base_port + 1``... in region order. ``server_args`` go to every
    ``discovery serve`` after the generated flags, so they win (e.g. ``("--resume-grace", "2")``).
    ``peer_via(from_region, to_region, address)`` returns the address a server of
    ``from_region`` is told for that server of ``to_region``: a drill puts a fault proxy there.

    ``mtls`` serves mTLS with a development CA (``self.tls``, a ``DevTls``; ``trust_domain``
    names the identities), each server with a plaintext health listener for probes and an
    audit log (``STATE_DIR/<region>/audit-<i>.jsonl``); without it, servers run ``--insecure``
    (the default here: tests and benches that build their own channels rely on it; ``discovery
    dev`` turns it on). Either way ``STATE_DIR/env.sh`` exports the client settings.

    ``fault_proxy`` routes every peer connection through a ``FaultProxy`` of this cluster
    (``self.proxy``), unless ``peer_via`` routes them already; ``control`` serves a
    ``ControlServer`` (``self.control_address``, also in cluster.json) through which another
    process injects faults.

    An earlier cluster in the way makes ``start`` raise ``EarlierCluster``; with ``replace``,
    ``start`` stops its processes and removes its files from the state dir first.
    """

    regions: Sequence[str] = DEFAULT_REGIONS
    servers_per_region: int = 1
    etcd_members: int = 1
    base_port: int = 0
    state_dir: Path | None = None
    keep: bool = False
    server_args: tuple[str, ...] = ()
    peer_via: PeerRoute | None = None
    start_timeout: float = 30.0
    fault_proxy: bool = False
    control: bool = False
    replace: bool = False
    mtls: bool = False
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    dns: bool = False  # every server also serves DNS (docs/dns.md) on a port of its own
    http: bool = False  # every server serves the HTTP door (--http), HTTPS under mtls
    metrics: bool = False  # ... and a plain metrics listener (--metrics)
    running: list[Region] = field(default_factory=list, init=False)
    proxy: FaultProxy | None = field(default=None, init=False)
    control_address: str | None = field(default=None, init=False)
    tls: DevTls | None = field(default=None, init=False)
    _control: ControlServer | None = field(default=None, init=False, repr=False)
    _abort: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _created: list[Path] = field(default_factory=list, init=False, repr=False)  # removed by stop()
    _state_lock: int | None = field(default=None, init=False, repr=False)  # fd of the locked state dir
    _progress_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def validate(self) -> None:
        if not self.regions:
            raise ValueError("--regions: at least one region")
        for name in self.regions:
            validate_region(name, "--regions")
        if len(set(self.regions)) != len(self.regions):
            raise ValueError("--regions: a region is named twice")
        if self.etcd_members not in (1, 3):
            raise ValueError("--etcd-members: 1 or 3")
        if not 1 <= self.servers_per_region <= 16:
            raise ValueError("--servers-per-region: from 1 to 16")
        count = len(self.regions) * self.servers_per_region
        if self.base_port and not 1 <= self.base_port <= 65536 - count:
            raise ValueError(f"--base-port: {count} server ports from {self.base_port} do not fit below 65536")
        if not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise ValueError(f"--trust-domain: {self.trust_domain!r} is not a trust domain (e.g. example.org)")

    # --- start --------------------------------------------------------------------------------

    def start(self, progress: Progress = print) -> DevCluster:
        """Allocate every port, then bring the regions up side by side and wait for all.
        On any failure, or ``abort()`` from another thread, stop what was started and raise
        (``StartAborted`` for an abort). A DevCluster starts once."""
        self.validate()
        if self.running:
            raise RuntimeError("this cluster was started already")
        try:
            if self.fault_proxy:
                self.proxy = FaultProxy()
            self._prepare(progress)  # binds the proxy's routes
            if self.proxy is not None:
                self.proxy.start()
            with ThreadPoolExecutor(len(self.running), thread_name_prefix="dev-region") as pool:
                try:
                    futures = [pool.submit(self._start_region, r, progress) for r in self.running]
                    errors: list[BaseException] = []
                    for future in as_completed(futures):
                        error = future.exception()
                        if error is not None:
                            self._abort.set()  # the other regions stop waiting too
                            errors.append(error)
                except BaseException:
                    self._abort.set()
                    raise
            if errors:
                # A real failure explains more than the aborts it caused elsewhere.
                raise next((e for e in errors if not isinstance(e, StartAborted)), errors[0])
            if self.control:
                self._control = ControlServer(self, self.proxy)
                self.control_address = self._control.start()
            self.write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def abort(self) -> None:
        """Make a ``start()`` running in another thread give up at its next check."""
        self._abort.set()

    def _prepare(self, progress: Progress) -> None:
        """State dir, certificates, every port and every command line, before any process
        starts: each server's flags name the servers of every other region."""
        self.state_dir = self._make_state_dir(progress)
        if self.mtls:
            self.tls = self._make_tls(self.state_dir)
        per_region = 2 * self.etcd_members
        etcd_count = per_region * len(self.regions)
        server_count = len(self.regions) * self.servers_per_region
        health_count = server_count if self.mtls else 0
        dns_count = server_count if self.dns else 0
        http_count = server_count * (int(self.http) + int(self.metrics))
        ports, others = self._ports(etcd_count + health_count + dns_count + http_count)
        etcd_ports, health_ports = others[:etcd_count], others[etcd_count : etcd_count + health_count]
        dns_ports = others[etcd_count + health_count : etcd_count + health_count + dns_count]
        http_ports = others[etcd_count + health_count + dns_count :]
        addresses = {
            name: [f"127.0.0.1:{ports.pop(0)}" for _ in range(self.servers_per_region)] for name in self.regions
        }
        for i, name in enumerate(self.regions):
            region_dir = self.state_dir / name
            region_dir.mkdir()
            mine = etcd_ports[i * per_region : (i + 1) * per_region]
            self.running.append(Region(name, EtcdCluster(region_dir, self.etcd_members, name="etcd", ports=mine)))
        for region in self.running:
            for i, address in enumerate(addresses[region.name]):
                health = f"127.0.0.1:{health_ports.pop(0)}" if health_ports else None
                http = f"127.0.0.1:{http_ports.pop(0)}" if self.http else None
                metrics = f"127.0.0.1:{http_ports.pop(0)}" if self.metrics else None
                args = self._server_command(region, i, address, addresses, health)
                dns = f"127.0.0.1:{dns_ports.pop(0)}" if dns_ports else None
                if dns is not None:
                    args += ["--dns", dns]
                args += [*(["--http", http] if http else []), *(["--metrics", metrics] if metrics else [])]
                log_path = self.state_dir / region.name / f"server-{i}.log"
                region.servers.append(
                    DevServer(
                        region.name,
                        i,
                        address,
                        args,
                        log_path,
                        health_address=health,
                        http_address=http,
                        metrics_address=metrics,
                    )
                )
                region.servers[-1].dns_address = dns
        self._write_env(addresses[self.regions[0]][0])

    def _make_tls(self, state_dir: Path) -> DevTls:
        """The CA (the one already in ``tls/``, or a new one), a certificate per region's
        servers, the admin's, and the policy. Raises RuntimeError naming a CA it cannot use."""
        tls_dir = state_dir / TLS_DIR
        if not tls_dir.exists():
            self._created.append(tls_dir)
        reused = (tls_dir / CA_CERT).exists() or (tls_dir / CA_KEY).exists()
        ca = _reusable_ca(tls_dir) if reused else CertificateAuthority.create(tls_dir)
        tls = DevTls(
            trust_domain=self.trust_domain,
            dir=tls_dir,
            ca=tls_dir / CA_CERT,
            cert=tls_dir / "admin.pem",
            key=tls_dir / "admin-key.pem",
            policy=state_dir / POLICY_FILE,
            ca_reused=reused,
        )
        for region in self.regions:
            ca.issue(
                spiffe_id=server_id(self.trust_domain, region),
                dns=("localhost",),
                ips=("127.0.0.1",),
                out=tls_dir / f"server-{region}",
            )
        admin = ca.issue(spiffe_id=tls.admin, out=tls_dir / "admin")
        # The admin again as PKCS#12, for a browser to present to the dashboard (docs/http.md).
        p12 = state_dir / ADMIN_P12
        self._created.append(p12)
        _write_atomic_bytes(p12, admin_pkcs12(admin.cert, admin.key, ca.pem, ADMIN_P12_PASSWORD))
        self._created.append(tls.policy)
        _write_atomic(tls.policy, dev_policy(self.trust_domain, self.regions))
        return tls

    def _write_env(self, server: str) -> None:
        """``STATE_DIR/env.sh``: what makes the CLI and the client library talk to this cluster
        (``source STATE_DIR/env.sh``), as the admin on an mTLS cluster. Settings of the other
        mode are unset, so sourcing it in a shell that had them switches cleanly."""
        assert self.state_dir is not None
        tls_vars = ("DISCOVERY_TLS_CA", "DISCOVERY_TLS_CERT", "DISCOVERY_TLS_KEY")
        lines = [
            f"# `source` this: the CLI and the client library then talk to the cluster of {self.state_dir}",
            f"export DISCOVERY_SERVER={shlex.quote(server)}",
        ]
        if self.tls is not None:
            files = (self.tls.ca, self.tls.cert, self.tls.key)
            lines += [f"export {name}={shlex.quote(str(path))}" for name, path in zip(tls_vars, files, strict=True)]
            lines.append("unset DISCOVERY_INSECURE DISCOVERY_TLS_SERVER_NAME")
        else:
            lines += ["export DISCOVERY_INSECURE=1", f"unset {' '.join(tls_vars)} DISCOVERY_TLS_SERVER_NAME"]
        path = self.state_dir / ENV_FILE
        self._created.append(path)
        _write_atomic(path, "\n".join(lines) + "\n")

    @property
    def env_file(self) -> Path:
        assert self.state_dir is not None, "the cluster was never started"
        return self.state_dir / ENV_FILE

    def _make_state_dir(self, progress: Progress) -> Path:
        """The state dir, locked for as long as this cluster runs, remembering what this
        cluster created so ``stop`` removes only that. An earlier cluster in the way is
        refused, or stopped and its files removed with ``replace``."""
        if self.base_port:
            self._clear_port_holders(progress)
        if self.state_dir is None:
            state_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
            self._created.append(state_dir)
            self._state_lock = _try_lock(state_dir)  # new: no one else can hold it
            return state_dir
        state_dir = self.state_dir.resolve()
        for _attempt in range(5):
            made = False
            if not state_dir.exists():
                with contextlib.suppress(FileExistsError):  # made by another meanwhile
                    state_dir.mkdir(parents=True)
                    made = True
            try:
                self._state_lock = _try_lock(state_dir)
            except FileNotFoundError:
                continue  # removed meanwhile (by the cluster that had it, stopping)
            if self._state_lock is None:
                # Another cluster runs here. Once it has stopped (with ``replace``), start
                # again from the top: it may have removed the state dir as it went.
                self._replace_running(state_dir, progress)
                continue
            if made:
                self._created.append(state_dir)
            else:
                self._clear_leftovers(state_dir, progress)
            return state_dir
        raise EarlierCluster(f"state dir {state_dir} keeps being taken by other clusters: choose another --state-dir")

    def _replace_running(self, state_dir: Path, progress: Progress) -> None:
        """The cluster whose process holds the state dir's lock: refused, or stopped with
        ``replace``. Returns at once if the lock was released meanwhile."""
        holders = _lock_holders(state_dir)
        if not holders:
            return
        if os.getpid() in holders:
            raise EarlierCluster(f"state dir {state_dir} is in use by another cluster of this process")
        owner = lifeline.pin(holders[0], _owner_name(holders[0]), functools.partial(_holds, state_dir))
        if owner is None:
            return
        described = _read_state(state_dir)
        listed = [p for p, _ in _listed(state_dir, described)]
        self._stop_or_refuse(
            _Earlier(state_dir, owner, listed),
            f"the cluster of state dir {state_dir} is still running",
            _STOP_OR_REPLACE,
            progress,
        )

    def _clear_leftovers(self, state_dir: Path, progress: Progress) -> None:
        """We hold the lock of an existing state dir, so no cluster runs there: what an earlier
        one left is its processes still running (started by a version of `discovery dev`
        without a lifeline), and its files."""
        described = _read_state(state_dir)
        listed = [p for p, _ in _listed(state_dir, described)]
        owner = _running_parent(listed)  # a `discovery dev` that takes no lock (an older version)
        if owner is not None:
            self._stop_or_refuse(
                _Earlier(state_dir, owner, listed),
                f"the cluster of state dir {state_dir} is still running",
                _STOP_OR_REPLACE,
                progress,
            )
        elif listed:
            self._stop_or_refuse(
                _Earlier(state_dir, None, listed),
                f"processes of an earlier cluster of state dir {state_dir} are still running",
                "add --replace to stop them and start this one in their place, or kill them",
                progress,
            )
        # Members of a kept cluster remember their old peer ports and would not find each
        # other again: an earlier cluster's data is refused rather than half started.
        earlier_regions = [n for n in _regions_of(described) if n not in self.regions]
        taken = [n for n in (*self.regions, *earlier_regions, STATE_FILE) if (state_dir / n).exists()]
        if taken and not self.replace:
            raise EarlierCluster(
                f"state dir {state_dir} already holds {', '.join(taken)} from an earlier cluster (none of its "
                "processes is running): add --replace to remove them and start afresh, remove them yourself, "
                "or choose another --state-dir"
            )
        if taken:
            for name in (*taken, STATE_FILE + ".tmp"):
                path = state_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            progress(f"replacing the earlier cluster of state dir {state_dir}: removed {', '.join(taken)}")
        self._created += [state_dir / n for n in (*self.regions, STATE_FILE)]

    def _clear_port_holders(self, progress: Progress) -> None:
        """Clusters in default state dirs (each `discovery dev` makes a new one) whose
        processes hold a server port of this one: the way to find what an earlier run left on
        7400 when no --state-dir was given. Others' state dirs are not touched."""
        count = len(self.regions) * self.servers_per_region
        ports = set(range(self.base_port, self.base_port + count))
        mine = self.state_dir.resolve() if self.state_dir is not None else None
        for state_file in sorted(Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*/{STATE_FILE}")):
            state_dir = state_file.parent.resolve()
            try:
                if state_dir == mine or state_file.stat().st_uid != os.getuid():
                    continue
            except OSError:
                continue  # removed meanwhile
            listed = _listed(state_dir, _read_state(state_dir))
            holding = sorted({_port(a) for _, a in listed} & ports)
            if not holding:
                for proc, _ in listed:
                    proc.close()
                continue
            holders = _lock_holders(state_dir)
            owner = None
            if holders and os.getpid() not in holders:
                owner = lifeline.pin(holders[0], _owner_name(holders[0]), functools.partial(_holds, state_dir))
            owner = owner or _running_parent([p for p, _ in listed])
            span = f"{holding[0]}" if len(holding) == 1 else f"{holding[0]}-{holding[-1]}"
            self._stop_or_refuse(
                _Earlier(state_dir, owner, [p for p, _ in listed]),
                f"port{'s' if len(holding) > 1 else ''} {span} on 127.0.0.1 {'are' if len(holding) > 1 else 'is'} "
                f"held by the cluster of state dir {state_dir}",
                "stop it first (Ctrl-C where it runs, or kill it), add --replace to stop it and start this one, "
                "or choose another --base-port (0: free ports)",
                progress,
            )

    def _stop_or_refuse(self, earlier: _Earlier, what: str, advice: str, progress: Progress) -> None:
        try:
            named = ", ".join(str(p) for p in earlier.processes())
            if not self.replace:
                raise EarlierCluster(f"{what}: {named}; {advice}")
            if earlier.owner is not None and not _is_dev(_argv(earlier.owner.pid)):
                raise EarlierCluster(
                    f"{what}, run by {earlier.owner}, which is not a `discovery dev`, so --replace leaves it "
                    "alone: stop it yourself, or choose another --state-dir"
                )
            progress(f"replacing the earlier cluster of state dir {earlier.state_dir}: stopping {named}")
            left: list[Pinned] = []
            if earlier.owner is not None:
                # Its own stop, in order; if it hangs, SIGKILL, and the kernel kills its
                # children along with it (lifeline).
                left += lifeline.stop([earlier.owner], OWNER_STOP_TIMEOUT)
            left += lifeline.stop([p for p in earlier.listed if p.alive()], PROCESS_STOP_TIMEOUT)
            if left:
                raise RuntimeError(
                    f"could not stop {', '.join(str(p) for p in left)}, even with SIGKILL (stuck in the kernel?): "
                    "look at them with ps, or choose another --state-dir and --base-port"
                )
        finally:
            earlier.close()

    def _ports(self, etcd_count: int) -> tuple[list[int], list[int]]:
        """Server ports and etcd ports, all distinct: chosen in one call, since ports chosen in
        separate calls could repeat."""
        count = len(self.regions) * self.servers_per_region
        if not self.base_port:
            ports = free_ports(count + etcd_count)
            return ports[:count], ports[count:]
        servers = list(range(self.base_port, self.base_port + count))
        for port in servers:
            if not _port_free(port):
                raise RuntimeError(
                    f"port {port} on 127.0.0.1 is in use: choose another --base-port (0: free ports); if an earlier "
                    "`discovery dev` with a --state-dir holds it, run with that --state-dir and --replace"
                )
        return servers, free_ports(etcd_count, exclude=servers)

    def _server_command(
        self, region: Region, index: int, address: str, addresses: dict[str, list[str]], health: str | None
    ) -> list[str]:
        """``discovery serve`` for one server. Every other region is a peer, nearest first in
        the order of ``regions``, so FAILOVER and replication follow that order."""
        route = self.peer_via or (self.proxy.route if self.proxy is not None else lambda _from, _to, peer: peer)
        peers = [
            f"--peer={name}={','.join(route(region.name, name, peer) for peer in addresses[name])}"
            for name in self.regions
            if name != region.name
        ]
        security = ["--insecure"]
        if self.tls is not None:
            assert self.state_dir is not None and health is not None
            cert, key = self.tls.server_cert(region.name)
            security = [
                "--tls-cert", str(cert),
                "--tls-key", str(key),
                "--tls-client-ca", str(self.tls.ca),
                "--trust-domain", self.tls.trust_domain,
                "--policy", str(self.tls.policy),
                "--audit-log", str(self.state_dir / region.name / f"audit-{index}.jsonl"),
                "--health-listen", health,
            ]  # fmt: skip
        return [
            sys.executable, "-m", "discovery", "serve",
            "--region", region.name,
            "--listen", address,
            "--advertise", address,
            "--etcd", ",".join(region.etcd.endpoints),
            *peers,
            *security,
            *self.server_args,
        ]  # fmt: skip

    def _start_region(self, region: Region, progress: Progress) -> None:
        """etcd and servers launched together, then waited for: a server's Python start
        (about half a second) overlaps etcd's first election, and a server waits for its
        etcd by itself. etcd is waited for first, so its failure is the one reported."""
        region.etcd.launch()
        for member in region.etcd.members:
            self._report(progress, f"started {region.name} {member.name} pid {member.pid} on {member.endpoint}")
        for server in region.servers:
            server.launch()
            self._report(progress, f"started {region.name} server-{server.index} pid {server.pid} on {server.address}")
        region.etcd.wait_healthy(self.start_timeout, self._abort)
        for server in region.servers:
            server.wait_serving(self.start_timeout, self._abort)

    def _report(self, progress: Progress, line: str) -> None:
        with self._progress_lock:  # regions start in threads: one line at a time
            progress(line)

    # --- what a drill needs -------------------------------------------------------------------

    def region(self, name: str) -> Region:
        for region in self.running:
            if region.name == name:
                return region
        raise KeyError(f"no region {name!r} in this cluster ({', '.join(r.name for r in self.running)})")

    def server_count(self, region: str) -> int:
        return len(self.region(region).servers)

    def etcd_member_count(self, region: str) -> int:
        return len(self.region(region).etcd.members)

    def pause_region(self, name: str, timeout: float = 5.0) -> None:
        """SIGSTOP every process of the region, servers and etcd: a hung region, its sockets
        open and silent. Returns once every thread of them has stopped."""
        pids = self.region(name).pids()
        _signal_all(pids, signal.SIGSTOP)
        _wait_stopped(pids, True, timeout)

    def resume_region(self, name: str, timeout: float = 5.0) -> None:
        """SIGCONT every process of the region; returns once none of their threads is stopped."""
        pids = self.region(name).pids()
        _signal_all(pids, signal.SIGCONT)
        _wait_stopped(pids, False, timeout)

    def kill_server(self, region: str, index: int) -> None:
        """SIGKILL one server (a crash: no drain, no deregistration)."""
        self.region(region).servers[index].kill()

    def restart_server(self, region: str, index: int, timeout: float | None = None) -> int:
        """Start a killed server again, same address and flags; returns its new pid once it
        serves, and rewrites cluster.json."""
        server = self.region(region).servers[index]
        server.launch()
        server.wait_serving(timeout or self.start_timeout)
        self.write_state()
        return server.pid

    def etcd_leader(self, region: str, timeout: float = 10.0) -> int:
        """Index of the region's etcd leader (in ``region(name).etcd.members``); waits through
        an election."""
        return self.region(region).etcd.leader(timeout)

    def kill_etcd_member(self, region: str, index: int) -> None:
        """SIGKILL one etcd member of the region; its data stays for ``restart_etcd_member``."""
        self.region(region).etcd.kill_member(index)

    def restart_etcd_member(self, region: str, index: int, timeout: float | None = None) -> int:
        """Start a killed member again on its ports and data; returns its new pid once healthy,
        and rewrites cluster.json."""
        etcd = self.region(region).etcd
        etcd.restart_member(index, timeout or self.start_timeout)
        self.write_state()
        return etcd.members[index].pid

    # --- reporting ----------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        assert self.state_dir is not None, "the cluster was never started"
        return self.state_dir / STATE_FILE

    def describe(self) -> dict[str, Any]:
        """What cluster.json holds: per region its servers and etcd members, address and pid;
        the control server's address and the fault proxy's routes when they run."""
        described: dict[str, Any] = {
            "regions": {
                r.name: {
                    "servers": [_server_entry(s) for s in r.servers],
                    "etcd": [{"address": m.endpoint, "pid": m.pid} for m in r.etcd.members],
                }
                for r in self.running
            },
            "state_dir": str(self.state_dir),
        }
        if self.tls is not None:
            described["tls"] = self.tls.describe()
        if self.control_address is not None:
            described["control"] = self.control_address
        if self.proxy is not None:
            described["routes"] = self.proxy.routes()
        return described

    def write_state(self) -> None:
        # Written aside and renamed, so a reader never sees half a file.
        partial = self.state_file.with_suffix(".json.tmp")
        partial.write_text(json.dumps(self.describe(), indent=2) + "\n")
        partial.replace(self.state_file)

    def table(self) -> str:
        """One row per endpoint; logs relative to the state dir, so a row fits 80 columns. A
        server's plaintext health listener (mTLS) is a row of its own, role ``health``."""
        rows = [("REGION", "ROLE", "ADDRESS", "PID", "LOG (in the state dir)")]
        for r in self.running:
            for s in r.servers:
                rows.append((r.name, "server", s.address, str(s.pid), self._relative(s.log_path)))
                if s.health_address is not None:
                    rows.append((r.name, "health", s.health_address, str(s.pid), "plaintext, gRPC health only"))
                if s.dns_address is not None:
                    rows.append((r.name, "dns", s.dns_address, str(s.pid), "DNS, UDP and TCP (docs/dns.md)"))
                if s.http_address is not None:
                    scheme = "https" if self.tls is not None else "http"
                    rows.append((r.name, "http", s.http_address, str(s.pid), f"{scheme}, dashboard at /ui/"))
                if s.metrics_address is not None:
                    rows.append((r.name, "metrics", s.metrics_address, str(s.pid), "plaintext /metrics, /readyz"))
            rows += [(r.name, "etcd", m.endpoint, str(m.pid), self._relative(m.log_path)) for m in r.etcd.members]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)

    def _relative(self, path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(self.state_dir)) if self.state_dir is not None else str(path)
        return str(path)

    def dead(self) -> list[str]:
        """Processes that exited, whether a drill killed them or they crashed."""
        lines = [
            f"{s.name} exited with {s.proc.returncode}; see {s.log_path}"
            for r in self.running
            for s in r.servers
            if s.proc is not None and s.proc.poll() is not None
        ]
        lines += [
            f"{r.name} {m.name} at {m.endpoint} exited with {m.proc.returncode}; see {m.log_path}"
            for r in self.running
            for m in r.etcd.members
            if m.proc is not None and m.proc.poll() is not None
        ]
        return lines

    # --- stop ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything, in this order:

        1. the control server, so no fault lands while stopping;
        2. SIGCONT to every process, since a drill may have paused a region, and heal every link;
        3. SIGTERM to every server together, and wait for each (they drain; SIGKILL after 15 s);
        4. the fault proxy, once no server uses it;
        5. stop every region's etcd;
        6. remove what this cluster created in the state dir, unless ``keep``, and unlock it.
        """
        control, self._control = self._control, None
        if control is not None:
            control.stop()
        for region in self.running:
            _signal_all(region.pids(), signal.SIGCONT)
        if self.proxy is not None:
            self.proxy.heal()  # draining servers reach their peers as usual
        for region in self.running:
            for server in region.servers:
                server.terminate()
        for region in self.running:
            for server in region.servers:
                server.reap(15.0)
        if self.proxy is not None:
            self.proxy.stop()
        for region in self.running:
            region.etcd.stop()
        self.running.clear()
        self._release_state_dir()

    def _release_state_dir(self) -> None:
        if not self.keep:
            for path in reversed(self._created):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        self._created.clear()
        if self._state_lock is not None:
            os.close(self._state_lock)  # the state dir is free for the next cluster
            self._state_lock = None


def _server_entry(server: DevServer) -> dict[str, Any]:
    entry: dict[str, Any] = {"address": server.address, "pid": server.pid}
    if server.health_address is not None:
        entry["health"] = server.health_address
    if server.dns_address is not None:
        entry["dns"] = server.dns_address
    if server.http_address is not None:
        entry["http"] = server.http_address
    if server.metrics_address is not None:
        entry["metrics"] = server.metrics_address
    return entry


def admin_pkcs12(cert: bytes, key: bytes, ca: bytes, password: bytes) -> bytes:
    """A certificate, its key and the CA as PKCS#12, encrypted the legacy way (3DES, SHA-1
    MAC) that every browser and OS keychain imports; it holds a development identity only."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(50_000)
        .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
        .hmac_hash(hashes.SHA1())
        .build(password)
    )
    private_key = serialization.load_pem_private_key(key, password=None)
    return pkcs12.serialize_key_and_certificates(
        b"discovery dev admin",
        private_key,  # type: ignore[arg-type]
        x509.load_pem_x509_certificate(cert),
        [x509.load_pem_x509_certificate(ca)],
        encryption,
    )


def _write_atomic_bytes(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    partial.replace(path)


def _reusable_ca(tls_dir: Path) -> CertificateAuthority:
    """The CA an earlier cluster left in ``tls_dir``, if it can still sign for a while."""
    try:
        ca = CertificateAuthority.load(tls_dir)
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"cannot use the development CA in {tls_dir} ({exc}): remove {tls_dir} to have a new one made "
            "(certificates issued from the old one stop working), or choose another --state-dir"
        ) from None
    left = ca.cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    if left < datetime.timedelta(days=2):
        raise RuntimeError(
            f"the development CA in {tls_dir} expires on {ca.cert.not_valid_after_utc:%Y-%m-%d}: remove {tls_dir} "
            "to have a new one made, or choose another --state-dir"
        )
    return ca


def _write_atomic(path: Path, text: str) -> None:
    # A server reloading the policy when it changes must never read half a file.
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    partial.replace(path)


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        # The process may have exited since it was listed; our unreaped child keeps its pid.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_stopped(pids: list[int], stopped: bool, timeout: float) -> None:
    # A signal reaches a running process's threads at their next return to user space, not
    # within kill(): a drill that acts right after pausing must not find the region still up.
    deadline = time.monotonic() + timeout
    while pending := [pid for pid in pids if _stopped(pid) not in (stopped, None)]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pending} not {'stopped' if stopped else 'resumed'} after {timeout:g}s")
        time.sleep(0.005)


def _stopped(pid: int) -> bool | None:
    """Whether every thread of ``pid`` is stopped by a signal; None when it has exited (or
    there is no /proc to tell), which ends either wait."""
    states: list[str] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            # The name in parentheses may hold spaces: the state follows the last ')'.
            states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
    if not states or any(state in ("Z", "X") for state in states):
        return None
    return all(state == "T" for state in states)


# --- an earlier cluster in the way ---------------------------------------------------------------


class EarlierCluster(RuntimeError):
    """An earlier cluster is in the way of this one: its processes still run (named with their
    pids), or its files are in the state dir. ``replace=True`` (``--replace``) stops and
    removes them instead."""


@dataclass
class _Earlier:
    """The live processes of an earlier cluster, each pinned (a pidfd), so that stopping them
    can never signal a process that took the pid of one that exited meanwhile."""

    state_dir: Path
    owner: Pinned | None  # the process running it (`discovery dev`), holding the state dir's lock
    listed: list[Pinned]  # its servers and etcd members, from its cluster.json

    def processes(self) -> list[Pinned]:
        return ([self.owner] if self.owner is not None else []) + self.listed

    def close(self) -> None:
        for proc in self.processes():
            proc.close()


def _try_lock(state_dir: Path) -> int | None:
    """A descriptor holding an exclusive ``flock`` of the state dir, or None when another
    process holds it. The kernel drops the lock when the holder dies, however it dies, so a
    held lock means that cluster runs. The descriptor is not inherited (``O_CLOEXEC``)."""
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_holders(path: Path) -> list[int]:
    """Pids holding a ``flock`` on ``path``, from /proc/locks (lines like ``1: FLOCK ADVISORY
    WRITE 4242 fe:00:2146694 0 EOF``; a waiter's line reads ``1: -> FLOCK ...``)."""
    try:
        st = path.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    holders = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        with contextlib.suppress(ValueError):
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted:
                holders.append(int(fields[4]))
    return holders


def _read_state(state_dir: Path) -> dict[str, Any]:
    """An earlier cluster.json; empty when there is none or it is not one (nothing to name)."""
    try:
        described = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return described if isinstance(described, dict) else {}


def _regions_of(described: dict[str, Any]) -> list[str]:
    """Region names of an earlier cluster.json that are safe as names in the state dir (a
    hand-edited ``../x`` is not)."""
    regions = described.get("regions")
    if not isinstance(regions, dict):
        return []
    names = []
    for name in regions:
        with contextlib.suppress(InvalidArgument):
            names.append(validate_region(str(name)))
    return names


def _listed(state_dir: Path, described: dict[str, Any]) -> list[tuple[Pinned, str]]:
    """The servers and etcd members of an earlier cluster.json that still run, with their
    addresses. A pid counts only if /proc/PID/cmdline is that very process (that region's
    server on that address; etcd on that address with its data under that region of
    ``state_dir``), run by this user: pids get reused."""
    found: list[tuple[Pinned, str]] = []
    regions = described.get("regions")
    for region in _regions_of(described):
        body = regions[region] if isinstance(regions, dict) else None
        if not isinstance(body, dict):
            continue
        for role, matches in (("server", _is_server), ("etcd", _is_etcd)):
            entries = body.get("servers" if role == "server" else "etcd")
            for i, entry in enumerate(entries if isinstance(entries, list) else []):
                pid, address = (entry.get("pid"), entry.get("address")) if isinstance(entry, dict) else (None, None)
                if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(address, str):
                    continue
                name = f"{region} {role}-{i} at {address}"
                pinned = lifeline.pin(
                    pid, name, functools.partial(_is_process, matches, state_dir / region, region, address)
                )
                if pinned is not None:
                    found.append((pinned, address))
    return found


def _running_parent(listed: list[Pinned]) -> Pinned | None:
    """The `discovery dev` whose children these are, if it still runs."""
    for child in listed:
        parent = _parent(child.pid)
        if parent > 1 and parent != os.getpid() and _is_dev(_argv(parent)):
            check = functools.partial(_is_parent_dev, child.pid)
            owner = lifeline.pin(parent, "discovery dev", check)
            if owner is not None:
                return owner
    return None


def _is_parent_dev(child: int, pid: int) -> bool:
    return _parent(child) == pid and _is_dev(_argv(pid))


def _parent(pid: int) -> int:
    try:
        # The name in parentheses may hold spaces: the fields after the last ')' are state, ppid...
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _holds(state_dir: Path, pid: int) -> bool:
    return pid in _lock_holders(state_dir)


def _is_process(
    matches: Callable[[list[str], Path, str, str], bool], region_dir: Path, region: str, address: str, pid: int
) -> bool:
    return matches(_argv(pid), region_dir, region, address)


def _argv(pid: int) -> list[str]:
    """The command line of ``pid`` if this user runs it; empty otherwise (gone, a zombie,
    someone else's)."""
    try:
        if Path(f"/proc/{pid}").stat().st_uid != os.getuid():
            return []
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return []


def _is_server(argv: list[str], _region_dir: Path, region: str, address: str) -> bool:
    return argv[1:4] == ["-m", "discovery", "serve"] and (
        _flag(argv, "--region") == region and _flag(argv, "--listen") == address
    )


def _is_etcd(argv: list[str], region_dir: Path, _region: str, address: str) -> bool:
    if not argv or Path(argv[0]).name != "etcd" or f"--listen-client-urls=http://{address}" not in argv:
        return False
    data_dir = next((a.partition("=")[2] for a in argv if a.startswith("--data-dir=")), "")
    return bool(data_dir) and Path(data_dir).resolve().parent == region_dir.resolve()


def _is_dev(argv: list[str]) -> bool:
    """``python -m discovery dev ...`` or ``.../bin/discovery dev ...``."""
    for i, arg in enumerate(argv[:4]):
        if arg == "dev" and i > 0 and (Path(argv[i - 1]).name == "discovery" or argv[i - 2 : i] == ["-m", "discovery"]):
            return True
    return False


def _owner_name(pid: int) -> str:
    argv = _argv(pid)
    if _is_dev(argv):
        return "discovery dev"
    command = " ".join(argv) or "a process of another user"
    return command if len(command) <= 60 else command[:57] + "..."


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[i + 1]
    return None


def _port(address: str) -> int:
    try:
        return int(address.rpartition(":")[2])
    except ValueError:
        return 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the gRPC server binds: connections of a cluster stopped a moment ago linger in
        # TIME_WAIT on the port and must not count as "in use"; a listener still does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
