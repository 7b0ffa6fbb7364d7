"""The audit log: one JSON line per write, per denial, per stream start and end, and per policy
or certificate reload.

A line holds ``time`` (RFC 3339, UTC, milliseconds), ``region``, ``event`` and those of the
fields identity, serial, peer, method, service, instance, outcome, code, revision, limit,
message that were given. Nothing else can be written: ``record`` takes only those keywords and
only scalar values, and a string holding a PEM block (``-----BEGIN``) is replaced, so a key,
a certificate body or instance metadata cannot reach the file by accident.

Target: ``""`` (off), ``"-"`` (standard output) or a file, opened for append and created
readable by its owner only. ``reopen`` (on SIGHUP) starts a new file after log rotation renamed
the old one.

Failure: a failed write or open marks the sink broken and logs an ERROR once per failure streak.
``ensure_writable``, called before a write reaches etcd, then raises AuditUnavailable (naming
the file and the error: the RPC fails with UNAVAILABLE) unless ``fail_open``, in which case the
write goes ahead unaudited. ``record`` itself never raises for I/O: the write it describes has
already happened. Writes are small line writes flushed at once, cheap enough for the event loop.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import json
import logging
import os
import sys
import threading
import time
from typing import TextIO

from discovery.security.identity import Caller

log = logging.getLogger(__name__)

STDOUT = "-"
RETRY_SECONDS = 1.0  # how often a broken sink is tried again while writes ask for it
MAX_VALUE_LEN = 1024
REDACTED = "[redacted: PEM]"
# The events the server writes; others are allowed (any lowercase word) for later issues.
EVENTS = frozenset(
    {
        "write",
        "denied",
        "stream_start",
        "stream_end",
        "policy_reloaded",
        "policy_rejected",
        "certificate_reloaded",
        "certificate_rejected",
        "audit_resumed",
    }
)
_Scalar = str | int | float | bool | None


class AuditUnavailable(Exception):
    """The audit sink cannot be written and audit_fail_open is off; the message names it."""


class AuditLog:
    def __init__(self, target: str, *, region: str, fail_open: bool = False) -> None:
        self.target = target
        self.region = region
        self.fail_open = fail_open
        self._file: TextIO | None = None
        self._error = ""  # non-empty while the sink is broken: why
        self._lost = 0  # lines not written in the current failure streak
        self._streak = False  # in a failure streak: logged once, until a line is written again
        self._retry_at = 0.0
        self._closed = False
        self._lock = threading.Lock()  # the lead may record from worker threads too
        if target and target != STDOUT:
            with self._lock:
                self._open()

    @property
    def enabled(self) -> bool:
        return bool(self.target)

    @property
    def problem(self) -> str:
        """Why the sink is broken; empty while it works."""
        return self._error

    def ensure_writable(self) -> None:
        """Raise AuditUnavailable if the sink is broken (tried again at most once a second),
        unless fail_open. Call before a write reaches etcd."""
        if not self.target or not self._error:
            return
        with self._lock:
            if self._error and time.monotonic() >= self._retry_at:
                self._retry()
            error = self._error
        if error and not self.fail_open:
            raise AuditUnavailable(
                f"the audit log cannot be written ({error}); writes are refused until it can "
                "(fix the file or its disk, or set audit_fail_open)"
            )

    def record(
        self,
        event: str,
        *,
        caller: Caller | None = None,
        identity: str | None = None,
        serial: str | None = None,
        peer: str | None = None,
        method: str | None = None,
        service: str | None = None,
        instance: str | None = None,
        outcome: str | None = None,
        code: str | enum.Enum | None = None,
        revision: int | None = None,
        limit: str | None = None,
        message: str | None = None,
    ) -> None:
        """Write one line. Fields left None are left out. ``caller`` fills identity, serial and
        peer (an explicit one wins); ``code`` may be a grpc.StatusCode."""
        if not self.target or self._closed:
            return
        if caller is not None:
            identity = caller.identity if identity is None else identity
            serial = (caller.serial or None) if serial is None else serial
            peer = caller.peer if peer is None else peer
        if not event.isidentifier() or not event.islower():
            raise ValueError(f"audit event {event!r} must be a lowercase word like 'write'")
        line = self._line(
            event,
            identity=identity,
            serial=serial,
            peer=peer,
            method=method,
            service=service,
            instance=instance,
            outcome=outcome,
            code=code.name if isinstance(code, enum.Enum) else code,
            revision=revision,
            limit=limit,
            message=message,
        )
        with self._lock:
            if self._error:
                self._lost += 1
                return
            self._write(line)

    def reopen(self) -> None:
        """Close and open the file again (after log rotation); a no-op for stdout or off."""
        if not self.target or self.target == STDOUT or self._closed:
            return
        with self._lock:
            self._close_file()
            self._error = ""
            self._open()
            if self._streak and not self._error:
                self._resumed()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._close_file()

    # --- inside the lock ----------------------------------------------------------------

    def _line(self, event: str, **fields: _Scalar) -> str:
        doc: dict[str, _Scalar] = {"time": _now(), "region": self.region, "event": event}
        for key, value in fields.items():
            if value is None:
                continue
            if isinstance(value, str):
                doc[key] = REDACTED if "-----BEGIN" in value else value[:MAX_VALUE_LEN]
            elif isinstance(value, int | float | bool):
                doc[key] = value
            else:
                raise TypeError(f"audit field {key!r} must be a string or a number, not {type(value).__name__}")
        return json.dumps(doc, separators=(",", ":")) + "\n"

    def _open(self) -> None:
        try:
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
        except OSError as e:
            self._broken(e)

    def _write(self, line: str) -> bool:
        sink = sys.stdout if self.target == STDOUT else self._file
        if sink is None:
            self._lost += 1
            return False
        try:
            sink.write(line)
            sink.flush()
        except (OSError, ValueError) as e:  # ValueError: stdout closed under us
            self._lost += 1
            self._broken(e)
            return False
        return True

    def _broken(self, error: Exception) -> None:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        where = "standard output" if self.target == STDOUT else self.target
        self._error = f"{where}: {reason}"
        self._retry_at = time.monotonic() + RETRY_SECONDS
        if self.target != STDOUT:
            self._close_file()
        if not self._streak:
            self._streak = True
            consequence = (
                "writes continue UNAUDITED (audit_fail_open)" if self.fail_open else "writes are refused until it works"
            )
            log.error("audit log cannot be written (%s): %s", self._error, consequence)

    def _retry(self) -> None:
        self._error = ""
        if self.target != STDOUT and self._file is None:
            self._open()
        if not self._error:
            self._resumed()

    def _resumed(self) -> None:
        # Writing this line is the test that the sink works again: an open that succeeds on a
        # full disk would otherwise let writes through that cannot be audited.
        lost = self._lost
        line = self._line("audit_resumed", message=f"the audit log is writable again; {lost} lines were lost")
        if self._write(line):
            self._lost, self._streak = 0, False
            log.warning("audit log %s is writable again; %d lines were lost", self.target, lost)
        else:
            self._lost -= 1  # the probe line itself was never an audit record

    def _close_file(self) -> None:
        if self._file is not None:
            # the buffer was flushed line by line: nothing is left that a failed close could save
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
