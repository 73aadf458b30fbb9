"""Child processes that are always waited for.

A ``Popen`` that is never waited for leaves a zombie and warns ``subprocess ... is still running``
when it is collected, whichever code runs then. Every way a child of the dev tools, the tests and
the benchmarks ends goes through here: SIGTERM and a grace period, then SIGKILL, and a ``wait``
after each, on every path (an exception in between included). ``group=True`` signals the child's
whole process group (a child started with ``start_new_session=True`` leads one): a service and
the workers it forked end together.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

# A SIGKILLed process is gone as soon as the kernel has freed it; a JVM with a large heap on a
# loaded machine may take seconds. Past this the process is stuck in the kernel and waiting longer
# would not help.
KILL_WAIT_S = 60.0

Proc = subprocess.Popen[Any]


def send(proc: Proc, sig: int, *, group: bool = False) -> None:
    """Signal ``proc`` (its process group with ``group``) unless it has been reaped already."""
    if proc.returncode is not None:
        return  # reaped: its pid (and group id) may belong to another process by now
    with contextlib.suppress(ProcessLookupError, PermissionError):  # exited meanwhile (a zombie)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def stop(proc: Proc, *, grace_s: float = 10.0, group: bool = False) -> int:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL and wait: the exit code. Reaped on return; a
    process still there :data:`KILL_WAIT_S` after SIGKILL raises ``TimeoutExpired``."""
    if proc.poll() is None and grace_s > 0:
        send(proc, signal.SIGTERM, group=group)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    return kill(proc, group=group)


def kill(proc: Proc, *, group: bool = False) -> int:
    """SIGKILL (if it still runs) and wait: the exit code."""
    if proc.poll() is None:
        send(proc, signal.SIGKILL, group=group)
    return proc.wait(KILL_WAIT_S)


def stop_all(procs: Iterable[Proc], *, grace_s: float = 10.0, group: bool = False) -> None:
    """:func:`stop` every process, all within one grace period (SIGTERM to all first, so their
    drains overlap). Every one is killed and reaped even when another fails to; the first error
    is raised after."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None and grace_s > 0:
            send(proc, signal.SIGTERM, group=group)
    deadline = time.monotonic() + grace_s
    first: BaseException | None = None
    for proc in procs:
        try:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            kill(proc, group=group)
        except BaseException as exc:  # noqa: BLE001 - the others are still reaped; raised below
            first = first or exc
    if first is not None:
        raise first


class Children:
    """The child processes of one owner (a test, a benchmark): :meth:`close` (or leaving the
    ``with`` block) stops and reaps every one still tracked, however the owner ended."""

    def __init__(self, *, grace_s: float = 10.0, group: bool = True) -> None:
        self.grace_s = grace_s
        self.group = group
        self._procs: list[Proc] = []

    def popen(self, argv: list[str], **kwargs: Any) -> Proc:
        """``subprocess.Popen(argv, **kwargs)``, tracked; in a session of its own with ``group``."""
        if self.group:
            kwargs.setdefault("start_new_session", True)
        return self.add(subprocess.Popen(argv, **kwargs))

    def add(self, proc: Proc) -> Proc:
        self._procs.append(proc)
        return proc

    def kill(self, proc: Proc) -> int:
        """SIGKILL one child and reap it."""
        try:
            return kill(proc, group=self.group)
        finally:
            self._forget(proc)

    def stop(self, proc: Proc, grace_s: float | None = None) -> int:
        """SIGTERM one child, SIGKILL it after the grace, reap it."""
        try:
            return stop(proc, grace_s=self.grace_s if grace_s is None else grace_s, group=self.group)
        finally:
            self._forget(proc)

    def stop_all(self, procs: Iterable[Proc], grace_s: float | None = None) -> None:
        """:func:`stop_all` of some of the children (their grace periods overlap)."""
        procs = list(procs)
        try:
            stop_all(procs, grace_s=self.grace_s if grace_s is None else grace_s, group=self.group)
        finally:
            for proc in procs:
                self._forget(proc)

    def _forget(self, proc: Proc) -> None:
        if proc.returncode is not None:
            with contextlib.suppress(ValueError):
                self._procs.remove(proc)

    @property
    def running(self) -> list[Proc]:
        return [p for p in self._procs if p.poll() is None]

    def close(self, grace_s: float | None = None) -> None:
        """Stop every tracked child at once and reap each (also those that exited on their own)."""
        procs, self._procs = self._procs, []
        try:
            stop_all(procs, grace_s=self.grace_s if grace_s is None else grace_s, group=self.group)
        finally:
            self._procs.extend(p for p in procs if p.returncode is None)  # only if a kill failed

    def __enter__(self) -> Children:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[Proc]:
        return iter(list(self._procs))
