"""The screens' reads of fetched batches, under way while the runner fetches the next.

A screen (:class:`~consumers.partitions.Screen`) answers a batch with one read of the ledger, and
the runner would sit idle for that read with every batch of a replay. While the batches it hands
over are screened whole (every record finished before: a replay), the runner starts a batch's
screen and goes on: it fetches and reads the next batch, starts that batch's screen (its read
queued behind the first, so that the ledger is never idle between them), and only then waits for
the first batch's answer and hands it over (:meth:`Screening.take`). At most two batches are held;
they are handed over oldest first, so records reach the dispatcher in the order they were fetched.

A held batch takes no room in the window: batches are held only while the batches before were
screened whole, and their records are expected to finish at once too. When one does not (the replay
reached new work), the records of the held batches that did not finish before take their room as
they are handed over: each such switch can run the window over by at most those of the two batches
(each fetched within the room the window had), and the runner screens each batch before the next
again until one is screened whole. Held batches count as work waiting (:attr:`Runner.pending
<consumers.runner.Runner.pending>`, the cause ``screening``): a run loop held up by their reads
(each at most ``screen_timeout_s``, again and again while the ledger is slow) and finishing nothing
is a stall the liveness check sees. A batch dropped (a stop) was never tracked: its offsets are not
committed and the group reads it again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass

from consumers.partitions import TP, PartitionState
from consumers.records import Record


@dataclass(slots=True)
class Screened:
    """A fetched batch, the partitions' states when it was fetched, and its screen's flags (None:
    the handler decides each record)."""

    records: list[Record]
    owners: Mapping[TP, PartitionState]
    done: Sequence[bool] | None


class Screening:
    """The fetched batches whose screens are under way, oldest first, and whether the last batch
    handed over was screened whole."""

    def __init__(self) -> None:
        self._batches: deque[tuple[list[Record], Mapping[TP, PartitionState], asyncio.Future[Sequence[bool] | None]]]
        self._batches = deque()
        self.whole = False  # the last batch taken was screened whole (every record finished before)

    @property
    def held(self) -> int:
        """Records fetched and not handed over yet."""
        return sum(len(records) for records, _owners, _read in self._batches)

    @property
    def batches(self) -> int:
        return len(self._batches)

    def start(self, records: list[Record], owners: Mapping[TP, PartitionState],
              read: Awaitable[Sequence[bool] | None]) -> None:
        """Hold ``records`` while ``read`` (their screen, which never raises) runs."""
        self._batches.append((records, owners, asyncio.ensure_future(read)))

    async def take(self) -> Screened | None:
        """The oldest batch held, with its screen's flags once they came; None when none is held."""
        if not self._batches:
            return None
        records, owners, read = self._batches[0]
        try:
            done = await read
        finally:  # let go even if the wait is cancelled: a batch is handed over at most once
            self._batches.popleft()
            if not read.done():
                read.cancel()
        self.whole = done is not None and all(done)
        return Screened(records, owners, done)

    def drop(self) -> None:
        """Forget the batches held (a stop): never tracked, the group reads them again."""
        for _records, _owners, read in self._batches:
            read.cancel()
        self._batches.clear()
        self.whole = False
