"""The replay screen: a fetched batch whose tasks are finished is finished with one ledger read.

A record whose task is done (succeeded or dead, same fingerprint) and whose outcome was published
needs nothing: the handler would claim it, find it done and skip it. Replaying a processed topic
is a stream of such records, and taking each through the handler (a task, a future, a claim
script, a log line) costs about as much as the claim of new work. The screen decodes the batch
with the handler's own decoder, asks the ledger about all of its tasks in one read
(:meth:`~dedup.ledger.Ledger.finished`), and names the records the runner may finish at once.

It only ever names records the handler would skip: anything else (a record that does not decode,
a task not done, done but not published, published by this very record inside a transaction that
may not have committed: its ``published_by`` are the record's own coordinates) runs through the
handler. The decoded task rides along on the record
(``Record.memo``), so the handler does not decode it again.

It screens only while replays are happening: while at least a quarter of recent claims found
their task done before (:class:`DuplicateShare`). New work then pays nothing for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from consumers.records import Record
from dedup.ledger import Ledger
from service.agents.tasks import decode_task
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
                 transactional: bool) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.share = share
        self.max_bytes = max_bytes
        self.transactional = transactional

    def wanted(self) -> bool:
        return self.share.seen >= self.MIN_SEEN and self.share.share() >= self.THRESHOLD

    async def __call__(self, records: Sequence[Record]) -> Sequence[bool]:
        at: list[int] = []
        tasks: list[tuple[str, str, str]] = []
        for i, record in enumerate(records):
            try:
                task = decode_task(record.value, record.headers, self.max_bytes)
            except PoisonError:
                continue  # the handler dead-letters it, with its reason
            record.memo = task
            at.append(i)
            # inside a transaction, the record that published the outcome is read again only
            # because that transaction did not commit: it must stage the outcome anew
            tasks.append((task.key, task.fingerprint, record.coordinates if self.transactional else ""))
        done = [False] * len(records)
        if not tasks:
            return done
        finished = 0
        for i, flag in zip(at, await self.ledger.finished(tasks), strict=True):
            if flag:
                done[i] = True
                finished += 1
        if finished:
            self.share.note(finished, finished)
            self.metrics.task_outcome["duplicate"].inc(finished)
            self.metrics.screened.inc(finished)
        log.debug("screened %d records: %d finished before", len(records), finished)
        return done
