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
    ConfigError,
    DirectClient,
    DiscoveryClientError,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    Unavailable,
    Unreachable,
    from_rpc_error,
)

DEFAULT_SERVER = "127.0.0.1:7400"

# Exit codes, for scripts.
OK, FAILED, USAGE, NOT_FOUND, UNAVAILABLE = 0, 1, 2, 3, 4

# The one table from failures to exit codes: the client's exceptions (the client picks their
# class from the gRPC code), then the server's own, raised in-process by the commands that run
# server code (serve, dev, xds-bootstrap's checks). A class not listed takes its nearest
# listed base's code, else FAILED.
EXIT_CODES: dict[type[Exception], int] = {
    InvalidArgument: USAGE,
    ConfigError: USAGE,
    NotFound: NOT_FOUND,
    Unavailable: UNAVAILABLE,
    server_errors.InvalidArgument: USAGE,
    server_errors.StoreUnavailable: UNAVAILABLE,
}

EXIT_CODES_HELP = """exit codes:
  0  success
  1  any other failure
  2  bad usage or input rejected by the server (INVALID_ARGUMENT)
  3  not found
  4  server or its etcd unavailable, or the call timed out"""

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
    """The failure as one line: a server's answer as its gRPC status and details."""
    if isinstance(exc, Unreachable):
        return f"unavailable: cannot reach the discovery server at {exc.server}"
    if isinstance(exc, DiscoveryClientError) and exc.code is not None:
        return f"{exc.code.name.lower()}: {exc.details or exc.code.name.lower()}"
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


def client(args: argparse.Namespace) -> DirectClient:
    """The client library's low-level face, talking to --server with --timeout per call."""
    return DirectClient(
        args.server,
        call_timeout=args.timeout,
        # One attempt, as a command always made: whoever runs it decides whether to try
        # again (and a Deregister repeated after a lost answer would say NOT_FOUND).
        retry=RetryPolicy(attempts=1, deadline=args.timeout),
        stream_max_seconds=_STREAM_SECONDS,
    )


def channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """A plain channel to --server, for services the client library does not speak (CSDS)."""
    made = grpc.aio.insecure_channel(args.server, options=_CHANNEL_OPTIONS)
    _channels[args.server] = made
    return made


def rpc_error(exc: grpc.aio.AioRpcError, server: str) -> DiscoveryClientError:
    """The client's exception for a failed call over ``channel()``, classified as the client
    classifies its own (the channel tells whether the server was reached at all)."""
    return from_rpc_error(exc, server, _channels.get(server))


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, sort_keys=False) + "\n")
    sys.stdout.flush()


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)] if rows else map(len, header)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header).rstrip())
    for row in rows:
        print(fmt.format(*row).rstrip())
