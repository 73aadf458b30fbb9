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
from collections.abc import Sequence

from consumers.records import Record
from dedup.ledger import Ledger
from dedup.seen import FINISHED, UNKNOWN, record_digest
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
    MARKS_PER_READ = 512  # records' marks per script (one fetched batch, at the runner's default)

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
        left = await self._marked(records, done)
        finished = sum(done)
        reads: list[tuple[list[int], asyncio.Task[list[bool]]]] = []
        try:
            for lo in range(0, len(left), self.chunk):
                at, tasks = self._keys(records, left[lo:lo + self.chunk])
                if tasks:
                    reads.append((at, asyncio.ensure_future(self.ledger.finished(tasks))))
                    await asyncio.sleep(0)  # the read goes out; this chunk's answer comes while the next decodes
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

    async def _marked(self, records: Sequence[Record], done: list[bool]) -> list[int]:
        """Answer from the records' marks (:mod:`dedup.seen`) what they can, into ``done``; the
        indexes of the records left to key the slow way: those with no mark (all, on a cluster). A
        record with no value or too large is neither: it never claimed, and the handler dead-letters it."""
        seen = self.ledger.seen
        if not seen.enabled:
            return list(range(len(records)))
        at: list[int] = []
        digests: list[str] = []
        for i, record in enumerate(records):
            value = record.value
            if value is not None and len(value) <= self.max_bytes:
                at.append(i)
                digests.append(record_digest(value, record.headers))
        left: list[int] = []
        for lo in range(0, len(at), self.MARKS_PER_READ):
            part = at[lo:lo + self.MARKS_PER_READ]
            # inside a transaction, the record that published the outcome is read again only
            # because that transaction did not commit: it must stage the outcome anew
            coords = [records[i].coordinates for i in part] if self.transactional else None
            flags = await seen.finished(digests[lo:lo + self.MARKS_PER_READ], coords)
            for i, flag in zip(part, flags, strict=True):
                if flag == FINISHED:
                    done[i] = True
                elif flag == UNKNOWN:
                    left.append(i)
        return left

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
