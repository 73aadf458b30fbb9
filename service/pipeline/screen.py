"""The replay screen: a fetched batch whose tasks are finished is finished with a few ledger reads.

A record whose task is done (succeeded or dead, same fingerprint) and whose outcome was published
needs nothing: the handler would claim it, find it done and skip it. Replaying a processed topic
is a stream of such records, and taking each through the handler (a task, a future, a claim
script, a log line) costs about as much as the claim of new work. The screen decodes the batch
with the handler's own decoder, asks the ledger about its tasks in a few reads
(:meth:`~dedup.ledger.Ledger.finished`), and names the records the runner may finish at once.

A plain record (see :func:`~service.agents.tasks.screen_key`) is keyed straight from its bytes,
without building its task; the batch is asked about in chunks, each chunk's read under way while
the next one is keyed.

It only ever names records the handler would skip: anything else (a record that does not decode,
a task not done, done but not published, published by this very record inside a transaction that
may not have committed: its ``published_by`` are the record's own coordinates) runs through the
handler. A task the screen decoded in full rides along on the record (``Record.memo``), so the
handler does not decode it again.

It screens only while replays are happening: while at least a quarter of recent claims found
their task done before (:class:`DuplicateShare`), and from a start until the first claims tell
(a replay after a restart is screened from its first batch; new work pays for one or two
screened batches, then nothing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from consumers.records import Record
from dedup.ledger import Ledger
from service.agents.tasks import decode_task, screen_key
from service.core.errors import PoisonError
from service.core.metrics import Metrics

log = logging.getLogger(__name__)


class DuplicateShare:
    """How many recent claims found their task finished before: counts that halve every ``span``
    claims, so the share follows what the topic holds now."""

    __slots__ = ("seen", "duplicates", "span")

    def __init__(self, span: int = 512) -> None:
        self.seen = 0.0
        self.duplicates = 0.0
        self.span = span

    def note(self, duplicates: int, of: int) -> None:
        self.seen += of
        self.duplicates += duplicates
        if self.seen >= self.span:
            self.seen /= 2
            self.duplicates /= 2

    def share(self) -> float:
        return self.duplicates / self.seen if self.seen else 0.0


class ReplayScreen:
    """The runner's :class:`~consumers.partitions.Screen` for the task pipeline."""

    MIN_SEEN = 16  # claims to see before the share means anything
    THRESHOLD = 0.25

    def __init__(self, ledger: Ledger, metrics: Metrics, share: DuplicateShare, *, max_bytes: int,
                 transactional: bool, chunk: int = 64) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.share = share
        self.max_bytes = max_bytes
        self.transactional = transactional
        self.chunk = chunk  # records per ledger read: the next chunk is decoded while Redis reads one

    def wanted(self) -> bool:
        """While the share is unknown (a start: fewer than ``MIN_SEEN`` claims seen), and while at
        least ``THRESHOLD`` of recent claims found their task done."""
        return self.share.seen < self.MIN_SEEN or self.share.share() >= self.THRESHOLD

    async def __call__(self, records: Sequence[Record]) -> Sequence[bool]:
        reads: list[tuple[list[int], asyncio.Task[list[bool]]]] = []
        try:
            for lo in range(0, len(records), self.chunk):
                at, tasks = self._keys(records, lo, min(lo + self.chunk, len(records)))
                if tasks:
                    reads.append((at, asyncio.ensure_future(self.ledger.finished(tasks))))
                    await asyncio.sleep(0)  # the read goes out; this chunk's answer comes while the next decodes
            done = [False] * len(records)
            finished = 0
            for at, read in reads:
                for i, flag in zip(at, await read, strict=True):
                    if flag:
                        done[i] = True
                        finished += 1
        finally:  # a read left behind (another failed, or the runner gave up) is not left running
            for _at, read in reads:
                if not read.done():
                    read.cancel()
                elif not read.cancelled():
                    read.exception()  # seen: not logged as never retrieved
        if finished:
            self.share.note(finished, finished)
            self.metrics.task_outcome["duplicate"].inc(finished)
            self.metrics.screened.inc(finished)
        log.debug("screened %d records: %d finished before", len(records), finished)
        return done

    def _keys(self, records: Sequence[Record], lo: int, hi: int) -> tuple[list[int], list[tuple[str, str, str]]]:
        """The indexes of ``records[lo:hi]`` that decode and the ledger's question about each: a plain
        record's key and fingerprint straight from its bytes, any other's from its decoded task,
        which then rides on the record (``Record.memo``) so that the handler does not decode it again."""
        at: list[int] = []
        tasks: list[tuple[str, str, str]] = []
        for i in range(lo, hi):
            record = records[i]
            found = screen_key(record.value, record.headers, self.max_bytes)
            if found is None:
                try:
                    task = decode_task(record.value, record.headers, self.max_bytes)
                except PoisonError:
                    continue  # the handler dead-letters it, with its reason
                record.memo = task
                found = task.key, task.fingerprint
            at.append(i)
            # inside a transaction, the record that published the outcome is read again only
            # because that transaction did not commit: it must stage the outcome anew
            tasks.append((found[0], found[1], record.coordinates if self.transactional else ""))
        return at, tasks
