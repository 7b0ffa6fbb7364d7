"""Transport security of the channels to discovery servers: mTLS from PEM files, or plaintext
only when asked for by name.

The settings are file paths, not PEM bodies, and the files are read each time a channel is
built: a client whose certificate is rotated on disk picks the new one up when its channel
is rebuilt (the library rebuilds a channel that cannot connect). gRPC's channel credentials
cannot reload by themselves.

Servers of this project require a client certificate (mTLS); a CA alone (server
authentication only) is accepted here for servers that do not, but is refused by ours.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import grpc.aio

from discovery_client.errors import ConfigError

ENV_TLS_CA = "DISCOVERY_TLS_CA"
ENV_TLS_CERT = "DISCOVERY_TLS_CERT"
ENV_TLS_KEY = "DISCOVERY_TLS_KEY"
ENV_TLS_SERVER_NAME = "DISCOVERY_TLS_SERVER_NAME"
ENV_INSECURE = "DISCOVERY_INSECURE"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

NO_SETTINGS = (
    f"no TLS settings: set {ENV_TLS_CA}, {ENV_TLS_CERT} and {ENV_TLS_KEY} "
    "(`discovery dev` writes them to STATE_DIR/env.sh; `source` it), "
    f"or {ENV_INSECURE}=1 for a server started with --insecure"
)

# Where each setting comes from, for messages that say what to change.
_SOURCES = {
    "ca": f"{ENV_TLS_CA} or --tls-ca",
    "cert": f"{ENV_TLS_CERT} or --tls-cert",
    "key": f"{ENV_TLS_KEY} or --tls-key",
    "server_name": f"{ENV_TLS_SERVER_NAME} or --tls-server-name",
}


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """How to secure channels to discovery servers.

    Args:
        ca: PEM file of the CA (bundle) that signed the servers' certificates; "" trusts the
            system's roots.
        cert, key: PEM files of this client's certificate (chain) and private key; servers
            here require one (its URI SAN is the identity permissions are granted to).
        server_name: the name to check the server's certificate against instead of the host
            dialled (a server reached by IP address or through a load balancer).
        insecure: plaintext, for a server started with ``--insecure``; excludes the others.
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""
    insecure: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TlsConfig:
        """The settings from ``DISCOVERY_TLS_CA``, ``DISCOVERY_TLS_CERT``,
        ``DISCOVERY_TLS_KEY``, ``DISCOVERY_TLS_SERVER_NAME`` and ``DISCOVERY_INSECURE=1``;
        not validated (``validate`` says what is missing)."""
        env = os.environ if environ is None else environ
        flag = env.get(ENV_INSECURE, "").strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ConfigError(f"{ENV_INSECURE}={env[ENV_INSECURE]!r}: expected 1 (plaintext) or 0")
        return cls(
            ca=env.get(ENV_TLS_CA, "").strip(),
            cert=env.get(ENV_TLS_CERT, "").strip(),
            key=env.get(ENV_TLS_KEY, "").strip(),
            server_name=env.get(ENV_TLS_SERVER_NAME, "").strip(),
            insecure=flag in _TRUE,
        )

    def merged(
        self,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
        insecure: bool | None = None,
    ) -> TlsConfig:
        """These settings with explicit ones (flags, arguments) winning; None or "" keeps
        the current value. An explicit TLS file overrides an inherited insecure switch, and
        an explicit ``insecure=True`` drops inherited TLS files; both explicit is an error
        (raised by ``validate``)."""
        explicit = bool(ca or cert or key or server_name)
        base = self
        if insecure and not explicit:
            base = TlsConfig()
        elif explicit and not insecure:
            base = replace(base, insecure=False)
        return TlsConfig(
            ca=ca or base.ca,
            cert=cert or base.cert,
            key=key or base.key,
            server_name=server_name or base.server_name,
            insecure=bool(insecure) or base.insecure,
        )

    @property
    def enabled(self) -> bool:
        """Whether any TLS file is set (channels are then secure)."""
        return bool(self.ca or self.cert or self.key)

    def validate(self) -> TlsConfig:
        """Check the combination and that every file named can be read; returns self."""
        if self.enabled and self.insecure:
            raise ConfigError(
                f"both TLS files and insecure are set: use one ({ENV_INSECURE}=1 or --insecure is "
                "for a server started with --insecure)"
            )
        if not self.enabled and not self.insecure:
            if self.server_name:
                raise ConfigError(f"{_SOURCES['server_name']} is set without TLS files: {NO_SETTINGS}")
            raise ConfigError(NO_SETTINGS)
        if bool(self.cert) != bool(self.key):
            have, lack = ("cert", "key") if self.cert else ("key", "cert")
            raise ConfigError(f"a client {have} is set without its {lack}: set {_SOURCES[lack]} too")
        for name in ("ca", "cert", "key"):
            self._read(name)
        return self

    def _read(self, name: str) -> bytes | None:
        path = getattr(self, name)
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ConfigError(f"TLS {name} file {path} ({_SOURCES[name]}): cannot read it: {exc.strerror}") from None
        if b"-----BEGIN" not in data:
            raise ConfigError(f"TLS {name} file {path} ({_SOURCES[name]}): not a PEM file")
        return data

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials from the files as they are now (read on every call); None for insecure."""
        if not self.enabled:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self._read("ca"),
            private_key=self._read("key"),
            certificate_chain=self._read("cert"),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel options the settings need (the server name to check, when set)."""
        if self.enabled and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    def aio_channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A ``grpc.aio`` channel to ``target``, secure unless insecure is set."""
        credentials = self.channel_credentials()
        opts = [*options, *self.channel_options()]
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=opts)
        return grpc.aio.secure_channel(target, credentials, options=opts)

    def sync_channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking ``grpc.Channel`` to ``target``, secure unless insecure is set."""
        credentials = self.channel_credentials()
        opts = [*options, *self.channel_options()]
        if credentials is None:
            return grpc.insecure_channel(target, options=opts)
        return grpc.secure_channel(target, credentials, options=opts)


def handshake_hint(details: str, tls: TlsConfig | None) -> str:
    """Advice for an UNAVAILABLE whose ``details`` point at a refused or failed TLS handshake.

    gRPC reports every handshake failure as UNAVAILABLE; a server that refuses the client's
    certificate just closes the socket, so the advice can only say what is likely.
    """
    if tls is None:
        return ""
    text = details.lower()
    if tls.insecure:
        if "socket closed" in text or "handshake" in text:
            return (
                "the server may require TLS, and this client connects in plaintext "
                f"({ENV_INSECURE}=1 or --insecure): set {ENV_TLS_CA}, {ENV_TLS_CERT} and {ENV_TLS_KEY} "
                "(or --tls-ca, --tls-cert, --tls-key) instead"
            )
        return ""
    if "hostname verification" in text or "peer name" in text:
        return (
            "the server's certificate does not name the address dialled: set "
            f"{_SOURCES['server_name']} to a DNS name in its certificate"
        )
    if "certificate_verify_failed" in text or "unable to get local issuer" in text:
        return f"the server's certificate is not signed by the CA in {_SOURCES['ca']} (or has expired)"
    if "wrong_version_number" in text:
        return f"the server does not speak TLS (started with --insecure?): use {ENV_INSECURE}=1 or --insecure"
    if any(word in text for word in ("socket closed", "handshake", "ssl", "tls")):
        return (
            "the server may have refused this client's certificate (issued by another CA, expired, "
            f"or missing): check {_SOURCES['cert']} and {_SOURCES['key']}"
        )
    return ""
