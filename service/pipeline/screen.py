"""The replay screen: a fetched batch whose tasks are finished is finished with a few ledger reads.

A record whose task is done (succeeded or dead, same fingerprint) and whose outcome was published
needs nothing: the handler would claim it, find it done and skip it. Replaying a processed topic
is a stream of such records, and taking each through the handler (a task, a future, a claim
script, a log line) costs about as much as the claim of new work. The screen asks the ledger about
the batch's tasks in a few reads and names the records the runner may finish at once.

Most records need no decoding: the claim that first decoded a record kept a mark of which task
its bytes name (:mod:`dedup.seen`), and one script per batch answers each marked record from its
mark and its task's hash. Only records with no mark (never claimed, or on a Redis Cluster, where
there are no marks) are decoded here, with the handler's own decoder, and asked about in
:meth:`~dedup.ledger.Ledger.finished`'s reads.

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
from collections.abc import Awaitable, Iterator, Sequence
from typing import TypeVar

from consumers.records import Record
from dedup.ledger import Ledger
from dedup.seen import FINISHED, UNKNOWN, record_digest
from service.agents.tasks import decode_task, screen_key
from service.core.errors import PoisonError
from service.core.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    # records' marks per script: a whole fetched batch at the runner's default. The script's cost is
    # the ledger's reads, so smaller reads under way while the next are made only add calls
    MARKS_PER_READ = 512

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
        done = [False] * len(records)
        left: Sequence[int] = range(len(records))
        if self.ledger.seen.enabled:
            left = []
            for i, flag in await self._chunked(self._marks(records)):
                if flag == FINISHED:
                    done[i] = True
                elif flag == UNKNOWN:  # no mark: keyed the slow way below
                    left.append(i)
        for i, finished_before in await self._chunked(self._keyed(records, left)):
            done[i] = finished_before
        finished = sum(done)
        if finished:
            self.share.note(finished, finished)
            self.metrics.task_outcome["duplicate"].inc(finished)
            self.metrics.screened.inc(finished)
        log.debug("screened %d records: %d finished before", len(records), finished)
        return done

    @staticmethod
    async def _chunked(chunks: Iterator[tuple[list[int], Awaitable[list[T]]]]) -> list[tuple[int, T]]:
        """Each chunk's read sent as soon as it is made, and answered while the next chunk is made
        (``chunks`` makes each on demand); the answers by record index."""
        reads: list[tuple[list[int], asyncio.Future[list[T]]]] = []
        try:
            for at, read in chunks:
                reads.append((at, asyncio.ensure_future(read)))
                await asyncio.sleep(0)  # the read goes out before the next chunk is made
            return [answer for at, read in reads for answer in zip(at, await read, strict=True)]
        finally:  # a read left behind (another failed, or the runner gave up) is not left running
            for _at, read in reads:
                if not read.done():
                    read.cancel()
                elif not read.cancelled():
                    read.exception()  # seen: not logged as never retrieved

    def _marks(self, records: Sequence[Record]) -> Iterator[tuple[list[int], Awaitable[list[int]]]]:
        """Per chunk, the records' indexes and the read of their marks (:mod:`dedup.seen`). A record
        with no value or too large has none to read: it never claimed, the handler dead-letters it."""
        at: list[int] = []
        digests: list[str] = []
        for i, record in enumerate(records):
            value = record.value
            if value is not None and len(value) <= self.max_bytes:
                at.append(i)
                digests.append(record_digest(value, record.headers))
            if len(at) == self.MARKS_PER_READ or (i == len(records) - 1 and at):
                # inside a transaction, the record that published the outcome is read again only
                # because that transaction did not commit: it must stage the outcome anew
                coords = [records[j].coordinates for j in at] if self.transactional else None
                yield at, self.ledger.seen.finished(digests, coords)
                at, digests = [], []

    def _keyed(self, records: Sequence[Record], indexes: Sequence[int]) -> Iterator[tuple[list[int], Awaitable[list[bool]]]]:
        """Per chunk of ``indexes``, those of records that decode and the read of whether their tasks finished."""
        for lo in range(0, len(indexes), self.chunk):
            at, tasks = self._keys(records, indexes[lo:lo + self.chunk])
            if tasks:
                yield at, self.ledger.finished(tasks)

    def _keys(self, records: Sequence[Record], indexes: Sequence[int]) -> tuple[list[int], list[tuple[str, str, str]]]:
        """Which of ``records[i]`` (``i`` in ``indexes``) decode, and the ledger's question about each: a
        plain record's key and fingerprint straight from its bytes, any other's from its decoded task,
        which then rides on the record (``Record.memo``) so that the handler does not decode it again."""
        at: list[int] = []
        tasks: list[tuple[str, str, str]] = []
        for i in indexes:
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
            tasks.append((found[0], found[1], record.coordinates if self.transactional else ""))
        return at, tasks
