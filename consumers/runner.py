"""The consumer-group runner: key-ordered concurrency, backpressure and safe offset commits.

- Every call on the confluent-kafka consumer goes through one single-thread executor, so calls
  never overlap; rebalance callbacks run on that thread and hop to the event loop for state.
- Records with the same key run one after another in offset order; different keys run
  concurrently, inside one partition too.
- A partition commits only the first offset whose record is not finished (:class:`OffsetTracker`):
  the outcome of every earlier record is durable before its offset is.
- When the in-flight window is full the runner stops taking records and waits for room; librdkafka
  keeps what it prefetched (bounded by ``queued.max.messages.kbytes``). If the window stays full
  for ``pause_after_s``, or for twice the time records recently took when that is longer (slow
  model calls keep a healthy window full that long), it pauses its partitions and keeps polling (so it stays in the group and
  serves rebalances), and resumes them below the low-water mark. Pausing at once on every fill
  would throw the prefetched records away: librdkafka purges a paused partition's queue and
  fetches it again only after the resume, a gap of 0.5-1 s each time.
- A partition over its own limit is paused at once while others still have room (its records
  would otherwise keep arriving).
- An optional :class:`~consumers.partitions.Screen` looks at each fetched batch first and names
  the records whose outcome is durable already (a replay): those finish at once, without a
  handler call (a task, a future, a ledger script) each. While batches are screened whole, a
  batch's screen runs while the next is fetched (:mod:`consumers.screening`); batches are handed
  over in the order fetched.
- On revoke it stops starting that partition's records and commits what finished; records still
  running finish under their ledger fences, and the new owner takes what is left.
- ``stop()`` drains: no new records, in-flight ones finish (bounded by ``drain_timeout_s``), final
  commit, leave the group.

The handler owns each record's outcome (result or dead letter) and returns when it is durable.
If it raises, the record is retried after a capped, jittered backoff, without limit: an outage of
Redis or the broker never loses a record and never commits past it. A retrying record holds up
only its own key (later records of that key wait behind it) and its partition's commit mark;
other keys and partitions go on.

An optional ``gate`` (e.g. "the LLM endpoint is usable") pauses every assigned partition while it
returns False; the runner keeps polling so it stays in the group, and resumes when it is True.

With a :class:`~consumers.transactions.TransactionalProducer` the handler stages its outcomes
instead of sending them, and every commit writes the staged outcomes of the records below each
partition's commit mark together with those offsets in one transaction (see
:mod:`consumers.transactions`). Outcomes staged by records above the mark wait for a later one.

The runner composes collaborators, each owning its state and handed what it needs:

- :class:`~consumers.thread.ConsumerThread`: the executor, the loop, the consumer.
- :class:`~consumers.partitions.Partitions`: the assigned partitions' states (offsets, staged
  outcomes, held and paused counts, lag), a new state per assignment.
- :class:`~consumers.backpressure.Backpressure`: the in-flight window, pauses and resumes, the gate.
- :class:`~consumers.dispatch.Dispatcher`: key queues, handler tasks, retries.
- :class:`~consumers.commits.Commits`: offset commits, transaction rounds, lag reports.
- :class:`~consumers.screening.Screening`: the fetched batches whose screens are under way (a replay).

The runner itself keeps the poll loop, the screen, the rebalance callbacks and the drain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from time import monotonic
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumers.backpressure import Backpressure
from consumers.commits import Commits
from consumers.dispatch import Dispatcher
from consumers.partitions import TP, Handler, Partitions, PartitionState, RunnerConfig, RunnerMetrics, Screen, fmt
from consumers.progress import Progress
from consumers.records import Record
from consumers.screening import Screening
from consumers.thread import ConsumerThread
from consumers.transactions import Staged, TransactionalProducer

log = logging.getLogger(__name__)

# Records of one fetch started per turn of the loop. A fetch of hundreds started at once moves through
# each await of the handler (decoding, the ledger's claim, the window) in lockstep: the first of them
# reaches the model only once all have passed each step before it. Started a piece per turn, the
# first pieces' calls leave while later pieces are still being claimed.
DISPATCH_PIECE = 32


class Runner:
    """Consume a topic with a handler per record; see the module docstring."""

    def __init__(
        self,
        consumer_config: dict[str, Any],
        handler: Handler,
        config: RunnerConfig,
        metrics: RunnerMetrics | None = None,
        gate: Callable[[], bool] | None = None,
        transactions: TransactionalProducer | None = None,
        screen: Screen | None = None,
        progress: Progress | None = None,
    ) -> None:
        self._conf = dict(consumer_config)
        self._screen = screen
        self.transactions = transactions
        self.config = config
        self.metrics = metrics or RunnerMetrics()
        self.started = asyncio.Event()
        self.last_error: str | None = None
        self._read_any = False  # whether a fetch returned a record yet
        self._stopping = asyncio.Event()
        # told of every finished record; asked whether the runner makes progress, and why not
        self._progress = progress or Progress()
        self._progress.causes.append(self._holding)
        self._thread = ConsumerThread()
        self._partitions = Partitions(self.metrics)
        self._backpressure = Backpressure(config, self._partitions, self._thread, self.metrics, gate)
        self._commits = Commits(self._partitions, self._thread, self.metrics, self._note_error, transactions,
                                self._progress)
        self._screening = Screening()  # fetched batches whose screens are under way (a replay)
        self._dispatcher = Dispatcher(handler, config, self._partitions, self._backpressure, self._progress,
                                      self.metrics, self._note_error, stage=transactions is not None,
                                      failing=lambda: self._commits.failing)

    def _note_error(self, text: str) -> None:
        self.last_error = text

    # ------------------------------------------------------------------ public state

    @property
    def progress(self) -> Progress:
        """The progress the runner reports to (handed in, or its own)."""
        return self._progress

    @property
    def assignment(self) -> list[TP]:
        return self._partitions.assignment

    @property
    def in_flight(self) -> int:
        return self._backpressure.held

    def stop(self) -> None:
        """Begin a graceful drain; ``run()`` returns when it is done."""
        self._stopping.set()
        self._backpressure.wake()

    @property
    def healthy(self) -> bool:
        """Kept for compatibility: True unless stopping. One record's retries never change it."""
        return not self._stopping.is_set()

    @property
    def retrying(self) -> int:
        """How many records are between failed attempts of their handler right now."""
        return self._dispatcher.retrying

    @property
    def gated(self) -> bool:
        """True while the gate holds every partition paused."""
        return self._backpressure.gated

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def pending(self) -> bool:
        """Work waits: records taken and not finished, records fetched and held for their screen's
        answer, outcomes staged for a transaction, or a paused partition with lag."""
        return self._backpressure.held > 0 or self._screening.batches > 0 or any(
            (p.paused and (p.lag or 0) > 0) or p.staged for p in self._partitions.values())

    async def commit(self) -> None:
        """Commit what finished; an offset is marked committed only once the broker accepted it."""
        await self._commits.commit()

    def _holding(self) -> str | None:
        """The runner's own answer to what holds pending work (asked after the processor's)."""
        if self._backpressure.gated:
            return "paused"
        if self._dispatcher.retrying:
            return "retrying"
        if self._commits.failing and any(p.staged for p in self._partitions.values()):
            return "transactions failing"
        if self._partitions and all(p.paused for p in self._partitions.values()):
            return "paused"
        if self._screening.batches:
            return "screening"  # fetched records wait for the ledger's read of them
        return None

    # ------------------------------------------------------------------ consumer thread

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions:
            # librdkafka keeps the pause an application put on a partition through its revoke (or
            # loss) and its return: paused by a full window or a closed gate when it left, it would
            # come back paused, under a new state here that believes it open, and never be fetched.
            consumer.resume(partitions)
        self._thread.on_loop(self._assigned(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        offsets, staged = self._thread.on_loop(self._revoked(partitions))
        self._commits.commit_revoked(consumer, offsets, staged)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._thread.on_loop(self._revoked(partitions))
        log.warning("partitions lost without a clean revoke: %s", fmt(partitions))

    # ------------------------------------------------------------------ loop-side state

    async def _assigned(self, partitions: list[TopicPartition]) -> None:
        self._partitions.assign(partitions)
        log.info("assigned: %s", fmt(partitions))

    async def _revoked(self, partitions: list[TopicPartition]) -> tuple[list[TopicPartition], list[list[Staged]]]:
        """Forget the partitions; returns their offsets to commit and the outcomes staged below them."""
        offsets, staged = self._partitions.revoke(partitions)
        # Queued records of revoked partitions are not started: the new owner reads them again.
        self._dispatcher.drop_revoked()
        self._backpressure.report_paused()
        log.info("revoked: %s", fmt(partitions))
        return offsets, staged

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        self._thread.bind(asyncio.get_running_loop())
        conf = dict(self._conf)
        consumer = self._thread.consumer = await self._thread.call(Consumer, conf)
        await self._thread.call(
            consumer.subscribe, [self.config.topic],
            on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost,
        )
        self.started.set()
        next_commit = monotonic() + self.config.commit_interval_s
        next_lag = monotonic() + self.config.lag_interval_s
        try:
            while not self._stopping.is_set():
                fetched = await self._poll()
                now = monotonic()
                if now >= next_commit:
                    await self.commit()
                    next_commit = now + self.config.commit_interval_s
                if now >= next_lag:
                    await self._commits.report_lag()
                    next_lag = now + self.config.lag_interval_s
                self._progress.observe(self.pending)
                if not fetched:
                    await asyncio.sleep(0)
        finally:
            await self._drain()

    async def _poll(self) -> bool:
        """Take what the window has room for (pausing and resuming first); False if nothing came.

        While batches are screened whole (a replay), a batch's screen runs while the next batch is
        fetched, read and its own screen started (:mod:`consumers.screening`); each batch is handed
        over before the next."""
        screening = self._screening
        room = await self._backpressure.room()  # a batch held takes none: see consumers.screening
        if room <= 0:  # full, not yet paused: wait for room, keeping librdkafka's prefetched records
            if await self._hand_over_screened():  # a batch held takes its room first
                return True
            await self._backpressure.wait_for_room()
            return False
        # with a batch held, only what is ready at once: that batch is not kept waiting for more records
        msgs = await self._thread.call(self._fetch, min(room, self.config.max_batch), not screening.held)
        records = self._records(msgs)
        if records and not self._read_any:
            self._read_any = True
            self.metrics.first_record()
        # as fetched: a rebalance while the batch is screened or handed over drops its records
        owners = dict(self._partitions)
        if records and screening.whole and self._screen is not None and self._screen.wanted():
            screening.start(records, owners, self._screened(records))  # its read queued behind the last one's
            if screening.batches > 1:
                await self._hand_over_screened()
            return True
        while await self._hand_over_screened():  # every batch held, oldest first
            pass
        if records:
            done = await self._screened(records)
            screening.whole = done is not None and all(done)
            await self._hand_over(records, done, owners)
        return bool(msgs)

    async def _hand_over_screened(self) -> bool:
        """Hand the oldest batch held over once its screen answered; False when none was held."""
        batch = await self._screening.take()
        if batch is None:
            return False
        await self._hand_over(batch.records, batch.done, batch.owners)
        return True

    async def _hand_over(self, records: list[Record], done: Sequence[bool] | None,
                         owners: Mapping[TP, PartitionState]) -> None:
        if done is not None and all(done):  # nothing starts: a replay's batch finishes in one call
            self._dispatcher.dispatch(records, done, owners)
            return
        for start in range(0, len(records), DISPATCH_PIECE):
            if start:  # the records started so far take their first steps before the next piece starts
                await asyncio.sleep(0)
            piece = slice(start, start + DISPATCH_PIECE)
            self._dispatcher.dispatch(records[piece], done[piece] if done is not None else None, owners)

    def _fetch(self, n: int, wait: bool = True) -> list[Any]:
        """Up to ``n`` records: what is ready at once, else (``wait``) wait ``poll_timeout_s`` for the first.

        ``consume(n, timeout)`` alone would wait the whole timeout whenever fewer than ``n`` are
        ready; this returns as soon as there is anything to start.
        """
        consumer = self._thread.consumer
        assert consumer is not None
        msgs: list[Any] = consumer.consume(n, 0)
        if msgs or not wait:
            return msgs
        msgs = consumer.consume(1, self.config.poll_timeout_s)
        if msgs and n > 1:
            msgs.extend(consumer.consume(n - 1, 0))
        return msgs

    def _dispatch(self, msgs: list[Any]) -> None:
        """Start or queue each record; never raises, whatever a record looks like."""
        self._dispatcher.dispatch(self._records(msgs))

    def _records(self, msgs: list[Any]) -> list[Record]:
        """The records of fetched messages; never raises, whatever a record looks like."""
        records = []
        for msg in msgs:
            try:
                record = self._record_of(msg)
            except KafkaException:  # the consumer is unusable: see _record_of
                raise
            except Exception:  # noqa: BLE001 - one odd record must not stop the run loop
                log.exception("cannot read a fetched record; skipped")
                continue
            if record is not None:
                records.append(record)
        return records

    def _record_of(self, msg: Any) -> Record | None:
        """The record of a fetched message, or None for an error event (logged).

        A fatal error (a static member fenced by another with its ``group.instance.id``, say) leaves
        the consumer unusable: librdkafka has dropped its partitions and polling it fetches nothing
        again. It is raised, so the run ends and the process exits for its platform to restart it,
        rather than polling on, alive and idle."""
        err = msg.error()
        # confluent-kafka hands a consumer's fatal error over as the code _FATAL, its flag unset
        if isinstance(err, KafkaError) and (err.fatal() or err.code() == KafkaError._FATAL):
            raise KafkaException(err)
        if err is not None:
            code = err.code() if hasattr(err, "code") else None
            if code != KafkaError._PARTITION_EOF:
                text = err.str() if hasattr(err, "str") else str(err)
                self._note_error(text)
                log.warning("consumer error: %s", text)
            return None
        return Record.from_message(msg)

    async def _screened(self, records: list[Record]) -> Sequence[bool] | None:
        """The screen's flags for ``records`` (True: finished before), or None to run them all.

        A screen that fails or takes longer than ``screen_timeout_s`` changes nothing: the handler
        then finds the same, record by record."""
        screen = self._screen
        if screen is None or not records or not screen.wanted():
            return None
        try:
            async with asyncio.timeout(self.config.screen_timeout_s):
                done = await screen(records)
        except Exception as exc:  # noqa: BLE001 - the records run through the handler instead
            log.debug("screen skipped for %d records: %s", len(records), exc)
            return None
        return done if len(done) == len(records) else None

    # ------------------------------------------------------------------ shutdown

    async def _drain(self) -> None:
        self._screening.drop()  # never tracked: the group reads them again
        consumer = self._thread.consumer
        if consumer is None:
            return
        try:
            if self._partitions:
                await self._thread.call(consumer.pause, [TopicPartition(t, p) for t, p in self._partitions])
            if not await self._backpressure.wait_idle(self.config.drain_timeout_s):
                log.warning("drain timed out with %d records in flight; they stay uncommitted",
                            self._backpressure.held)
            await self.commit()
            await self._thread.call(consumer.close)
        finally:
            await self._dispatcher.cancel()
            self._thread.shutdown(wait=False)
            log.info("consumer closed")
