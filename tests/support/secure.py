"""Real certificates and a policy for tests whose subject is security: a CA per test
(``Pki``), server certificates per region, client certificates per identity, the server
settings that turn mTLS on, and channels that present a given identity."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from discovery.security.certs import CertificateAuthority, Issued, server_id

TRUST_DOMAIN = "test.local"
ADMIN = f"spiffe://{TRUST_DOMAIN}/admin"

# Who may do what in most security tests: an admin, services that own their own name, and the
# servers of every region. Limits are generous unless a test writes its own policy.
# The admin's grant, which most test policies start with.
ADMIN_GRANT = f"""
[[grant]]
identity = "{ADMIN}"
admin = true
register = ["*"]
read = ["*"]
"""

DEFAULT_POLICY = f"""{ADMIN_GRANT}
[[grant]]
identity = "spiffe://{TRUST_DOMAIN}/svc/*"
register = ["{{name}}", "{{name}}.*"]
read = ["*"]

[[grant]]
identity = "spiffe://{TRUST_DOMAIN}/discovery/server/*"
replicate = true
read = ["*"]
"""


def svc(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/svc/{name}"


class Pki:
    """A CA in ``directory`` and the certificates tests ask for, issued once each."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = CertificateAuthority.create(directory / "ca")
        self.ca_path = directory / "ca" / "ca.pem"
        self._issued: dict[str, Issued] = {}

    def client(self, identity: str, **kwargs: Any) -> Issued:
        """A client certificate whose URI SAN is ``identity`` (kwargs: see CertificateAuthority.issue)."""
        key = identity + repr(sorted(kwargs.items()))
        if key not in self._issued:
            name = f"client-{len(self._issued)}"
            self._issued[key] = self.ca.issue(spiffe_id=identity, out=self.dir / name, **kwargs)
        return self._issued[key]

    def server(self, region: str) -> Issued:
        return self.client(server_id(TRUST_DOMAIN, region), dns=("localhost",), ips=("127.0.0.1",))

    def policy(self, text: str = DEFAULT_POLICY, name: str = "policy.toml") -> Path:
        path = self.dir / name
        path.write_text(textwrap.dedent(text))
        return path

    def settings(self, region: str, *, policy: Path | None = None, audit: Path | None = None) -> dict[str, Any]:
        """Overrides for ``Servers.start`` that serve mTLS as ``region``'s server."""
        issued = self.server(region)
        return {
            "insecure": False,
            "tls_cert": str(issued.cert_path),
            "tls_key": str(issued.key_path),
            "tls_client_ca": str(self.ca_path),
            "trust_domain": TRUST_DOMAIN,
            "policy_file": str(policy or self.policy()),
            "audit_log": str(audit or (self.dir / f"audit-{region}.jsonl")),
            "reload_poll_seconds": 0.2,
        }

    def channel(self, address: str, issued: Issued | None) -> grpc.aio.Channel:
        """A channel to ``address`` presenting ``issued`` (None: no client certificate)."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca_path.read_bytes(),
            private_key=issued.key if issued else None,
            certificate_chain=issued.cert if issued else None,
        )
        return grpc.aio.secure_channel(address, credentials)
