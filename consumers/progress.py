"""Progress: whether the runner finishes records while it has work, and what holds it when not.

The runner tells it when a record finishes and, on every turn of its loop, whether work is pending
(records taken and not finished, records fetched and held for their screen's read, paused partitions
with lag, or outcomes staged for a transaction; while transactions fail, a record that stages its
outcomes does not count as finished, and a transaction that commits staged outcomes does). Work
pending and no record finished for ``stall_s`` is a stall: ``/readyz`` answers 503 naming what holds
the work (the first of the ``causes`` that answers), and after ``restart_s`` ``/healthz`` fails too,
so the platform restarts the process. The causes are questions other parts answer (the processor:
an outage, a breaker, a degraded endpoint; the runner: paused, retrying, screening), asked only when
someone wants to know.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic

log = logging.getLogger(__name__)

Cause = Callable[[], str | None]


class Progress:
    """See the module docstring. ``restart_s`` 0: ``/healthz`` never fails for a stall."""

    def __init__(self, stall_s: float = 120.0, restart_s: float = 600.0,
                 clock: Callable[[], float] = monotonic) -> None:
        self.stall_s = stall_s
        self.restart_s = restart_s
        self.clock = clock
        self._last_finish = clock()
        self._pending_since: float | None = None
        self.causes: list[Cause] = []  # asked in order; the first that names something holds the work
        self._reported = False

    def finished(self) -> None:
        """A record finished (its outcome durable, or found durable before)."""
        self._last_finish = self.clock()

    def observe(self, pending: bool) -> None:
        """Whether work is pending now; a stall is measured from the later of its start and the
        last finished record."""
        if not pending:
            self._pending_since = None
        elif self._pending_since is None:
            self._pending_since = self.clock()

    def stalled_s(self) -> float:
        """Seconds without a finished record while work is pending; 0 without pending work."""
        if self._pending_since is None:
            return 0.0
        return max(0.0, self.clock() - max(self._pending_since, self._last_finish))

    @property
    def stalled(self) -> bool:
        stalled = self.stalled_s() >= self.stall_s
        if stalled != self._reported:  # one line when a stall begins, one when it ends
            self._reported = stalled
            if stalled:
                log.warning("no record finished for %.0f s with work pending: held by %s",
                            self.stalled_s(), self.holding())
            else:
                log.info("records finish again")
        return stalled

    @property
    def alive(self) -> bool:
        """False once a stall has lasted ``restart_s``: a restart is the way out."""
        return not self.restart_s or self.stalled_s() < self.restart_s

    def holding(self) -> str:
        """What holds the pending work, by the name of its mechanism (never an error text)."""
        for cause in self.causes:
            try:
                named = cause()
            except Exception:  # noqa: BLE001 - a question that fails must not fail /readyz
                log.debug("a stall cause failed to answer", exc_info=True)
                continue
            if named:
                return named
        return "unknown (records in flight finish nothing)"
