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
  handler call (a task, a future, a ledger script) each.
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
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from consumers.backpressure import Backpressure
from consumers.commits import Commits
from consumers.partitions import TP, Handler, PartitionState, RunnerConfig, RunnerMetrics, Screen, fmt
from consumers.progress import Progress
from consumers.records import Record
from consumers.transactions import Staged, TransactionalProducer, staging

log = logging.getLogger(__name__)


class Runner(Backpressure, Commits):
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
        self._handler = handler
        self.config = config
        self.metrics = metrics or RunnerMetrics()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-consumer")
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._partitions: dict[TP, PartitionState] = {}
        self._keys: dict[tuple[TP, bytes | int], deque[tuple[Record, PartitionState]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._held = 0
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()  # set whenever a record leaves the window
        self._idle = asyncio.Event()
        self._idle.set()
        self._gate = gate
        self._gate_closed = False  # the gate said no at the last check: every partition is paused
        self._retrying = 0
        self._full_since: float | None = None
        self._record_s = 0.0
        self.started = asyncio.Event()
        self.last_error: str | None = None
        self._lags: dict[TP, int | None] = {}  # per partition, as last reported
        # told of every finished record; asked whether the runner makes progress, and why not
        self.progress = progress or Progress()
        self.progress.causes.append(self._holding)

    # ------------------------------------------------------------------ public state

    @property
    def assignment(self) -> list[TP]:
        return [tp for tp, p in self._partitions.items() if not p.revoked]

    @property
    def in_flight(self) -> int:
        return self._held

    def stop(self) -> None:
        """Begin a graceful drain; ``run()`` returns when it is done."""
        self._stopping.set()
        self._room.set()

    @property
    def healthy(self) -> bool:
        """Kept for compatibility: True unless stopping. One record's retries never change it."""
        return not self._stopping.is_set()

    @property
    def retrying(self) -> int:
        """How many records are between failed attempts of their handler right now."""
        return self._retrying

    @property
    def gated(self) -> bool:
        """True while the gate holds every partition paused."""
        return self._gate_closed

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def pending(self) -> bool:
        """Work waits: records taken and not finished, or a paused partition with lag."""
        return self._held > 0 or any(
            p.paused and (self._lags.get(tp) or 0) > 0 for tp, p in self._partitions.items())

    def _holding(self) -> str | None:
        """The runner's own answer to what holds pending work (asked after the processor's)."""
        if self._gate_closed:
            return "paused"
        if self._retrying:
            return "retrying"
        if self._partitions and all(p.paused for p in self._partitions.values()):
            return "paused"
        return None

    # ------------------------------------------------------------------ consumer thread


    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._assigned(partitions), self._loop).result()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._loop is not None
        offsets, staged = asyncio.run_coroutine_threadsafe(self._revoked(partitions), self._loop).result()
        if self.transactions is None:
            self._commit_now(consumer, offsets, "revoke")  # the partitions are gone: nothing to confirm
            return
        # aborted: the next owner reads those records again and stages their outcomes anew
        self._transact(consumer, [item for items in staged for item in items], offsets, "revoke")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._revoked(partitions), self._loop).result()
        log.warning("partitions lost without a clean revoke: %s", fmt(partitions))


    # ------------------------------------------------------------------ loop-side state

    async def _assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions[(tp.topic, tp.partition)] = PartitionState()
        self.metrics.assigned(len(self.assignment))
        log.info("assigned: %s", fmt(partitions))

    async def _revoked(self, partitions: list[TopicPartition]) -> tuple[list[TopicPartition], list[list[Staged]]]:
        """Forget the partitions; returns their offsets to commit and the outcomes staged below them."""
        offsets = []
        staged: list[list[Staged]] = []
        for tp in partitions:
            key = (tp.topic, tp.partition)
            part = self._partitions.pop(key, None)
            if part is None:
                continue
            part.revoked = True
            offset = part.tracker.take_commit()
            if offset is not None:
                offsets.append(TopicPartition(tp.topic, tp.partition, offset))
                staged.extend(part.take_staged(offset).values())
            part.staged.clear()  # above the mark: the next owner handles those records again
            self.metrics.lag(tp.topic, tp.partition, None)
            self._lags.pop(key, None)
        # Queued records of revoked partitions are not started: the new owner reads them again.
        # The head of each queue is running (or retrying: it stops at its next attempt).
        for k in [k for k in self._keys if k[0] not in self._partitions]:
            queue = self._keys[k]
            while len(queue) > 1:
                _record, owner = queue.pop()
                owner.held -= 1
                self._release(1)
        self.metrics.assigned(len(self.assignment))
        self._update_paused_metric()
        log.info("revoked: %s", fmt(partitions))
        return offsets, staged

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        conf = dict(self._conf)
        self._consumer = await self._call(Consumer, conf)
        await self._call(
            self._consumer.subscribe, [self.config.topic],
            on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost,
        )
        self.started.set()
        next_commit = monotonic() + self.config.commit_interval_s
        next_lag = monotonic() + self.config.lag_interval_s
        try:
            while not self._stopping.is_set():
                room = await self._backpressure()
                if room > 0:
                    msgs = await self._call(self._fetch, min(room, self.config.max_batch))
                    records = self._records(msgs)
                    # as fetched: a rebalance while the batch is screened drops its records
                    owners = dict(self._partitions) if self._screen is not None else None
                    self._dispatch_records(records, await self._screened(records), owners)
                else:  # full, not yet paused: wait for room, keeping librdkafka's prefetched records
                    msgs = []
                    await self._wait_for_room()
                now = monotonic()
                if now >= next_commit:
                    await self.commit()
                    next_commit = now + self.config.commit_interval_s
                if now >= next_lag:
                    await self._report_lag()
                    next_lag = now + self.config.lag_interval_s
                self.progress.observe(self.pending)
                if not msgs:
                    await asyncio.sleep(0)
        finally:
            await self._drain()

    def _fetch(self, n: int) -> list[Any]:
        """Up to ``n`` records: what is ready at once, else wait (``poll_timeout_s``) for the first.

        ``consume(n, timeout)`` alone would wait the whole timeout whenever fewer than ``n`` are
        ready; this returns as soon as there is anything to start.
        """
        assert self._consumer is not None
        msgs: list[Any] = self._consumer.consume(n, 0)
        if msgs:
            return msgs
        msgs = self._consumer.consume(1, self.config.poll_timeout_s)
        if msgs and n > 1:
            msgs.extend(self._consumer.consume(n - 1, 0))
        return msgs


    def _dispatch(self, msgs: list[Any]) -> None:
        """Start or queue each record; never raises, whatever a record looks like."""
        self._dispatch_records(self._records(msgs))

    def _records(self, msgs: list[Any]) -> list[Record]:
        """The records of fetched messages; never raises, whatever a record looks like."""
        records = []
        for msg in msgs:
            try:
                record = self._record_of(msg)
            except Exception:  # noqa: BLE001 - one odd record must not stop the run loop
                log.exception("cannot read a fetched record; skipped")
                continue
            if record is not None:
                records.append(record)
        return records

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

    def _dispatch_records(self, records: list[Record], done: Sequence[bool] | None = None,
                          owners: dict[TP, PartitionState] | None = None) -> None:
        """Start or queue each record, or finish it at once when the screen found it done.

        ``owners``: the partitions' states when the records were fetched; a record whose partition
        was revoked (or revoked and assigned again) since is dropped: the new owner reads it again."""
        consumed = 0
        for i, record in enumerate(records):
            tp = (record.topic, record.partition)
            part = self._partitions.get(tp)
            if part is None or (owners is not None and owners.get(tp) is not part):
                continue  # a record fetched before its partition was revoked
            consumed += 1
            try:
                part.tracker.add(record.offset)
            except ValueError:  # already held: a re-fetch after a position reset
                log.warning("record %s is already in flight; not started twice", record.coordinates)
                continue
            if done is not None and done[i]:
                # its outcome is durable: nothing to wait for, whatever runs before it on its key
                part.tracker.finish(record.offset)
                self.progress.finished()
                continue
            part.held += 1
            self._held += 1
            self._idle.clear()
            key = (tp, record.key if record.key is not None else record.offset)
            queue = self._keys.get(key)
            if queue is not None:
                queue.append((record, part))
            else:
                self._keys[key] = deque([(record, part)])
                self._start(key, record, part)
        if consumed:
            self.metrics.consumed(consumed)
            self.metrics.inflight(self._held)

    def _record_of(self, msg: Any) -> Record | None:
        """The record of a fetched message, or None for an error event (logged)."""
        err = msg.error()
        if err is not None:
            code = err.code() if hasattr(err, "code") else None
            if code != KafkaError._PARTITION_EOF:
                text = err.str() if hasattr(err, "str") else str(err)
                self.last_error = text
                log.warning("consumer error: %s", text)
            return None
        return Record.from_message(msg)

    def _start(self, key: tuple[TP, bytes | int], record: Record, part: PartitionState) -> None:
        task = asyncio.create_task(self._process(key, record, part))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _owns(self, tp: TP, part: PartitionState) -> bool:
        """True while ``part`` is still the live state of ``tp`` (not revoked, not replaced)."""
        return not part.revoked and self._partitions.get(tp) is part

    async def _process(self, key: tuple[TP, bytes | int], record: Record, part: PartitionState) -> None:
        """Run the handler until it succeeds or the partition this record came from is gone.

        ``part`` is the partition state the record was dispatched into. After a revoke (and maybe
        a re-assign of the same partition, which makes a new state) the record is not retried or
        finished: the new owner, or the new assignment, reads it again.
        """
        tp = key[0]
        delay = self.config.retry_base_s
        retrying = False
        started = monotonic()
        try:
            while self._owns(tp, part):
                staged: list[Staged] = []
                try:
                    if self.transactions is None:
                        await self._handler(record)
                    else:
                        with staging(staged):
                            await self._handler(record)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the handler could not make the outcome durable
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if not retrying:
                        retrying = True
                        self._retrying += 1
                    wait = delay * random.uniform(0.5, 1.0)
                    log.warning("record %s not finished, retrying in %.1fs: %s", record.coordinates, wait, exc)
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, self.config.retry_max_s)
                    continue
                if self._owns(tp, part):
                    if staged:
                        part.staged[record.offset] = staged
                    part.tracker.finish(record.offset)
                    self.progress.finished()
                    if not retrying:
                        self._took(monotonic() - started)
                if retrying:
                    log.info("record %s finished after retries", record.coordinates)
                break
        finally:
            if retrying:
                self._retrying -= 1
        self._finish(key, part)

    def _finish(self, key: tuple[TP, bytes | int], part: PartitionState) -> None:
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
        self._release(1)

    def _release(self, n: int) -> None:
        self._held -= n
        self._room.set()
        self.metrics.inflight(self._held)
        if self._held == 0:
            self._idle.set()


    # ------------------------------------------------------------------ shutdown

    async def _drain(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        try:
            if self._partitions:
                await self._call(consumer.pause, [TopicPartition(t, p) for t, p in self._partitions])
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=self.config.drain_timeout_s)
            except TimeoutError:
                log.warning("drain timed out with %d records in flight; they stay uncommitted", self._held)
            await self.commit()
            await self._call(consumer.close)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._executor.shutdown(wait=False)
            log.info("consumer closed")
