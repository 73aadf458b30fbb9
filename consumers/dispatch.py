"""Dispatch: each taken record runs through the handler in key order, retried until it is durable.

Records with the same key run one after another in offset order; different keys run
concurrently, inside one partition too. The head of each key's queue runs; the rest wait.

The handler owns each record's outcome (result or dead letter) and returns when it is durable.
If it raises, the record is retried after a capped, jittered backoff, without limit: an outage of
Redis or the broker never loses a record and never commits past it. A retrying record holds up
only its own key (later records of that key wait behind it) and its partition's commit mark;
other keys and partitions go on.

A record belongs to the partition state it was dispatched into: once that partition is revoked
(and maybe assigned again, which makes a new state) the record is neither retried nor finished,
and the records queued behind it are dropped: the new owner reads them again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from time import monotonic

from consumers.backpressure import Backpressure
from consumers.partitions import TP, Handler, Partitions, PartitionState, RunnerConfig, RunnerMetrics
from consumers.progress import Progress
from consumers.records import Record
from consumers.transactions import Staged, staging

log = logging.getLogger(__name__)

Key = tuple[TP, bytes | int]  # a record's partition and key (its offset when it has no key)


class Dispatcher:
    """Starts, queues, retries and finishes records.

    Owns the queue of dispatched records per key (its head is running), the running tasks and
    how many records are between failed attempts. Finishes offsets in the partitions' trackers,
    counts records in and out of the backpressure's window, tells ``progress`` of every finished
    record and ``note_error`` of every failed attempt. With ``stage`` on, the handler's outcomes
    are staged (see :mod:`consumers.transactions`) into the record's partition state; while
    ``failing`` says the last transaction failed, a record that staged its outcomes is no progress.
    """

    def __init__(self, handler: Handler, config: RunnerConfig, partitions: Partitions,
                 backpressure: Backpressure, progress: Progress, metrics: RunnerMetrics,
                 note_error: Callable[[str], None], stage: bool = False,
                 failing: Callable[[], bool] = lambda: False) -> None:
        self._handler = handler
        self._config = config
        self._partitions = partitions
        self._window = backpressure
        self._progress = progress
        self._metrics = metrics
        self._note_error = note_error
        self._stage = stage
        self._failing = failing
        self._keys: dict[Key, deque[tuple[Record, PartitionState]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._retrying = 0

    @property
    def retrying(self) -> int:
        """How many records are between failed attempts of their handler right now."""
        return self._retrying

    def dispatch(self, records: list[Record], done: Sequence[bool] | None = None,
                 owners: Mapping[TP, PartitionState] | None = None) -> None:
        """Start or queue each record, or finish it at once when the screen found it done.

        ``owners``: the partitions' states when the records were fetched; a record whose partition
        was revoked (or revoked and assigned again) since is dropped: the new owner reads it again."""
        consumed = screened = 0
        for i, record in enumerate(records):
            tp = (record.topic, record.partition)
            part = self._partitions.get(tp)
            if part is None or (owners is not None and owners.get(tp) is not part):
                continue  # a record fetched before its partition was revoked
            consumed += 1
            finished = done is not None and done[i]
            try:
                if finished:  # its outcome is durable: nothing to wait for, whatever runs before it on its key
                    part.tracker.add_finished(record.offset)
                    screened += 1
                    continue
                part.tracker.add(record.offset)
            except ValueError:  # already held: a re-fetch after a position reset
                log.warning("record %s is already in flight; not started twice", record.coordinates)
                continue
            self._enqueue((tp, record.key if record.key is not None else record.offset), record, part)
        if screened:
            self._progress.finished()
            self._metrics.finished(screened)
        if consumed:
            self._metrics.consumed(consumed)
            self._metrics.inflight(self._window.held)

    def _enqueue(self, key: Key, record: Record, part: PartitionState) -> None:
        """Take ``record`` into the window and start it, or queue it behind its key's head."""
        part.held += 1
        self._window.take()
        queue = self._keys.get(key)
        if queue is not None:
            queue.append((record, part))
        else:
            self._keys[key] = deque([(record, part)])
            self._start(key, record, part)

    def drop_revoked(self) -> None:
        """Release the queued records of partitions no longer assigned; they never start.

        The head of each queue is running (or retrying: it stops at its next attempt)."""
        for k in [k for k in self._keys if k[0] not in self._partitions]:
            queue = self._keys[k]
            while len(queue) > 1:
                _record, owner = queue.pop()
                owner.held -= 1
                self._window.release(1)

    async def cancel(self) -> None:
        """Cancel every running record and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, key: Key, record: Record, part: PartitionState) -> None:
        task = asyncio.create_task(self._process(key, record, part))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(self, key: Key, record: Record, part: PartitionState) -> None:
        """Run the handler until it succeeds or the partition this record came from is gone.

        ``part`` is the partition state the record was dispatched into. After a revoke (and maybe
        a re-assign of the same partition, which makes a new state) the record is not retried or
        finished: the new owner, or the new assignment, reads it again.
        """
        tp = key[0]
        delay = self._config.retry_base_s
        retrying = False
        started = monotonic()
        try:
            while self._partitions.owns(tp, part):
                staged: list[Staged] = []
                try:
                    await self._attempt(record, staged)
                    failure: BaseException | None = None
                except asyncio.CancelledError as exc:
                    if _stopping():
                        raise
                    failure = exc  # a future it awaited was cancelled by another party: a failed attempt
                except Exception as exc:  # noqa: BLE001 - the handler could not make the outcome durable
                    failure = exc
                if failure is not None:
                    self._note_error(f"{type(failure).__name__}: {failure}")
                    if not retrying:
                        retrying = True
                        self._retrying += 1
                    wait = delay * random.uniform(0.5, 1.0)
                    log.warning("record %s not finished, retrying in %.1fs: %s", record.coordinates, wait, failure)
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, self._config.retry_max_s)
                    continue
                if self._partitions.owns(tp, part):
                    self._finished(record, part, staged, None if retrying else monotonic() - started)
                if retrying:
                    log.info("record %s finished after retries", record.coordinates)
                break
        finally:
            if retrying:
                self._retrying -= 1
        self._release(key, part)

    async def _attempt(self, record: Record, staged: list[Staged]) -> None:
        """One handler call; with staging on, its outcomes land in ``staged``."""
        if not self._stage:
            await self._handler(record)
            return
        with staging(staged):
            await self._handler(record)

    def _finished(self, record: Record, part: PartitionState, staged: list[Staged], took: float | None) -> None:
        """The record's outcome is durable: finish its offset (keeping what it staged).

        ``took``: how long it took, when it succeeded at its first attempt (the window learns)."""
        if staged:  # durable with its transaction; while transactions fail, no progress
            part.staged[record.offset] = staged
        if not (staged and self._failing()):
            self._progress.finished()
        part.tracker.finish(record.offset)
        self._metrics.finished(1)
        if took is not None:
            self._window.took(took)

    def _release(self, key: Key, part: PartitionState) -> None:
        """Release one dispatched record (exactly once) and start the next of its key."""
        queue = self._keys.get(key)
        if queue is not None:
            queue.popleft()
            if queue:
                nxt, owner = queue[0]
                self._start(key, nxt, owner)
            else:
                del self._keys[key]
        part.held -= 1
        self._window.release(1)


def _stopping() -> bool:
    """Whether the running task itself was asked to stop (a cancel not yet uncancelled), as opposed
    to a CancelledError raised by a future it awaited that another party cancelled."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
