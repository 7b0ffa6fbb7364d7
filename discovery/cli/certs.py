"""``discovery certs ca`` and ``discovery certs issue``: a development CA and certificates from it.

For development and tests; production runs any SPIFFE-capable CA (docs/security.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from pathlib import Path

from cryptography import x509

from discovery.cli._common import FAILED, OK, USAGE, CommandError, add_verb
from discovery.security.certs import CA_CERT, CA_KEY, CertificateAuthority

CERTS_EPILOG = """examples:
  discovery certs ca --dir ./tls
  discovery certs issue --ca-dir ./tls \\
      --id spiffe://discovery.local/svc/web --out ./tls/web
  discovery certs issue --ca-dir STATE_DIR/tls \\
      --id spiffe://discovery.local/discovery/server/eu-west \\
      --out ./tls/server-eu-west --dns localhost --ip 127.0.0.1

For development and tests; in production use any SPIFFE-capable CA."""

CA_EPILOG = """examples:
  # writes ./tls/ca.pem and ./tls/ca-key.pem (owner-only)
  discovery certs ca --dir ./tls
  # replaces it: certificates of the old CA stop being trusted
  discovery certs ca --dir ./tls --force"""

ISSUE_EPILOG = """examples:
  discovery certs issue --ca-dir ./tls \\
      --id spiffe://discovery.local/svc/web --out ./tls/web
  discovery certs issue --ca-dir ./tls \\
      --id spiffe://discovery.local/discovery/server/eu-west \\
      --out ./tls/server --dns localhost --ip 127.0.0.1 --days 30

Writes PREFIX.pem (the certificate) and PREFIX-key.pem (its key, readable by
its owner only). The identity is the SPIFFE ID, as the certificate's URI SAN;
a server certificate also needs the names clients dial (--dns, --ip)."""

# SPIFFE ID syntax (spiffe.io, "SPIFFE-ID"): lower-case trust domain, then a non-empty path of
# segments of letters, digits, '.', '-' and '_', none of them '.' or '..'.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_DNS_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def spiffe_id(text: str) -> str:
    """An argparse type for spiffe://TRUST_DOMAIN/PATH."""
    example = "spiffe://discovery.local/svc/web"
    scheme, sep, rest = text.partition("://")
    if scheme != "spiffe" or not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not a SPIFFE ID: it starts with spiffe:// (e.g. {example})")
    domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the trust domain {domain!r} may hold only lower-case letters, digits, '.', '-' and '_'"
        )
    if not slash or not path:
        raise argparse.ArgumentTypeError(f"{text!r} has no path after the trust domain (e.g. {example})")
    for segment in path.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise argparse.ArgumentTypeError(
                f"{text!r}: path segment {segment!r} must be non-empty letters, digits, '.', '-' or '_' "
                "(and not '.' or '..')"
            )
    if len(text) > 2048:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}...: a SPIFFE ID is at most 2048 bytes")
    return text


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def _dns(text: str) -> str:
    if len(text) > 253 or not _DNS_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a DNS name")
    return text


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not 0 < value <= 36500:
        raise argparse.ArgumentTypeError(f"{text} is not within 0..36500 days")
    return value


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = add_verb(sub, "certs", help="a development certificate authority and certificates from it", epilog=CERTS_EPILOG)
    verbs = c.add_subparsers(dest="certs_command", metavar="VERB", required=True)

    ca = add_verb(verbs, "ca", help="create a CA (ca.pem and ca-key.pem) in a directory", epilog=CA_EPILOG)
    ca.add_argument("--dir", required=True, type=Path, metavar="DIR", help="where to write ca.pem and ca-key.pem")
    ca.add_argument("--name", default="discovery development CA", help="the CA's common name (default: %(default)s)")
    ca.add_argument("--days", type=_days, default=3650, metavar="N", help="validity (default: %(default)s)")
    ca.add_argument("--force", action="store_true", help="replace a CA already in DIR")
    ca.set_defaults(func=create_ca)

    issue = add_verb(
        verbs, "issue", help="mint a certificate and key for a SPIFFE identity from a CA", epilog=ISSUE_EPILOG
    )
    issue.add_argument("--ca-dir", required=True, type=Path, metavar="DIR", help="the CA's directory (certs ca --dir)")
    issue.add_argument("--id", required=True, type=spiffe_id, metavar="SPIFFE_ID", help="spiffe://TRUST_DOMAIN/PATH")
    issue.add_argument("--out", required=True, type=Path, metavar="PREFIX", help="writes PREFIX.pem and PREFIX-key.pem")
    issue.add_argument("--days", type=_days, default=365, metavar="N", help="validity (default: %(default)s)")
    issue.add_argument(
        "--dns", type=_dns, action="append", default=[], metavar="NAME", help="a DNS name SAN (repeatable)"
    )
    issue.add_argument(
        "--ip", type=_ip, action="append", default=[], metavar="ADDR", help="an IP address SAN (repeatable)"
    )
    issue.set_defaults(func=issue_certificate)


async def create_ca(args: argparse.Namespace) -> int:
    return _create_ca(args)  # files only, nothing to wait on: the loop main() runs has nothing else to do


async def issue_certificate(args: argparse.Namespace) -> int:
    return _issue(args)


def _create_ca(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    existing = [p for p in (directory / CA_CERT, directory / CA_KEY) if p.exists()]
    if existing and not args.force:
        raise CommandError(
            f"{existing[0]} exists: a new CA would leave every certificate it issued untrusted; "
            "pass --force to replace it, or choose another --dir",
            FAILED,
        )
    try:
        ca = CertificateAuthority.create(directory, name=args.name, days=args.days)
    except OSError as exc:
        raise CommandError(f"cannot write the CA to {directory}: {exc.strerror or exc}", FAILED) from None
    print(f"wrote {directory / CA_CERT} (the CA certificate: give it to servers and clients as their CA bundle)")
    print(f"wrote {directory / CA_KEY} (the CA key, readable by its owner only: keep it secret)")
    print(f"CA '{args.name}', valid until {ca.cert.not_valid_after_utc:%Y-%m-%d}")
    return OK


def _issue(args: argparse.Namespace) -> int:
    ca_dir: Path = args.ca_dir
    if not (ca_dir / CA_CERT).is_file() or not (ca_dir / CA_KEY).is_file():
        raise CommandError(
            f"{ca_dir} holds no CA ({CA_CERT} and {CA_KEY}): create one with `discovery certs ca --dir {ca_dir}`",
            FAILED,
        )
    try:
        ca = CertificateAuthority.load(ca_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise CommandError(f"cannot load the CA in {ca_dir}: {exc}", FAILED) from None
    out: Path = args.out
    if out.name == "" or out.is_dir():
        raise CommandError(f"--out {out} is a directory: give a path prefix such as {out / 'web'}", USAGE)
    try:
        issued = ca.issue(spiffe_id=args.id, dns=tuple(args.dns), ips=tuple(args.ip), days=args.days, out=out)
    except OSError as exc:
        raise CommandError(f"cannot write the certificate to {out}: {exc.strerror or exc}", FAILED) from None
    cert = x509.load_pem_x509_certificate(issued.cert)
    print(f"wrote {issued.cert_path} (certificate) and {issued.key_path} (key, readable by its owner only)")
    names = ", ".join([*args.dns, *args.ip])
    print(f"identity {args.id}" + (f"  names {names}" if names else ""))
    print(
        f"serial {cert.serial_number:x}, valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z, CA {ca_dir / CA_CERT}"
    )
    return OK
