"""A consumer of one of the service's side topics (the approvals topic, the replies topic): one
consumer group for the whole fleet, a thread of its own, each record handled on the service's loop.

What every side topic needs, and :class:`SideTopicConsumer` gives its subclasses:

- an offset is committed once its record is handled, and never for a record a stop interrupted
  (:class:`Stopped`): the record is read again by the next owner of its partition;
- a record that is no valid message is logged, counted and skipped by the subclass
  (:meth:`SideTopicConsumer.skip`): a dead letter would not fit, since a replay of the dead-letter
  topic sends records to the input topic;
- Redis or the broker not answering is retried with backoff for as long as it takes
  (:meth:`SideTopicConsumer.on_loop`), a stop heard within a slice;
- the thread never ends on an error: an unexpected one restarts its loop after a backoff, from the
  record that failed, which is skipped as ``internal`` once it failed the loop
  :data:`FAILURES_PER_RECORD` times.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumers.producers import ProduceFailed
from dedup.ledger import LedgerUnavailable
from service.core.settings import Settings

log = logging.getLogger(__name__)

RETRY_MAX_S = 30.0
FAILURES_PER_RECORD = 3  # a record that failed the loop this often (unexpected errors) is skipped
SLICE_S = 0.5
CALL_S = 60.0  # a call on the service's loop that takes longer is cancelled and tried again
OUTAGES = (LedgerUnavailable, ProduceFailed, TimeoutError, OSError, KafkaException)

T = TypeVar("T")


class Stopped(Exception):
    """The consumer stops: the record in hand is left uncommitted."""


class SideTopicConsumer:
    """Reads ``topic`` in the consumer group ``<group>.<name>``; subclasses handle each record
    (:meth:`handle`) and count what they skip (:meth:`count_skip`)."""

    retry_s = 1.0  # the first wait of a restart or a retry; doubled up to RETRY_MAX_S

    def __init__(self, settings: Settings, name: str, topic: str, loop: asyncio.AbstractEventLoop) -> None:
        k = settings.kafka
        self._consumer = Consumer({
            **k.common_config("consumer"), "group.id": f"{k.group_id}.{name}", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "session.timeout.ms": k.session_timeout_ms,
        })
        self._name, self._topic, self._loop = name, topic, loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._failing: tuple[int, int] | None = None  # the record that failed the loop, and how often
        self._failures = 0
        self.restarts = 0

    # -- what a subclass provides -----------------------------------------------------------------

    def handle(self, message: Message) -> None:
        """Handle one record (or skip it); raises :class:`Stopped` when a stop comes first."""
        raise NotImplementedError

    def count_skip(self, reason: str) -> None:
        """Count a skipped record under ``reason``."""
        raise NotImplementedError

    # -- the life of the thread -------------------------------------------------------------------

    def start(self) -> None:
        self._consumer.subscribe([self._topic])
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._consumer.close()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def skip(self, message: Message, reason: str, detail: str) -> None:
        log.warning("%s topic: record at partition %s offset %s skipped (%s): %s",
                    self._name, message.partition(), message.offset(), reason, detail)
        self.count_skip(reason)

    def on_loop(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``call()`` on the service's loop until it answers; Redis or the broker not answering
        (:data:`OUTAGES`) is retried with backoff, for as long as it takes. Anything else it raises
        is the caller's; raises :class:`Stopped` on a stop."""
        wait = self.retry_s
        while not self._stop.is_set():
            try:
                return self._run_on_loop(call)
            except OUTAGES as exc:
                log.warning("%s topic: %s: retrying in %.1fs: %s: %s", self._name, what, wait, type(exc).__name__, exc)
                self._stop.wait(wait)
                wait = min(wait * 2, RETRY_MAX_S)
        raise Stopped

    def _run_on_loop(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run on the service's loop and wait for it, a slice at a time so a stop is heard."""
        async def run() -> T:
            return await call()

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        deadline = time.monotonic() + CALL_S
        while True:
            try:
                return future.result(timeout=SLICE_S)
            except concurrent.futures.TimeoutError:
                if future.done():  # the call itself raised TimeoutError
                    raise
                if self._stop.is_set():
                    future.cancel()
                    raise Stopped from None
                if time.monotonic() >= deadline:
                    future.cancel()
                    raise TimeoutError(f"no answer in {CALL_S:.0f}s") from None

    def _run(self) -> None:
        backoff = self.retry_s
        while not self._stop.is_set():
            held: Message | None = None
            try:
                for message in self._messages():
                    held = message
                    self._handle_message(message)
                    held, backoff = None, self.retry_s
                return
            except Stopped:
                return
            except Exception as exc:  # noqa: BLE001 - the loop goes on; the record is read again
                self.restarts += 1
                log.error("%s topic: consumer loop failed (%s: %s); restarting in %.1fs",
                          self._name, type(exc).__name__, str(exc)[:300], backoff, exc_info=exc)
                if held is not None:
                    self._rewind(held)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)

    def _messages(self) -> Iterator[Message]:
        while not self._stop.is_set():
            try:
                message = self._consumer.poll(SLICE_S)
            except KafkaException as exc:
                log.warning("%s topic: %s", self._name, exc)
                continue
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("%s topic: %s", self._name, error)
                continue
            yield message

    def _handle_message(self, message: Message) -> None:
        where = (message.partition() or 0, message.offset() or 0)
        if self._failing == where and self._failures >= FAILURES_PER_RECORD:
            self.skip(message, "internal", f"failed the consumer {self._failures} times")
        else:
            try:
                self.handle(message)
            except Stopped:
                raise
            except Exception:
                self._failures = self._failures + 1 if self._failing == where else 1
                self._failing = where
                raise
        self._failing, self._failures = None, 0
        try:
            self._consumer.commit(message=message, asynchronous=False)
        except KafkaException as exc:  # handled again after a rebalance: the ledger decides once
            log.warning("%s topic: offset not committed: %s", self._name, exc)

    def _rewind(self, message: Message) -> None:
        """Read ``message`` again (its offset was not committed)."""
        try:
            self._consumer.seek(TopicPartition(message.topic() or self._topic, message.partition() or 0,
                                               message.offset() or 0))
        except KafkaException as exc:  # not assigned any more: its next owner reads it from the commit
            log.warning("%s topic: cannot read partition %s offset %s again: %s",
                        self._name, message.partition(), message.offset(), exc)
