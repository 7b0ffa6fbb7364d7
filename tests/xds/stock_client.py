"""A stock gRPC client, nothing of ours: ``grpc.insecure_channel("xds:///SERVICE")`` with the
bootstrap from GRPC_XDS_BOOTSTRAP, calling a backend in a loop and printing one JSON line per
call: ``{"ok": "<backend name>"}`` or ``{"error": "<CODE>", "details": "..."}``.

Run as a subprocess by the tests (grpcio reads the bootstrap once per xDS client, and a
process of its own keeps the test's event loop free of gRPC's threads). Exits when its stdin
closes, so it never outlives the test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import grpc

METHOD = "/xdstest.Echo/Who"


def _exit_when_stdin_closes() -> None:
    sys.stdin.read()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args()
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    channel = grpc.insecure_channel(args.target)
    call = channel.unary_unary(METHOD)
    print(json.dumps({"started": True, "t": time.monotonic()}), flush=True)
    while True:
        try:
            answer = call(b"", timeout=args.timeout)
            line = {"ok": answer.decode()}
        except grpc.RpcError as exc:
            line = {"error": exc.code().name, "details": (exc.details() or "")[:300]}
        line["t"] = time.monotonic()
        print(json.dumps(line), flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
