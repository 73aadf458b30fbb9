"""Per-partition offset tracking: commit only what every earlier record has finished.

Records of one partition may finish in any order (different keys run concurrently). The offset
to commit is the first one still unfinished, or one past the last record seen when all are done.

A commit is two steps: :meth:`OffsetTracker.take_commit` gives the offset to send, and
:meth:`OffsetTracker.committed` confirms it once the broker accepted it. A commit that failed is
not confirmed, so the next ``take_commit`` offers the offset again.
"""

from __future__ import annotations

from collections import deque


class OffsetTracker:
    """Offsets must be added in increasing order; they may finish in any order."""

    __slots__ = ("_pending", "_finished", "_low", "_committed")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._finished: set[int] = set()
        self._low: int | None = None  # next offset to commit when nothing is pending
        self._committed: int | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, offset: int) -> None:
        if self._pending and offset <= self._pending[-1]:
            raise ValueError(f"offset {offset} added out of order (last {self._pending[-1]})")
        if not self._pending and self._low is not None and offset < self._low:
            raise ValueError(f"offset {offset} is below the finished mark {self._low}")
        self._pending.append(offset)

    def add_finished(self, offset: int) -> None:
        """:meth:`add` and :meth:`finish` at once, for a record done as it arrives (a screened replay):
        with nothing pending it only moves the mark, without a round through the queue."""
        if self._pending:
            self.add(offset)
            self.finish(offset)
            return
        if self._low is not None and offset < self._low:
            raise ValueError(f"offset {offset} is below the finished mark {self._low}")
        self._low = offset + 1

    def finish(self, offset: int) -> None:
        self._finished.add(offset)
        pending, finished = self._pending, self._finished
        while pending and pending[0] in finished:
            done = pending.popleft()
            finished.discard(done)
            self._low = done + 1

    def committable(self) -> int | None:
        """The offset to commit (Kafka's "next record to read"), or None if nothing finished."""
        if self._pending:
            return self._pending[0]
        return self._low

    @property
    def last_committed(self) -> int | None:
        """The last offset confirmed with :meth:`committed`."""
        return self._committed

    def take_commit(self) -> int | None:
        """The committable offset if it differs from the last confirmed commit, else None.

        It does not mark anything: call :meth:`committed` once the commit succeeded.
        """
        offset = self.committable()
        if offset is None or offset == self._committed:
            return None
        return offset

    def committed(self, offset: int) -> None:
        """Confirm that ``offset`` (from :meth:`take_commit`) is durable on the broker."""
        if self._committed is None or offset > self._committed:
            self._committed = offset
