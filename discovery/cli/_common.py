"""What every client command shares: the client, the server address, errors and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import weakref
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from discovery import errors as server_errors
from discovery_client import (
    AccessDenied,
    ConfigError,
    DirectClient,
    DiscoveryClientError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    TlsConfig,
    Unavailable,
    Unreachable,
    from_rpc_error,
)

DEFAULT_SERVER = "127.0.0.1:7400"

# Exit codes, for scripts.
OK, FAILED, USAGE, NOT_FOUND, UNAVAILABLE, DENIED, EXHAUSTED = 0, 1, 2, 3, 4, 5, 6

# The one table from failures to exit codes: the client's exceptions (the client picks their
# class from the gRPC code), then the server's own, raised in-process by the commands that run
# server code (serve, dev, xds-bootstrap's checks). A class not listed takes its nearest
# listed base's code, else FAILED.
EXIT_CODES: dict[type[Exception], int] = {
    InvalidArgument: USAGE,
    ConfigError: USAGE,
    NotFound: NOT_FOUND,
    Unavailable: UNAVAILABLE,
    AccessDenied: DENIED,
    ResourceExhausted: EXHAUSTED,
    server_errors.InvalidArgument: USAGE,
    server_errors.StoreUnavailable: UNAVAILABLE,
    server_errors.Unauthenticated: DENIED,
    server_errors.PermissionDenied: DENIED,
    server_errors.ResourceExhausted: EXHAUSTED,
}

EXIT_CODES_HELP = """exit codes:
  0  success
  1  any other failure
  2  bad usage or input rejected by the server (INVALID_ARGUMENT)
  3  not found
  4  server or its etcd unavailable, or the call timed out (also a refused TLS
     handshake)
  5  not allowed: the certificate's identity is unknown (UNAUTHENTICATED) or
     lacks the grant (PERMISSION_DENIED)
  6  over a limit (RESOURCE_EXHAUSTED); the message names the limit and when to
     retry"""

# The library restarts its streams every 10 minutes to move between servers; a command has
# one server, and a restarted Watch would print an empty change. Follow one stream for a day.
_STREAM_SECONDS = 24 * 3600.0

_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
# Channels made by channel(), so rpc_error() can ask a failed call's channel whether it was connected.
_channels: weakref.WeakValueDictionary[str, grpc.aio.Channel] = weakref.WeakValueDictionary()
_tls: dict[str, TlsConfig] = {}


class CommandError(Exception):
    """A failure to report on one line of stderr, with an exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, CommandError):
        return exc.code
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return FAILED


def describe(exc: BaseException) -> str:
    """The failure as one line: a server's answer as its gRPC status and details, and the
    client's hint when the status alone would mislead (a refused TLS handshake)."""
    hint = f"; {exc.hint}" if isinstance(exc, DiscoveryClientError) and exc.hint else ""
    if isinstance(exc, Unreachable):
        return f"unavailable: cannot reach the discovery server at {exc.server}{hint}"
    if isinstance(exc, ResourceExhausted) and exc.code is not None:
        parts = []
        if exc.limit:
            parts.append(f"limit {exc.limit}")
        if exc.retry_after:
            parts.append(f"retry after {exc.retry_after:g}s")
        suffix = f" ({', '.join(parts)})" if parts else ""
        return f"resource_exhausted: {exc.details or 'over a limit'}{suffix}"
    if isinstance(exc, DiscoveryClientError) and exc.code is not None:
        return f"{exc.code.name.lower()}: {exc.details or exc.code.name.lower()}{hint}"
    return str(exc)


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for a number that must fit a protobuf field, so a huge one is a usage
    error and not a crash while building the request."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not within {low}..{high}")
        return value

    return parse


UINT32 = bounded_int(0, 2**32 - 1)
REVISION = bounded_int(0, 2**63 - 1)


def add_verb(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str,
    epilog: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A command whose ``--help`` ends with its examples, laid out as written."""
    return sub.add_parser(
        name,
        help=help,
        description=description or help[:1].upper() + help[1:] + ".",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def seconds(text: str) -> float:
    """An argparse type for a deadline: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


TLS_HELP = """mTLS with a client certificate (the servers require one), or plaintext with
--insecure for a server started with --insecure. Each flag wins over its
environment variable; `discovery dev` writes the variables to
STATE_DIR/env.sh."""


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """--tls-ca, --tls-cert, --tls-key, --tls-server-name and --insecure (client commands only:
    `serve` has its own --insecure, for its listeners)."""
    group = parser.add_argument_group("transport security", TLS_HELP)
    group.add_argument(
        "--tls-ca", metavar="FILE", help="CA bundle (PEM) the servers' certificates chain to ($DISCOVERY_TLS_CA)"
    )
    group.add_argument("--tls-cert", metavar="FILE", help="this client's certificate (PEM) ($DISCOVERY_TLS_CERT)")
    group.add_argument("--tls-key", metavar="FILE", help="this client's private key (PEM) ($DISCOVERY_TLS_KEY)")
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="check the server's certificate for this name instead of the host dialled ($DISCOVERY_TLS_SERVER_NAME)",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, for a server started with --insecure ($DISCOVERY_INSECURE=1)",
    )


def tls_settings(args: argparse.Namespace) -> TlsConfig:
    """The TLS settings of a command: its flags over the environment, validated (a
    ``ConfigError``, exit 2, says what is missing)."""
    return (
        TlsConfig.from_env()
        .merged(
            ca=args.tls_ca,
            cert=args.tls_cert,
            key=args.tls_key,
            server_name=args.tls_server_name,
            insecure=args.insecure or None,
        )
        .validate()
    )


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("DISCOVERY_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help="discovery server (default: $DISCOVERY_SERVER or %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--timeout", type=seconds, default=5.0, metavar="SECONDS", help="deadline of each call (default: %(default)s)"
    )
    add_tls_flags(parser)


def client(args: argparse.Namespace) -> DirectClient:
    """The client library's low-level face, talking to --server with --timeout per call."""
    return DirectClient(
        args.server,
        call_timeout=args.timeout,
        # One attempt, as a command always made: whoever runs it decides whether to try
        # again (and a Deregister repeated after a lost answer would say NOT_FOUND).
        retry=RetryPolicy(attempts=1, deadline=args.timeout),
        stream_max_seconds=_STREAM_SECONDS,
        tls=tls_settings(args),
    )


def channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """A channel to --server secured as the flags say, for services the client library does
    not speak (CSDS)."""
    tls = tls_settings(args)
    made = tls.aio_channel(args.server, options=_CHANNEL_OPTIONS)
    _channels[args.server] = made
    _tls[args.server] = tls
    return made


def rpc_error(exc: grpc.aio.AioRpcError, server: str) -> DiscoveryClientError:
    """The client's exception for a failed call over ``channel()``, classified as the client
    classifies its own (the channel tells whether the server was reached at all; the TLS
    settings, what a refused handshake probably means)."""
    return from_rpc_error(exc, server, _channels.get(server), _tls.get(server))


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, sort_keys=False) + "\n")
    sys.stdout.flush()


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)] if rows else map(len, header)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header).rstrip())
    for row in rows:
        print(fmt.format(*row).rstrip())
