"""The control endpoint of ``discovery dev``: another process (``discovery drill``) pauses
regions, kills servers and etcd members, and partitions or slows links of a running dev
cluster through it.

The protocol is one JSON line per connection each way, on 127.0.0.1 only:
``{"op": "pause_region", "region": "eu-west"}`` answered by ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "a readable message"}``.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any, Protocol

from discovery.devtools.faultproxy import FaultProxy, LinkFault

log = logging.getLogger("discovery.devcontrol")

MAX_REQUEST = 64 * 1024
_READ_TIMEOUT_S = 10.0  # a client that connects and says nothing does not hold a thread forever
NO_PROXY = "this cluster runs without the fault proxy: start `discovery dev` without --no-fault-proxy"


class ControlError(Exception):
    """The control server refused an operation, or could not be reached."""


class _BadRequest(ValueError):
    pass


Args = dict[str, Any]


class ClusterOps(Protocol):
    """What the control endpoint does to a cluster (``DevCluster`` is one). An unknown region
    raises KeyError naming the regions there are."""

    def describe(self) -> dict[str, Any]: ...
    def server_count(self, region: str) -> int: ...
    def etcd_member_count(self, region: str) -> int: ...
    def pause_region(self, name: str) -> None: ...
    def resume_region(self, name: str) -> None: ...
    def kill_server(self, region: str, index: int) -> None: ...
    def restart_server(self, region: str, index: int) -> int: ...
    def etcd_leader(self, region: str) -> int: ...
    def kill_etcd_member(self, region: str, index: int) -> None: ...
    def restart_etcd_member(self, region: str, index: int) -> int: ...


class ControlServer:
    """Serves the operations of a cluster (``ClusterOps``: a ``DevCluster``) and its
    ``FaultProxy`` on 127.0.0.1, one at a time: a drill's faults land in the order it sent them."""

    def __init__(self, cluster: ClusterOps, proxy: FaultProxy | None) -> None:
        self.cluster = cluster
        self.proxy = proxy
        self._lock = threading.Lock()
        self._closed = False
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None
        self._ops: dict[str, Callable[[Args], Any]] = {
            "describe": lambda _: self.cluster.describe(),
            "pause_region": lambda a: self.cluster.pause_region(_str(a, "region")),
            "resume_region": lambda a: self.cluster.resume_region(_str(a, "region")),
            "kill_server": self._kill_server,
            "restart_server": self._restart_server,
            "etcd_leader": lambda a: {"index": self.cluster.etcd_leader(_str(a, "region"))},
            "kill_etcd_member": self._kill_etcd_member,
            "restart_etcd_member": self._restart_etcd_member,
            "set_link_fault": self._set_link_fault,
            "heal_links": self._heal_links,
        }

    def start(self) -> str:
        """Listen on a free port of 127.0.0.1; returns "127.0.0.1:PORT"."""
        control = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = _READ_TIMEOUT_S

            def handle(self) -> None:
                line = self.rfile.readline(MAX_REQUEST)
                if not line:
                    return
                response = control.handle(line)
                self.wfile.write(json.dumps(response).encode() + b"\n")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                log.debug("control connection from %s failed", client_address, exc_info=True)

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="dev-control", daemon=True
        )
        self._thread.start()
        return self.address

    @property
    def address(self) -> str:
        assert self._server is not None, "the control server was never started"
        return f"127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        """Stop listening and refuse every operation not yet begun; returns once the one in
        progress (if any) has finished, so none lands while the cluster stops. Safe twice."""
        with self._lock:  # waits for the operation in progress
            self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def handle(self, line: bytes) -> dict[str, Any]:
        """One request line to its response object."""
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"the request is not JSON: {exc}"}
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": 'a request is a JSON object with "op", e.g. {"op": "describe"}'}
        op = self._ops.get(request["op"])
        if op is None:
            return {"ok": False, "error": f"unknown op {request['op']!r}; known: {', '.join(sorted(self._ops))}"}
        try:
            with self._lock:
                if self._closed:
                    return {"ok": False, "error": "the cluster is stopping"}
                result = op(request)
        except KeyError as exc:  # an unknown region: its message is the first argument
            return {"ok": False, "error": str(exc.args[0]) if exc.args else "not found"}
        except (_BadRequest, ValueError, IndexError, RuntimeError, TimeoutError, OSError) as exc:
            return {"ok": False, "error": str(exc) or type(exc).__name__}
        except Exception as exc:  # a bug: the drill still gets an answer
            log.exception("control op %s failed", request["op"])
            return {"ok": False, "error": f"{request['op']} failed: {type(exc).__name__}: {exc}"}
        log.info("control: %s done", request["op"])
        return {"ok": True, "result": result}

    # --- operations with more than one argument -------------------------------------------------

    def _server_index(self, args: Args) -> tuple[str, int]:
        region, index = _str(args, "region"), _int(args, "index")
        count = self.cluster.server_count(region)
        if not 0 <= index < count:
            raise _BadRequest(f"no server {index} in {region}: it has servers 0 to {count - 1}")
        return region, index

    def _member_index(self, args: Args) -> tuple[str, int]:
        region, index = _str(args, "region"), _int(args, "index")
        count = self.cluster.etcd_member_count(region)
        if not 0 <= index < count:
            raise _BadRequest(f"no etcd member {index} in {region}: it has members 0 to {count - 1}")
        return region, index

    def _kill_server(self, args: Args) -> None:
        self.cluster.kill_server(*self._server_index(args))

    def _restart_server(self, args: Args) -> dict[str, int]:
        return {"pid": self.cluster.restart_server(*self._server_index(args))}

    def _kill_etcd_member(self, args: Args) -> None:
        self.cluster.kill_etcd_member(*self._member_index(args))

    def _restart_etcd_member(self, args: Args) -> dict[str, int]:
        return {"pid": self.cluster.restart_etcd_member(*self._member_index(args))}

    def _set_link_fault(self, args: Args) -> list[dict[str, Any]]:
        proxy = self._proxy()
        region = _str(args, "region")
        self.cluster.server_count(region)  # KeyError naming the regions there are
        peer = args.get("peer")
        if peer is not None:
            if not isinstance(peer, str):
                raise _BadRequest(f"peer must be a region name, not {peer!r}")
            self.cluster.server_count(peer)
            if peer == region:
                raise _BadRequest(f"peer {peer!r} is the region itself: a link joins two regions")
        if "fault" not in args:
            raise _BadRequest('set_link_fault needs "fault": a link fault object, or null to heal')
        fault = None if args["fault"] is None else LinkFault.from_json(args["fault"])
        proxy.set_fault(region, fault, peer)
        return proxy.faults()

    def _heal_links(self, _: Args) -> list[dict[str, Any]]:
        proxy = self._proxy()
        proxy.heal()
        return proxy.faults()

    def _proxy(self) -> FaultProxy:
        if self.proxy is None:
            raise _BadRequest(NO_PROXY)
        return self.proxy


def _str(args: Args, key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise _BadRequest(f"{args.get('op')} needs {key!r}: a string, not {value!r}")
    return value


def _int(args: Args, key: str) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadRequest(f"{args.get('op')} needs {key!r}: an integer, not {value!r}")
    return value


class ControlClient:
    """Calls a ``ControlServer``, synchronously (from async code: ``asyncio.to_thread``)."""

    def __init__(self, address: str, timeout: float = 60.0) -> None:
        self.address = address
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        """The result of ``op``; ControlError with the server's message when it refused, or
        saying why there was no answer."""
        host, _, port = self.address.rpartition(":")
        request = json.dumps({"op": op, **args}).encode() + b"\n"
        try:
            with socket.create_connection((host, int(port)), timeout=self.timeout) as sock:
                sock.sendall(request)
                line = sock.makefile("rb").readline()
        except ConnectionRefusedError:
            raise ControlError(
                f"nothing listens at {self.address}: is the `discovery dev` that wrote it still running?"
            ) from None
        except TimeoutError:
            raise ControlError(
                f"{op}: no answer from the dev control server at {self.address} within {self.timeout:g}s"
            ) from None
        except (OSError, ValueError) as exc:
            raise ControlError(f"{op}: cannot talk to the dev control server at {self.address}: {exc}") from None
        if not line:
            raise ControlError(
                f"{op}: the dev control server at {self.address} closed the connection without an answer"
            )
        try:
            response = json.loads(line)
        except ValueError:
            raise ControlError(
                f"{op}: the dev control server answered something that is not JSON: {line[:200]!r}"
            ) from None
        if not isinstance(response, dict) or "ok" not in response:
            raise ControlError(f"{op}: unexpected answer from the dev control server: {response!r}")
        if not response["ok"]:
            raise ControlError(str(response.get("error") or f"{op} failed"))
        return response.get("result")
