"""Entry point: parse, run the verb, turn failures into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from discovery import eventloop
from discovery.cli import certs, dev, drill, health, instances, lookup, serve, status, xds
from discovery.cli._common import EXIT_CODES_HELP, FAILED, OK, CommandError, describe, exit_code
from discovery.errors import DiscoveryError
from discovery_client import DiscoveryClientError

DESCRIPTION = """Multi-region service discovery: regional gRPC servers on etcd.

Examples (try them on this machine):
  discovery dev            # etcd and a server per region (mTLS), foreground
  source STATE_DIR/env.sh  # another shell: the dev CA and admin certificate
  discovery register web 127.0.0.1:8080 --server 127.0.0.1:7400
  discovery resolve web --server 127.0.0.1:7400
  discovery status
  discovery health --server 127.0.0.1:7400   # exit 0 when SERVING, else 4
  discovery xds-bootstrap > bootstrap.json   # for stock gRPC clients
  discovery drill region-hang --cluster STATE_DIR/cluster.json
  discovery certs issue --ca-dir STATE_DIR/tls --out web \\
      --id spiffe://discovery.local/svc/web

Client commands take --server HOST:PORT (default $DISCOVERY_SERVER or
127.0.0.1:7400), --json, and TLS settings (--tls-ca, --tls-cert, --tls-key or
$DISCOVERY_TLS_*; --insecure for a plaintext server). See docs/security.md."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="discovery",
        description=DESCRIPTION,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the examples are laid out by hand
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (serve, dev, instances, lookup, status, health, xds, drill, certs):
        module.add_parsers(sub)
    return parser


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def _setup_logging(level: str) -> None:
    """Information to stdout, warnings and errors to stderr: a clean run has an empty stderr."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_BelowWarning())
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(fmt)
    logging.basicConfig(level=level.upper(), handlers=[out, err])
    if level != "debug":
        # Its information lines (which server answered, a stream resumed) would land on
        # stdout among a command's output, and in its JSON; its warnings still show.
        logging.getLogger("discovery_client").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        loop = args.event_loop_of(args) if hasattr(args, "event_loop_of") else "asyncio"
        code: int = eventloop.run(lambda: args.func(args), loop)
        return code
    except (CommandError, DiscoveryClientError, DiscoveryError) as exc:
        print(f"discovery {args.command}: error: {describe(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`discovery watch web | head`): not a failure of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    except Exception as exc:  # a bug: still one line, and the details for whoever debugs it
        logging.getLogger("discovery").debug("unexpected failure", exc_info=True)
        print(
            f"discovery {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(run with --log-level debug for details)",
            file=sys.stderr,
        )
        return FAILED


def run() -> None:
    sys.exit(main())
