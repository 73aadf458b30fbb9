"""Lease renewal for every task a worker holds, from one loop.

A held task renews its lease every ``interval_s`` (a third of the lease). One task per worker
does the renewing for all of them, and the renewals that fall due together go to Redis in one
pipeline (:mod:`dedup.batch`): holding a task costs a dictionary entry, not a timer task of its own.
The loop ends when nothing is held and starts again with the next hold.

A renewal refused by the ledger (a newer fence holds the task) stops renewing that task; its
fenced writes are refused anyway. A renewal that finds the task ended under its own fence (a
renewal sent as the holder completed, failed or parked it) stops too, and is no lost lease: it is
logged at DEBUG only, as is any outcome that arrives after the task was released. A renewal that fails because Redis does not answer is tried
again at the next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from time import monotonic

from dedup.ledger import Ledger, LedgerUnavailable

log = logging.getLogger(__name__)

MAX_SLEEP_S = 1.0


@dataclass(slots=True)
class _Lease:
    task_key: str
    fence: int
    interval_s: float
    due: float
    lost: bool = False


class LeaseKeeper:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._held: dict[int, _Lease] = {}
        self._next_id = 0
        self._loop_task: asyncio.Task[None] | None = None
        self.renewals = 0

    def __len__(self) -> int:
        return len(self._held)

    @contextlib.contextmanager
    def hold(self, task_key: str, fence: int, interval_s: float) -> Iterator[None]:
        """Renew ``task_key``'s lease under ``fence`` every ``interval_s`` while the body runs."""
        self._next_id += 1
        lease_id = self._next_id
        self._held[lease_id] = _Lease(task_key, fence, interval_s, monotonic() + interval_s)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="lease-keeper")
        try:
            yield
        finally:
            del self._held[lease_id]

    async def _run(self) -> None:
        while self._held:
            now = monotonic()
            due = [lease for lease in self._held.values() if lease.due <= now and not lease.lost]
            if due:
                await self._renew(due)
            waiting = [lease.due for lease in self._held.values() if not lease.lost]
            sleep_s = min(waiting, default=now + MAX_SLEEP_S) - monotonic()
            await asyncio.sleep(min(max(sleep_s, 0.005), MAX_SLEEP_S))

    async def _renew(self, due: list[_Lease]) -> None:
        outcomes = await asyncio.gather(
            *(self._ledger.renew(lease.task_key, lease.fence) for lease in due), return_exceptions=True
        )
        now = monotonic()
        held = {id(lease) for lease in self._held.values()}
        for lease, outcome in zip(due, outcomes, strict=True):
            lease.due = now + lease.interval_s
            if outcome == "renewed":
                self.renewals += 1
            elif outcome == "done" or (outcome == "lost" and id(lease) not in held):
                lease.lost = True  # ended by its holder (or released meanwhile): nothing to renew
                log.debug("task_id=%s: lease no longer needed (fence %d, %s)", lease.task_key, lease.fence, outcome)
            elif outcome == "lost":
                lease.lost = True
                log.warning("task_id=%s: lease lost (fence %d)", lease.task_key, lease.fence)
            elif isinstance(outcome, LedgerUnavailable):
                log.warning("task_id=%s: lease renewal failed: %s", lease.task_key, outcome)
                lease.due = now + min(lease.interval_s, MAX_SLEEP_S)
            elif isinstance(outcome, BaseException):
                log.error("task_id=%s: lease renewal raised %r", lease.task_key, outcome)
