"""What every client command shares: the server address, the channel, errors and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

DEFAULT_SERVER = "127.0.0.1:7400"

# Exit codes, for scripts.
OK, FAILED, USAGE, NOT_FOUND, UNAVAILABLE = 0, 1, 2, 3, 4
_EXIT_FOR = {
    grpc.StatusCode.INVALID_ARGUMENT: USAGE,
    grpc.StatusCode.NOT_FOUND: NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: UNAVAILABLE,
}

EXIT_CODES_HELP = """exit codes:
  0  success
  1  any other failure
  2  bad usage or input rejected by the server (INVALID_ARGUMENT)
  3  not found
  4  server or its etcd unavailable, or the call timed out"""

_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class CommandError(Exception):
    """A failure to report on one line of stderr, with an exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


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


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("DISCOVERY_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help="discovery server (default: $DISCOVERY_SERVER or %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="deadline of each call (default: %(default)s)"
    )


def channel(args: argparse.Namespace) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(args.server, options=_CHANNEL_OPTIONS)


def rpc_error(exc: grpc.aio.AioRpcError, server: str) -> CommandError:
    code = exc.code()
    details = exc.details() or code.name.lower()
    if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower():
        details = f"cannot reach the discovery server at {server}"
    return CommandError(f"{code.name.lower()}: {details}", _EXIT_FOR.get(code, FAILED))


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, sort_keys=False) + "\n")
    sys.stdout.flush()


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)] if rows else map(len, header)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header).rstrip())
    for row in rows:
        print(fmt.format(*row).rstrip())
