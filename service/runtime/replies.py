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
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from confluent_kafka import Message

from dedup.keys import is_valid_task_key
from dedup.ledger import Ledger
from service.core.metrics import REPLY_SKIP_REASONS, Metrics
from service.core.settings import Settings
from service.pipeline.base import utcnow
from service.pipeline.parking import RESUME_RETRY_MS, Send, resume
from service.runtime.side_topics import SideTopicConsumer

log = logging.getLogger(__name__)

__all__ = ["MAX_REPLY_BYTES", "REPLY_SKIP_REASONS", "BadReply", "Folded", "Reply", "ReplyConsumer", "ReplyFolding",
           "parse_reply", "start_replies"]

MAX_REPLY_BYTES = 1024 * 1024
MAX_CHILD_N = 10_000  # far above any children limit: a larger n is no child of any plan
_STATES = ("succeeded", "dead")


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


class ReplyConsumer(SideTopicConsumer):
    """Reads the replies topic (:class:`~service.runtime.side_topics.SideTopicConsumer`) and folds
    each reply on the service's loop (see the module's docstring); a record that is no reply, or one
    the ledger refuses, is counted (``agent_replies_skipped_total``) and skipped."""

    retry_s = 0.5

    def __init__(self, settings: Settings, folding: ReplyFolding, loop: asyncio.AbstractEventLoop,
                 metrics: Metrics, *, max_bytes: int = MAX_REPLY_BYTES) -> None:
        super().__init__(settings, "replies", settings.kafka.replies_topic, loop)
        self._folding, self._metrics, self._max_bytes = folding, metrics, max_bytes

    def count_skip(self, reason: str) -> None:
        self._metrics.replies_skipped.labels(reason=reason).inc()

    def handle(self, message: Message) -> None:
        """Fold the record's reply and resume its parent if that ended its wait, or skip the record;
        raises :class:`~service.runtime.side_topics.Stopped` when a stop comes first."""
        try:
            reply = parse_reply(message.value(), self._max_bytes)
        except BadReply as exc:
            self.skip(message, exc.reason, str(exc))
            return
        what = f"parent {reply.parent} child {reply.n} ({reply.task_id})"
        try:
            folded = self.on_loop(lambda: self._folding.fold(reply), what)
        except (ValueError, TypeError) as exc:  # the ledger refused what the reply holds
            self.skip(message, "refused", f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
            return
        if folded.status in ("unplanned", "unknown_parent"):
            self.skip(message, folded.status, f"{what}: no such child planned")
            return
        self._metrics.replies.labels(state=reply.state if folded.status == "folded" else "duplicate").inc()
        if folded.source is not None:
            self.on_loop(lambda: self._folding.resume(reply.parent, folded), f"resuming parent {reply.parent}")
            log.info("task_id=%s: its children ended (the last: %s); resumed", reply.parent, reply.task_id)


def start_replies(ledger: Ledger, send: Send, metrics: Metrics, settings: Settings) -> ReplyConsumer:
    """The replies consumer of a running service, started on the running loop."""
    consumer = ReplyConsumer(settings, ReplyFolding(ledger, ledger.children, send), asyncio.get_running_loop(),
                             metrics)
    consumer.start()
    return consumer
