"""The consumer of this deployment's replies topic: children's outcomes folded into their parents.

A child task whose record named ``agent.reply_to`` sends, once its outcome is durable, a reply to
that topic (key: the parent's id):
``{"parent", "step", "n", "task_id", "kind", "state": "succeeded"|"dead", "result"?, "reason"?, "error"?}``.
Every deployment reads its own replies topic (``AGENT_KAFKA__REPLIES_TOPIC``) in a consumer group of
its own (``<group>.replies``), the way the approvals consumer runs (:mod:`service.runtime.parked`):
one thread, each record applied on the service's loop, its offset committed only once the reply is
in the ledger and, when it was the last child the parent waited for, the parent's record produced
again (:func:`service.pipeline.parking.resume`).

The ledger folds each child once (``ledger.children.fold``: the first reply of a child wins), so a
duplicate reply, or a reply read again after a crash between the fold and the commit, is counted as
``duplicate`` and changes nothing; if the crash came between the fold and the parent's resumption,
the reply read again finds the parent ``resuming`` and still listed for the sweeper, and produces
its record again (a second resumption is harmless: its claim finds it running or done). A record
that is no reply, or one the ledger has no place for (an unknown parent, a child it never planned),
is logged, counted (``agent_replies_skipped_total{reason}``) and skipped: it never blocks the replies
behind it. Redis or the broker not answering is retried with backoff, never skipped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumers.producers import ProduceFailed
from dedup.keys import is_valid_task_key
from dedup.ledger import Ledger, LedgerUnavailable
from service.core.metrics import REPLY_SKIP_REASONS, Metrics
from service.core.settings import Settings
from service.pipeline.base import utcnow
from service.pipeline.parking import RESUME_RETRY_MS, Send, resume

log = logging.getLogger(__name__)

__all__ = ["MAX_REPLY_BYTES", "REPLY_SKIP_REASONS", "BadReply", "Folded", "Reply", "ReplyConsumer", "ReplyFolding",
           "parse_reply", "start_replies"]

MAX_REPLY_BYTES = 1024 * 1024
MAX_CHILD_N = 10_000  # far above any children limit: a larger n is no child of any plan
_STATES = ("succeeded", "dead")
_RETRY_S = 0.5
_RETRY_MAX_S = 30.0
_FAILURES_PER_RECORD = 3  # a record that failed the loop this often (unexpected errors) is skipped
_SLICE_S = 0.5
_CALL_S = 60.0
_OUTAGES = (LedgerUnavailable, ProduceFailed, TimeoutError, OSError, KafkaException)

T = TypeVar("T")


class BadReply(ValueError):
    """A record of the replies topic that is no reply: ``reason`` is one of :data:`REPLY_SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reply:
    parent: str
    step: str
    n: int
    task_id: str
    state: str
    value: dict[str, Any]  # what is folded: the reply's known fields, strings clipped


def _storable(value: str) -> bool:
    """A string that can be stored (no lone surrogate from a ``\\ud800`` escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _strings(data: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    """The reply's strings (parent, step, task_id, kind, reason, error), checked."""
    values = [data.get(k) for k in ("parent", "step", "task_id", "kind")] + [
        data.get("reason", ""), data.get("error", "")]
    if not all(isinstance(v, str) for v in values):
        raise BadReply("schema", '"parent", "step", "task_id", "kind" (and "reason", "error") must be strings')
    texts: list[str] = [v for v in values if isinstance(v, str)]
    if any(len(v) > 200 for v in texts[:4]):
        raise BadReply("schema", '"parent", "step", "task_id" and "kind" hold at most 200 characters')
    if not all(_storable(v) for v in texts):
        raise BadReply("encoding", "a string holds a lone surrogate")
    parent, step, task_id, kind, reason, error = texts
    return parent, step, task_id, kind, reason, error


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is no JSON number")


def _decode(value: bytes | None, max_bytes: int) -> Any:
    if value is None:
        raise BadReply("tombstone", "a tombstone (no value)")
    if len(value) > max_bytes:
        raise BadReply("oversize", f"{len(value)} bytes, more than {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadReply("encoding", f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep; ValueError: an int too long
        raise BadReply("json", f"not JSON: {type(exc).__name__}: {str(exc)[:120]}") from None


def _child_of(task_id: str, parent: str, step: str, n: int) -> bool:
    """Whether ``task_id`` is the id of child ``n`` of ``parent``'s ``step`` (any generation)."""
    if task_id == f"{parent}/{step}/{n}":
        return True
    return re.fullmatch(rf"{re.escape(parent)}/g[0-9]+/{re.escape(step)}/{n}", task_id) is not None


def parse_reply(value: bytes | None, max_bytes: int = MAX_REPLY_BYTES) -> Reply:
    """A record's value -> :class:`Reply`; raises :class:`BadReply` (a ``ValueError``) with the reason
    it is none."""
    data = _decode(value, max_bytes)
    if not isinstance(data, dict):
        raise BadReply("schema", "expected a JSON object")
    n, state = data.get("n"), data.get("state")
    if not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n < MAX_CHILD_N) or state not in _STATES:
        raise BadReply("schema", f'expected "n" an int from 0 below {MAX_CHILD_N}, "state" one of {_STATES}')
    parent, step, task_id, kind, reason, error = _strings(data)
    if not (is_valid_task_key(parent) and is_valid_task_key(task_id)):
        raise BadReply("task_key", f"invalid parent or child id {parent[:80]!r} {task_id[:80]!r}")
    if not _child_of(task_id, parent, step, n):
        raise BadReply("mismatch", f"{task_id[:120]!r} is not child {n} of {parent[:80]!r} step {step[:40]!r}")
    folded: dict[str, Any] = {"parent": parent, "step": step, "n": n, "task_id": task_id, "kind": kind,
                              "state": state}
    if state == "succeeded":
        try:
            json.dumps(data.get("result"), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadReply("encoding", "the result holds a lone surrogate") from None
        folded["result"] = data.get("result")
    else:
        folded.update(reason=reason[:200], error=error[:2000])
    return Reply(parent, step, n, task_id, state, folded)


class Children(Protocol):
    """What the consumer needs of the ledger's children (:mod:`dedup.children`)."""

    async def fold(self, parent_key: str, step: str, n: int, reply: dict[str, Any]) -> tuple[str, str]: ...


@dataclass(frozen=True, slots=True)
class Folded:
    status: str  # folded | again | unplanned | unknown_parent
    source: dict[str, Any] | None  # the parent's record to produce again, if this reply ended its wait
    listed_at: float | None  # where the parent was listed for the sweeper before the fold


class ReplyFolding:
    """The ledger's side of a reply and the parent's resumption, each a coroutine the consumer
    retries on its own: a resumption that failed is tried again without folding again."""

    def __init__(self, ledger: Ledger, children: Children, send: Send,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._ledger, self._children, self._send, self._clock = ledger, children, send, clock

    async def fold(self, reply: Reply) -> Folded:
        effects = self._ledger.effects
        listed_at = await effects.listed_at(reply.parent)  # the wait's listing, to end it and no later one
        status, source = await self._children.fold(reply.parent, reply.step, reply.n, reply.value)
        if source:
            return Folded(status, json.loads(source) if isinstance(source, str) else dict(source), listed_at)
        if status == "unplanned" and await self._ledger.get(reply.parent) is None:
            return Folded("unknown_parent", None, listed_at)
        if status == "again" and listed_at is not None:
            record = await self._ledger.get(reply.parent)
            if record is not None and record.state == "resuming":  # folded and decided, perhaps never produced
                stored = (await effects.journal(reply.parent)).get("source")
                return Folded(status, stored if isinstance(stored, dict) else None, listed_at)
        return Folded(status, None, listed_at)

    async def resume(self, parent: str, folded: Folded) -> None:
        """Produce the parent's record again, then end its listing (unless it was listed again meanwhile)."""
        assert folded.source is not None
        try:
            await resume(self._send, folded.source, "children")
        except Exception:
            # folded but not resumed: the sweeper produces it soon, unless this consumer does first
            await self._ledger.effects.relist(parent, self._clock().timestamp() * 1000 + RESUME_RETRY_MS)
            raise
        if folded.listed_at is not None:
            await self._ledger.effects.unlist_at(parent, folded.listed_at)


class _Stopped(Exception):
    """The consumer stops: the record in hand is left uncommitted."""


class ReplyConsumer:
    """Reads the replies topic in its own thread and folds each reply on the service's loop (see the
    module's docstring). The thread never ends on an error: an unexpected one restarts its loop after
    a backoff, from the record that failed (skipped as ``internal`` once it failed the loop
    :data:`_FAILURES_PER_RECORD` times)."""

    def __init__(self, settings: Settings, folding: ReplyFolding, loop: asyncio.AbstractEventLoop,
                 metrics: Metrics, *, max_bytes: int = MAX_REPLY_BYTES) -> None:
        k = settings.kafka
        self._consumer = Consumer({
            **k.common_config(), "group.id": f"{k.group_id}.replies", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "session.timeout.ms": k.session_timeout_ms,
        })
        self._topic: str = k.replies_topic
        self._folding, self._loop, self._metrics, self._max_bytes = folding, loop, metrics, max_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replies", daemon=True)
        self._failing: tuple[int, int] | None = None  # the record that failed the loop, and how often
        self._failures = 0
        self.restarts = 0

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

    def _run(self) -> None:
        backoff = _RETRY_S
        while not self._stop.is_set():
            held: Message | None = None
            try:
                for message in self._messages():
                    held = message
                    self._handle_message(message)
                    held, backoff = None, _RETRY_S
                return
            except _Stopped:
                return
            except Exception as exc:  # noqa: BLE001 - the loop goes on; the record is read again
                self.restarts += 1
                log.error("replies topic: consumer loop failed (%s: %s); restarting in %.1fs",
                          type(exc).__name__, str(exc)[:300], backoff, exc_info=exc)
                if held is not None:
                    self._rewind(held)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _RETRY_MAX_S)

    def _messages(self) -> Iterator[Message]:
        while not self._stop.is_set():
            try:
                message = self._consumer.poll(_SLICE_S)
            except KafkaException as exc:
                log.warning("replies topic: %s", exc)
                continue
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("replies topic: %s", error)
                continue
            yield message

    def _handle_message(self, message: Message) -> None:
        where = (message.partition() or 0, message.offset() or 0)
        if self._failing == where and self._failures >= _FAILURES_PER_RECORD:
            self._skip(message, "internal", f"failed the consumer {self._failures} times")
        else:
            try:
                self._handle(message)
            except _Stopped:
                raise
            except Exception:
                self._failures = self._failures + 1 if self._failing == where else 1
                self._failing = where
                raise
        self._failing, self._failures = None, 0
        try:
            self._consumer.commit(message=message, asynchronous=False)
        except KafkaException as exc:  # read again after a rebalance: the ledger folds once
            log.warning("replies topic: offset not committed: %s", exc)

    def _rewind(self, message: Message) -> None:
        """Read ``message`` again (its offset was not committed)."""
        try:
            self._consumer.seek(TopicPartition(message.topic() or self._topic, message.partition() or 0,
                                               message.offset() or 0))
        except KafkaException as exc:  # not assigned any more: its next owner reads it from the commit
            log.warning("replies topic: cannot read partition %s offset %s again: %s",
                        message.partition(), message.offset(), exc)

    def _skip(self, message: Message, reason: str, detail: str) -> None:
        log.warning("replies topic: record at partition %s offset %s skipped (%s): %s",
                    message.partition(), message.offset(), reason, detail)
        self._metrics.replies_skipped.labels(reason=reason).inc()

    def _handle(self, message: Message) -> None:
        """Fold the record's reply and resume its parent if that ended its wait, or skip the record;
        raises :class:`_Stopped` when a stop comes first."""
        try:
            reply = parse_reply(message.value(), self._max_bytes)
        except BadReply as exc:
            self._skip(message, exc.reason, str(exc))
            return
        what = f"parent {reply.parent} child {reply.n} ({reply.task_id})"
        try:
            folded = self._retrying(lambda: self._folding.fold(reply), what)
        except (ValueError, TypeError) as exc:  # the ledger refused what the reply holds
            self._skip(message, "refused", f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
            return
        if folded.status in ("unplanned", "unknown_parent"):
            self._skip(message, folded.status, f"{what}: no such child planned")
            return
        self._metrics.replies.labels(state=reply.state if folded.status == "folded" else "duplicate").inc()
        if folded.source is not None:
            self._retrying(lambda: self._folding.resume(reply.parent, folded), f"resuming parent {reply.parent}")
            log.info("task_id=%s: its children ended (the last: %s); resumed", reply.parent, reply.task_id)

    def _retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``call()`` on the service's loop until it answers; Redis or the broker not answering is
        retried with backoff, for as long as it takes (raises :class:`_Stopped` on a stop)."""
        wait = _RETRY_S
        while not self._stop.is_set():
            try:
                return self._run_on_loop(call)
            except _OUTAGES as exc:
                log.warning("replies topic: %s: retrying in %.1fs: %s: %s", what, wait, type(exc).__name__, exc)
                self._stop.wait(wait)
                wait = min(wait * 2, _RETRY_MAX_S)
        raise _Stopped

    def _run_on_loop(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run on the service's loop and wait for it, a slice at a time so a stop is heard."""
        async def run() -> T:
            return await call()

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        deadline = time.monotonic() + _CALL_S
        while True:
            try:
                return future.result(timeout=_SLICE_S)
            except concurrent.futures.TimeoutError:
                if future.done():  # the call itself raised TimeoutError
                    raise
                if self._stop.is_set():
                    future.cancel()
                    raise _Stopped from None
                if time.monotonic() >= deadline:
                    future.cancel()
                    raise TimeoutError(f"no answer in {_CALL_S:.0f}s") from None


def start_replies(ledger: Ledger, send: Send, metrics: Metrics, settings: Settings) -> ReplyConsumer:
    """The replies consumer of a running service, started on the running loop."""
    consumer = ReplyConsumer(settings, ReplyFolding(ledger, ledger.children, send), asyncio.get_running_loop(),
                             metrics)
    consumer.start()
    return consumer
