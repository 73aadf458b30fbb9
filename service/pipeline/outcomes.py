"""The outcomes of a task: a result completed under its fence, or a dead letter, then published
and marked published by the record that carried it; or a task parked until a person decides.

A record's dead letter is written once: once the broker acknowledged it, the ledger notes the
record's coordinates (:meth:`~dedup.ledger.Ledger.note_dead_letter`), and the record read again
(its offset not committed before a crash) finds the note and sends none. A crash between the
acknowledgement and the note still leaves a copy: every dead letter of a record for one reason
carries the same ``dlq.id`` (from its original coordinates and the reason), by which the listing
and a replay drop copies. Inside a transaction the dead letter is staged with the record's offset,
exactly once for ``read_committed`` readers, and nothing is noted."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from consumers.producers import (
    MISSING_TOPIC_CODES,
    Announce,
    Headers,
    Outputs,
    Placed,
    ProduceFailed,
    dead_letter_id,
)
from consumers.records import Record
from consumers.transactions import Staged, stage
from dedup.keys import is_valid_task_key
from dedup.ledger import Ledger, LedgerUnavailable
from service.agents.base import Agent
from service.agents.tasks import Task, canonical_json, digest, header
from service.core.metrics import Metrics
from service.core.tracing import Tracing
from service.llm.endpoints import Endpoint
from service.pipeline.base import REPLY_TO, ProcessorConfig, current_span, deadline_of, iso
from service.pipeline.delegation import reply_of
from service.pipeline.parking import export_audit

log = logging.getLogger(__name__)


def noted(letter_id: str, placed: Placed | None) -> str:
    """The ledger's note of a dead letter: its ``dlq.id`` and where it was written."""
    return f"{letter_id} {placed[0]} {placed[1]}" if placed is not None else letter_id


def placed_of(note: str) -> Placed:
    """Where a noted dead letter was written ((-1, -1): a note from before it was kept)."""
    parts = note.split()
    try:
        return (int(parts[1]), int(parts[2]))
    except (IndexError, ValueError):
        return (-1, -1)


class Outcomes:
    """The stage that writes a task's outcome: a result completed under the task's fence, a dead
    letter, a parking; each published and marked published by the record that carried it.

    Owns no state of its own: what was written and published is the ledger's."""

    def __init__(self, *, ledger: Ledger, outputs: Outputs, metrics: Metrics, tracing: Tracing,
                 clock: Callable[[], datetime], model_name: str, fallbacks: tuple[Endpoint, ...],
                 config: ProcessorConfig) -> None:
        self.ledger = ledger
        self.outputs = outputs
        self.metrics = metrics
        self.tracing = tracing
        self.clock = clock
        self.model_name = model_name
        self.fallbacks = fallbacks  # a degraded result names its fallback's URL
        self.config = config
        if outputs is not None:  # absent in pipelines built without outputs (a test's)
            outputs.announce_refused = lambda record, task_key, error: self.announce(
                record, task_key, None, "internal", error, 0)

    @contextlib.asynccontextmanager
    async def publishing(self, record: Record, task_key: str, state: str, marked: bool = False) -> AsyncIterator[None]:
        """Publish a task's outcome (the block) and mark it published by this record.

        Sent directly, the mark follows the broker's acknowledgement: a later record of the same
        task, even this one read again, then skips. Staged for a transaction, the mark comes
        first: a later record of the same task skips, this record read again (its transaction did
        not commit, or it would not be read again) stages the outcome anew. Either way the outcome
        is published, because the marking record's offset commits only with (or after) it.
        ``marked``: staged by this record already, by the script that stored the outcome.
        """
        if self.outputs.transactional:
            if not marked:
                await self.ledger.mark_published(task_key, state, record.coordinates, "staged")
            yield
        else:
            yield
            await self.ledger.mark_published(task_key, state, record.coordinates, "acked")

    def traceparent(self, incoming: str | None) -> str | None:
        return self.tracing.current_traceparent() or incoming

    async def complete(
        self,
        record: Record,
        task: Task,
        agent: Agent,
        fence: int,
        outputs: dict[str, dict[str, Any]],
        attempts: int,
        ctx: str,
        degraded: dict[str, tuple[str, str]] | None = None,
        *,
        session: Mapping[str, Any] | None = None,
        applying: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        """Write the result; ``session`` the event's ``session`` field (what the task saw of its
        session); ``applying`` the session's update, called with the stored result once the ledger
        accepted it and before it is published (docs/SESSIONS.md); ``degraded`` (step -> (endpoint, model)) names the steps a fallback
        endpoint answered: the event and the ledger record are then flagged ``degraded`` and name
        the endpoint and model (of the first such step in the agent's order; ``answered_by`` has each)."""
        result = agent.result(outputs)
        result_text = canonical_json(result)
        result_digest = digest(result_text)
        fields, endpoint = self._result_fields(task, agent, fence, result, result_digest, attempts, degraded)
        if session is not None:
            fields["session"] = dict(session)
        event = canonical_json(fields).encode()
        # staged in a transaction, the mark comes before the send: with the result, in one script
        # (not past a session's update, which comes between them)
        staged_by = record.coordinates if self.outputs.transactional and applying is None else None
        done = await self.ledger.complete(
            task.key, fence, result=result_text, digest=result_digest, event=event,
            model=fields["model"], prompt_version=agent.prompt_version, endpoint=endpoint, staged_by=staged_by,
        )
        if done.status == "already" and done.fence == fence:
            # our own COMPLETE landed but its reply was lost: publish what is stored, byte for byte
            stored = await self.ledger.get(task.key)
            if stored is None or stored.event is None:
                raise LedgerUnavailable(f"task {task.key}: stored result not readable after COMPLETE")
            event = stored.event
            result_digest = stored.fields.get("result_digest", result_digest)
        elif done.status != "ok":
            self.metrics.stale_fence_writes.inc()
            self.metrics.tasks.labels(outcome="duplicate").inc()
            log.warning("%s: write with fence %d refused (%s; holder fence %d)", ctx, fence, done.status, done.fence)
            return
        if applying is not None:  # part of completion: before the result is published
            await applying(json.loads(event).get("result"))
        await self._publish_result(record, task, agent, event, result_digest, fence, attempts, endpoint, ctx,
                                   done.marked)

    def _result_fields(
        self, task: Task, agent: Agent, fence: int, result: Any, result_digest: str, attempts: int,
        degraded: dict[str, tuple[str, str]] | None,
    ) -> tuple[dict[str, Any], str | None]:
        """The result event's fields, and the fallback endpoint that answered (None: the primary)."""
        fields: dict[str, Any] = {
            "task_id": task.key,
            "kind": task.kind,
            "outcome": "succeeded",
            "status": "succeeded",
            "result": result,
            "result_digest": result_digest,
            "fence": fence,
            "attempts": attempts,
            "model": self.model_name,
            "prompt_version": agent.prompt_version,
            "completed_at": iso(self.clock()),
        }
        endpoint = None
        if degraded:
            order = [s.name for s in agent.steps]
            steps = sorted(degraded, key=lambda name: (order.index(name) if name in order else len(order), name))
            endpoint, fields["model"] = degraded[steps[0]]
            fields.update(degraded=True, endpoint=endpoint, endpoint_url=self._endpoint_url(endpoint),
                          answered_by={name: {"endpoint": degraded[name][0], "model": degraded[name][1]}
                                       for name in steps})
        return fields, endpoint

    async def _publish_result(self, record: Record, task: Task, agent: Agent, event: bytes, result_digest: str,
                              fence: int, attempts: int, endpoint: str | None, ctx: str, marked: bool = False) -> None:
        """Publish the completed result and count it (``marked``: staged by this record already)."""
        span = current_span()
        span.set_attempts(attempts)
        span.set_output_digest(result_digest)
        async with self.publishing(record, task.key, "succeeded", marked):
            await self.outputs.result(record, task.key, event, self.traceparent(task.traceparent), deadline_of(task))
            if header(record.headers, REPLY_TO):  # a child's reply carries its result: read back only then
                await self.reply(record, task.key, task.kind, "succeeded", result=json.loads(event).get("result"))
        self.metrics.results_published.inc()
        self.metrics.task_outcome["succeeded"].inc()
        if endpoint is not None:
            self.metrics.degraded_answers.labels(kind=task.kind).inc()
        self.metrics.task_version(task.kind, agent.prompt_version, "succeeded").inc()
        span.set_outcome("succeeded")
        if endpoint is not None:
            log.warning("%s: succeeded degraded: answered by fallback endpoint %s (fence %d, attempts %d)",
                        ctx, endpoint, fence, attempts)
        else:
            log.info("%s: succeeded (fence %d, attempts %d)", ctx, fence, attempts)

    def _endpoint_url(self, name: str) -> str:
        """The base URL (without credentials) of the fallback endpoint ``name``."""
        return next((f.url for f in self.fallbacks if f.name == name), "")

    async def dead(
        self, record: Record, task: Task, fence: int, reason: str, error: str, attempts: int, ctx: str,
        ending: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Fail the task dead under its fence, then ``ending`` (its session left) and the dead letter."""
        if not await self.ledger.fail(task.key, fence, error, dead_reason=reason):
            self.metrics.stale_fence_writes.inc()
            self.metrics.tasks.labels(outcome="duplicate").inc()
            log.warning("%s: dead-letter of fence %d refused: a newer fence holds the task", ctx, fence)
            return
        await self.cancel_children(task.key)  # before publishing: a re-emit after a crash cancels again
        if ending is not None:
            await ending()
        async with self.publishing(record, task.key, "dead"):
            await self.dead_letter(record, task.key, reason, error, attempts, kind=task.kind)
            await self.reply(record, task.key, task.kind, "dead", reason=reason, error=error)

    async def reply(self, record: Record, task_key: str | None, kind: str, state: str, *, result: Any = None,
                    reason: str | None = None, error: str | None = None) -> None:
        """A child task's reply to its parent (``agent.reply_to``), sent inside the ``publishing``
        block of its outcome (staged with it in a transaction); nothing for a task that is no child."""
        reply = reply_of(record, task_key, kind, state, result=result, reason=reason, error=error,
                         reply_topics=frozenset((self.config.replies_topic, *self.config.reply_topics)))
        if reply is None:
            return
        topic, key, value = reply
        headers: Headers = [("traceparent", tp.encode())] if (tp := self.tracing.current_traceparent()) else []
        if self.outputs.transactional:  # a replies topic missing: dropped, as below, not every transaction failed
            stage(Staged(topic, key, value, headers, missing_ok=True))
            return
        try:
            await self.outputs.publisher.send(topic, key, value, headers)
        except ProduceFailed as exc:
            if exc.code not in MISSING_TOPIC_CODES:
                raise  # an outage: the record is retried, its outcome and reply sent again
            # an allowed replies topic that cannot be written is a deployment's mistake, not an
            # outage: the parent waits until its deadline ends it, nothing here is held
            log.error("task_id=%s: reply to %s not sent: %s", task_key, topic, exc)

    async def cancel_children(self, task_key: str) -> None:
        """Cancel the planned children of a task that ended dead and have no folded reply: one not
        started yet then ends ``cancelled`` without a model call."""
        journal = await self.ledger.effects.journal(task_key)
        waiting: list[str] = []
        for name, raw in journal.items():
            if not name.startswith("d:"):
                continue
            plan = json.loads(raw) if isinstance(raw, str) else raw
            step = name[2:]
            waiting += [str(e["id"]) for e in plan if f"k:{step}:{e['n']}" not in journal]
        if waiting:
            await self.ledger.children.cancel(waiting, "cancelled", int(self.config.delegation_max_wait_s))
            log.info("task_id=%s: ended dead; cancelled %d children not ended", task_key, len(waiting))

    async def dead_letter(
        self,
        record: Record,
        task_key: str | None,
        reason: str,
        error: str,
        attempts: int,
        *,
        count_outcome: bool = True,
        kind: str | None = None,
        announced: bool = True,
    ) -> None:
        """Dead-letter the record; its task's ``failed`` event follows on the results topic unless
        not ``announced`` (a ``conflict``: the task id belongs to another task, whose outcome stands)."""
        sent = await self.send_dead_letter(record, task_key, reason, error, attempts,
                                            traceparent=self.tracing.current_traceparent(), kind=kind,
                                            announced=announced)
        if not sent:
            current_span().set_outcome(f"dead_lettered:{reason}")
            return
        self.metrics.dead_letters.labels(reason=reason).inc()
        current_span().set_outcome(f"dead_lettered:{reason}")
        if count_outcome:
            self.metrics.tasks.labels(outcome="dead_lettered").inc()
        log.warning("task_id=%s %s: dead-lettered as %s: %s", task_key or "-", record.coordinates, reason, error)

    async def send_dead_letter(
        self, record: Record, task_key: str | None, reason: str, error: str, attempts: int, *,
        traceparent: str | None, kind: str | None = None, announced: bool = True,
    ) -> bool:
        """Send the record's dead letter unless the ledger notes it was sent and acknowledged before
        (False then); note it once acknowledged. The ledger unreachable, it is sent anyway: a copy
        carries the same ``dlq.id``. A record with a task id is followed by the task's ``failed``
        event on the results topic (:meth:`announce`), sent again when the dead letter was noted
        before: a crash may have come between the two."""
        announce = self.announce(record, task_key, kind, reason, error, attempts) if announced else None
        noting = not self.outputs.transactional
        if noting:
            try:
                before = await self.ledger.dead_lettered(record.topic, record.partition, record.offset)
            except LedgerUnavailable as exc:
                log.debug("%s: dead letters sent before not known (%s); sending", record.coordinates, exc)
                before = None
            if before is not None:
                log.info("task_id=%s %s: dead-lettered before (dlq.id %s); not sent again",
                         task_key or "-", record.coordinates, before.split(" ")[0])
                if announce is not None and task_key is not None:
                    await self.outputs.result(record, task_key, announce(self.outputs.dlq_topic, placed_of(before)),
                                              traceparent)
                return False
        placed = await self.outputs.dead_letter(record, reason=reason, error=error, attempts=attempts,
                                                task_id=task_key, traceparent=traceparent, announce=announce)
        if noting:
            try:
                await self.ledger.note_dead_letter(record.topic, record.partition, record.offset,
                                                   noted(dead_letter_id(record, reason), placed))
            except LedgerUnavailable as exc:
                log.warning("%s: dead letter sent but not noted (%s): a redelivery may send a copy (same dlq.id)",
                            record.coordinates, exc)
        return True

    def announce(self, record: Record, task_key: str | None, kind: str | None, reason: str, error: str,
                 attempts: int) -> Announce | None:
        """The task's ``failed`` event, given where its dead letter was written; None for a record
        without a (valid) task id: it has no results event, its dead letter is its only outcome."""
        if task_key is None or not is_valid_task_key(task_key):
            return None
        letter_id = dead_letter_id(record, reason)
        failed_at = iso(self.clock())

        def event(topic: str, placed: Placed) -> bytes:
            partition, offset = placed
            return canonical_json({
                "task_id": task_key, "kind": kind, "outcome": "failed", "status": "failed",
                "reason": reason, "error": error, "attempts": attempts, "failed_at": failed_at,
                "dead_letter": {"topic": topic, "partition": partition if partition >= 0 else None,
                                "offset": offset if offset >= 0 else None, "id": letter_id},
            }).encode()
        return event

    async def park(self, task: Task, fence: int, waiting: dict[str, Any], ctx: str) -> None:
        """Park the task in the ledger until a person decides; its offset may then be committed.
        A task waiting for its children was parked by its delegating step already."""
        if waiting["what"] != "children" and not await self.ledger.effects.park(task.key, fence, waiting):
            self.metrics.stale_fence_writes.inc()
            log.warning("%s: parking refused: a newer fence holds the task", ctx)
            return
        self.metrics.parkings.labels(what=waiting["what"]).inc()
        self.metrics.tasks.labels(outcome="parked").inc()
        current_span().set_outcome("parked")
        await self.export_audit(task.key)
        log.info("%s: parked, waiting for %s of %s (%s)", ctx, waiting["what"], waiting["key"], waiting["reason"])

    async def export_audit(self, task_key: str) -> None:
        """Send the task's new audit entries to the audit topic; a failure waits for the next pass."""
        try:
            await export_audit(self.ledger, self.outputs.publisher.send, self.config.audit_topic, task_key,
                               self.metrics)
        except Exception as exc:  # noqa: BLE001 - the audit list in Redis is the record; the topic a copy
            log.warning("task_id=%s: audit entries not exported yet: %s: %s", task_key, type(exc).__name__, exc)
