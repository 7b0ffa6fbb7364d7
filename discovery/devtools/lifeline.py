"""Processes that never outlive the process that started them, and the stopping of processes
that did (``Pinned``).

``popen`` is ``subprocess.Popen`` whose child the kernel kills (SIGKILL) the moment this
process dies, however it dies: exit, crash, SIGHUP with no handler, SIGKILL. ``discovery dev``
and the test fixtures start etcd and the servers through it, so closing the terminal or
``kill -9`` leaves nothing running.

Why ``PR_SET_PDEATHSIG`` and not a lifeline pipe:

* It works on any program: etcd is a Go binary we cannot teach to watch a pipe. A pipe would
  need a supervisor process between us and etcd, and the pid we report (that the drills
  SIGSTOP and SIGKILL) would no longer be etcd itself. The setting survives ``execve`` (for
  binaries that are not set-uid and have no file capabilities, as here), so etcd and the
  server's Python carry it under their real pid.
* The trap: the kernel sends the signal when the *thread* that forked the child ends, not the
  process (``prctl(2)``: "the 'parent' in this case is considered to be the thread that
  created this process"). ``DevCluster`` starts regions from pool threads that end once the
  cluster is up, which would kill every child then. So every child is forked by one thread
  (``_Spawner``) that waits for requests forever: it ends only when the process ends, which is
  exactly when the children must go.
* The race: if this process dies after the fork but before ``prctl``, the child has already
  been handed to another parent and no signal will come. Right after ``prctl`` the child
  compares ``getppid()`` with the pid that forked it and kills itself if they differ; from
  then on the kernel is bound to signal it.
* SIGKILL, not SIGTERM: a child paused by a drill (SIGSTOP) acts on nothing else, and with the
  process that would have stopped things in order gone, there is no order to keep.
* ``prctl`` runs in a small Python program that then becomes the real one by ``execvp``, same
  pid (``_SHIM``), not in ``preexec_fn``: ``preexec_fn`` makes ``Popen`` use ``fork()``
  instead of ``vfork()``, and ``fork()`` runs the fork handlers of every library in this
  process around it. gRPC's handlers pause its threads for the fork, or log "Other threads are
  currently calling into gRPC, skipping fork() handlers" (seen in the test suite); and Python
  code between fork and exec in a threaded process is what the ``subprocess`` docs warn
  against. ``vfork()`` runs no handlers; the shim costs a bare interpreter start (~20 ms).

Children started otherwise (``asyncio.create_subprocess_exec``...) are not covered. Linux only;
elsewhere ``popen`` is plain ``Popen``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, cast

# argv: PARENT_PID PROGRAM ARGS... Exits 126 when prctl fails, 127 when PROGRAM cannot run.
_SHIM = """\
import ctypes, os, signal, sys
prctl = ctypes.CDLL(None, use_errno=True).prctl
prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
if prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG
    print(f"lifeline: prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
    sys.exit(126)
if os.getppid() != int(sys.argv[1]):
    os.kill(os.getpid(), signal.SIGKILL)  # the parent died before prctl: no signal would come
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    print(f"lifeline: cannot run {sys.argv[2]}: {exc}", file=sys.stderr)
    sys.exit(127)
"""

_Request = tuple["Future[subprocess.Popen[bytes]]", Sequence[str], dict[str, Any]]


class _Spawner:
    """The one thread that forks every child. It must never return (see the module doc), so
    every failure goes back to the caller; it starts at the first request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[_Request] | None = None

    def popen(self, args: Sequence[str], kwargs: dict[str, Any]) -> subprocess.Popen[bytes]:
        done: Future[subprocess.Popen[bytes]] = Future()
        with self._lock:
            if self._requests is None:
                self._requests = queue.SimpleQueue()
                threading.Thread(target=self._forever, args=(self._requests,), name="lifeline", daemon=True).start()
            self._requests.put((done, args, kwargs))
        return done.result()

    @staticmethod
    def _forever(requests: queue.SimpleQueue[_Request]) -> None:
        while True:
            done, args, kwargs = requests.get()
            if not done.set_running_or_notify_cancel():
                continue
            try:
                shim = [sys.executable, "-I", "-S", "-c", _SHIM, str(os.getpid()), *args]
                proc = subprocess.Popen(shim, **kwargs)
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(cast("subprocess.Popen[bytes]", proc))

    def forget(self) -> None:
        # A forked copy of this process has no spawner thread (and maybe a held lock): the
        # next popen there starts afresh.
        self._lock = threading.Lock()
        self._requests = None


_spawner = _Spawner()
os.register_at_fork(after_in_child=_spawner.forget)


def popen(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(args, **kwargs)`` (an argument list, no shell), its child killed by
    the kernel when this process dies. Safe from any thread; the fork happens on the spawner
    thread (see the module doc). The pid is the program's from the start, but until the shim
    has exec'd it (milliseconds), /proc/PID/cmdline shows the shim."""
    if not sys.platform.startswith("linux"):
        return cast("subprocess.Popen[bytes]", subprocess.Popen(args, **kwargs))
    if {"shell", "executable", "preexec_fn"} & kwargs.keys():
        raise TypeError("lifeline.popen takes neither shell, executable nor preexec_fn")
    env = kwargs.get("env")
    if shutil.which(args[0], path=(env if env is not None else os.environ).get("PATH")) is None:
        # As Popen would, here rather than from the shim, which could only exit 127.
        raise FileNotFoundError(2, "No such file or directory", args[0])
    return _spawner.popen(args, kwargs)


# --- processes of someone else --------------------------------------------------------------


class Pinned:
    """A process held by a pidfd: signals reach that process or nothing, never another one
    that reuses its pid after it exits. ``pin`` makes one; ``close`` releases it."""

    def __init__(self, pid: int, fd: int, what: str) -> None:
        self.pid = pid
        self.what = what
        self._fd = fd

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.what})"

    def alive(self) -> bool:
        """False once it has exited (a zombie counts as exited)."""
        return not self.wait(0)

    def send(self, sig: signal.Signals) -> None:
        if self._fd >= 0:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                signal.pidfd_send_signal(self._fd, sig)

    def wait(self, timeout: float) -> bool:
        """Until it exits or ``timeout`` passes; whether it exited."""
        if self._fd < 0:
            return True
        poller = select.poll()  # a pidfd turns readable when its process exits
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def pin(pid: int, what: str, check: Callable[[int], bool]) -> Pinned | None:
    """The process now at ``pid``, if it lives and ``check(pid)`` (which reads ``/proc/PID``)
    says it is the one meant; None otherwise. The pidfd is taken before the check and the
    process is seen alive after it, so what was checked is what is held."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    held = Pinned(pid, fd, what)
    try:
        ok = check(pid)
    except OSError:
        ok = False
    if ok and held.alive():
        return held
    held.close()
    return None


def stop(processes: Sequence[Pinned], term_timeout: float, kill_timeout: float = 5.0) -> list[Pinned]:
    """SIGCONT (a paused process acts on nothing) and SIGTERM to each, up to ``term_timeout``
    for all to exit, then SIGKILL to the rest and up to ``kill_timeout``. Returns those still
    running after that (none, unless the kernel holds one in an uninterruptible wait)."""
    for proc in processes:
        proc.send(signal.SIGCONT)
        proc.send(signal.SIGTERM)
    deadline = time.monotonic() + term_timeout
    for proc in processes:
        proc.wait(deadline - time.monotonic())
    rest = [p for p in processes if p.alive()]
    for proc in rest:
        proc.send(signal.SIGKILL)
    deadline = time.monotonic() + kill_timeout
    for proc in rest:
        proc.wait(deadline - time.monotonic())
    return [p for p in rest if p.alive()]
