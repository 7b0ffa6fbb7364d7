"""The ``discovery`` command: one module per command group, one function per verb.

Public entry point: ``main`` (the console script)."""

import os

# gRPC's core logs failed TLS handshakes and the like at INFO on stderr by itself; a command's
# own one-line error says it better. Before grpc is first imported; an operator's setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from discovery.cli.main import main

__all__ = ["main"]
