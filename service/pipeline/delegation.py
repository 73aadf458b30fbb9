"""The parent's side of delegation: a :class:`~service.agents.delegation.DelegateStep` run in the
step graph instead of a model call, and the reply a child task sends its parent when it ends.

A delegating step (docs/DELEGATION.md, "The parent's step"):

1. asks the step for its children and refuses (dead letter ``delegation``, no child sent) too many
   of them, a depth past the limit, a kind already on the path from the root (a cycle), a child id
   too long for a task key;
2. journals the plan (``ledger.children.plan``: first writer wins, so a crash re-sends the same ids
   and a replay never re-plans); the worker that journals it counts its children started and the
   step's fan-out (so each child id is counted once, whatever the replays);
3. once every child has a folded reply (``ledger.children.outcomes``), builds the output in the
   declared order: a ``required`` step with a dead child is the parent's dead letter ``child``, an
   ``optional`` one goes on ``degraded``;
4. otherwise produces every child without a reply (the same ids every time: each child's own claim
   runs it once) and parks (``ledger.children.park``): ``ended`` (the last child ended before the
   parent parked) goes back to 3, ``parked`` raises :class:`Parked` with ``what: "children"``.

Beyond the design: the plan is journaled with the parent's record (``source``, its delegation
headers kept, so a child that delegated in turn still replies to its own parent once resumed); and
a parent whose wait the sweeper expired (its decision journaled at ``w:<step>:0``) dead-letters
``expired`` instead of sending its children again, even without a deadline of its own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from consumers.producers import MISSING_TOPIC_CODES, Headers, ProduceFailed, RecordRejected
from consumers.records import Record
from dedup.effects import decision_field
from dedup.keys import is_valid_task_key
from dedup.ledger import Ledger, StaleFence
from service.agents.base import Previous
from service.agents.delegation import Delegate, DelegateOutput, DelegateStep
from service.agents.tasks import DEFAULT_TENANT, TENANT_HEADER, Task, canonical_json, header
from service.core.metrics import Metrics
from service.pipeline.base import (
    CHILD,
    DEPTH,
    PARENT,
    PARENT_STEP,
    PATH,
    REPLY_TO,
    LostFence,
    Parked,
    ProcessorConfig,
    ToDeadLetter,
    iso,
)
from service.pipeline.tools import call_key, source_of

log = logging.getLogger(__name__)

Send = Callable[[str, bytes | None, bytes | None, Headers], Awaitable[None]]

DEGRADED_BY = ("delegation", "")  # (endpoint, model) of a step that went on without a failed child


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a task stands in its tree: its depth (a root is 0) and the kinds from the root to it."""

    depth: int
    path: tuple[str, ...]


def lineage_of(headers: list[tuple[str, bytes]] | None) -> Lineage:
    """The task's depth and path from its record's headers; a header that does not read is refused."""
    raw_depth, raw_path = header(headers, DEPTH), header(headers, PATH)
    try:
        depth = int(raw_depth) if raw_depth is not None else 0
    except ValueError:
        raise ToDeadLetter("delegation", f"header {DEPTH} is not a number: {str(raw_depth)[:40]!r}", 0) from None
    if depth < 0:
        raise ToDeadLetter("delegation", f"header {DEPTH} is negative: {depth}", 0)
    path = tuple(p for p in (raw_path or "").split(",") if p)
    return Lineage(depth, path)


def planned_at(plan: Sequence[Mapping[str, Any]], now: datetime) -> datetime:
    """When the step first planned its children (``now`` for a plan journaled without the time)."""
    stamps = [e["planned_ms"] for e in plan if isinstance(e.get("planned_ms"), int)]
    return datetime.fromtimestamp(min(stamps) / 1000, UTC) if stamps else now


def child_id(parent: str, generation: int, step: str, n: int) -> str:
    """``<parent>/<step>/<n>``, or ``<parent>/g<generation>/<step>/<n>`` for a task run again."""
    return call_key(parent, generation, step, n)


def child_deadline(parent: datetime | None, now: datetime, budget_s: float | None) -> datetime | None:
    """The earlier of the parent's deadline and ``now + budget_s``; None when neither is set."""
    own = now + timedelta(seconds=budget_s) if budget_s is not None else None
    if parent is None or own is None:
        return parent if own is None else own
    return min(parent, own)


def check_plan(kind: str, step: str, children: list[Delegate], lineage: Lineage, ids: list[str],
               config: ProcessorConfig) -> None:
    """Refuse (dead letter ``delegation``) a plan past the limits, a cycle, or an id too long."""
    def refuse(why: str) -> ToDeadLetter:
        return ToDeadLetter("delegation", f"step {step}: {why}", 0)

    if len(children) > config.max_children:
        raise refuse(f"{len(children)} children, at most {config.max_children}")
    if lineage.depth + 1 > config.max_depth:
        raise refuse(f"children would be at depth {lineage.depth + 1}, at most {config.max_depth}")
    for child, cid in zip(children, ids, strict=True):
        problem = child.problem()
        if problem is not None:
            raise refuse(problem)
        if child.kind == kind or child.kind in lineage.path:
            raise refuse(f"a cycle: kind {child.kind} is already on the path {'>'.join((*lineage.path, kind))}")
        if not is_valid_task_key(cid):
            raise refuse(f"child id {cid[:80]}... is not a valid task key (200 characters at most)")


def child_headers(task: Task, record: Record | None, step: str, n: int, lineage: Lineage, reply_to: str,
                  traceparent: str | None) -> Headers:
    """The headers of child ``n``: its parent, step and place, where to reply, its depth and path."""
    headers: Headers = [
        (PARENT, task.key.encode()), (PARENT_STEP, step.encode()), (CHILD, str(n).encode()),
        (REPLY_TO, reply_to.encode()), (DEPTH, str(lineage.depth + 1).encode()),
        (PATH, ",".join((*lineage.path, task.kind)).encode()),
    ]
    if traceparent:
        headers.append(("traceparent", traceparent.encode()))
    if task.tenant != DEFAULT_TENANT:
        headers.append((TENANT_HEADER, task.tenant.encode()))
    return headers


def child_value(task: Task, cid: str, child: Delegate, deadline: datetime | None) -> bytes:
    """The child's task event: its id, kind and input, its deadline, the parent's priority and tenant."""
    event: dict[str, Any] = {"task_id": cid, "kind": child.kind, "input": child.input,
                             "deadline": iso(deadline) if deadline is not None else None,
                             "priority": task.event.priority}
    if task.tenant != DEFAULT_TENANT:
        event["tenant"] = task.tenant
    return canonical_json(event).encode()


def build_output(step: DelegateStep, plan: list[dict[str, Any]], replies: Mapping[int, dict[str, Any]]
                 ) -> dict[str, Any]:
    """The step's output in the declared order; a dead child of a required step is its dead letter."""
    children: list[dict[str, Any]] = []
    degraded = False
    for entry in sorted(plan, key=lambda e: int(e["n"])):
        n = int(entry["n"])
        reply = replies[n]
        state = "succeeded" if reply.get("state") == "succeeded" else "dead"
        child: dict[str, Any] = {"n": n, "id": entry["id"], "kind": entry["kind"], "state": state}
        if state == "succeeded":
            child["result"] = reply.get("result")
        else:
            reason, error = str(reply.get("reason") or "permanent"), str(reply.get("error") or "")
            if step.mode == "required":
                raise ToDeadLetter("child", f"{entry['id']} ({entry['kind']}): {reason}: {error}"[:2000], 0)
            child.update(reason=reason, error=error)
            degraded = True
        children.append(child)
    return DelegateOutput.model_validate({"children": children, "degraded": degraded}).model_dump(
        mode="json", exclude_none=True)


def parent_source(record: Record) -> dict[str, Any]:
    """The parent's record to produce again on resumption, its delegation headers kept (a child that
    delegated in turn must still reply to its own parent once resumed)."""
    return source_of(record)


class Delegation:
    """The run of one delegating step of one task, under one claim (see the module docstring)."""

    def __init__(self, *, ledger: Ledger, send: Send, config: ProcessorConfig, clock: Callable[[], datetime],
                 traceparent: str | None, task: Task, fence: int, record: Record | None, attempts: int,
                 metrics: Metrics | None = None) -> None:
        self.ledger, self.send, self.config, self.clock, self.metrics = ledger, send, config, clock, metrics
        self.traceparent, self.task, self.fence, self.record, self.attempts = traceparent, task, fence, record, attempts

    async def run(self, step: DelegateStep, task_input: BaseModel, previous: Previous) -> dict[str, Any]:
        """The step's output once every child has ended; raises :class:`Parked` while they run."""
        task = self.task
        lineage = lineage_of(self.record.headers if self.record is not None else None)
        children = list(step.children(task_input, previous))
        generation = await self.ledger.generation(task.key)
        ids = [child_id(task.key, generation, step.name, n) for n in range(len(children))]
        check_plan(task.kind, step.name, children, lineage, ids, self.config)
        now_ms = int(self.clock().timestamp() * 1000)
        wanted = [{"n": n, "id": cid, "kind": c.kind, "topic": c.topic or self.config.input_topic, "planned_ms": now_ms}
                  for n, (c, cid) in enumerate(zip(children, ids, strict=True))]
        source = parent_source(self.record) if self.record is not None else None
        try:
            journaled, plan = await self.ledger.children.plan_once(task.key, self.fence, step.name, wanted,
                                                                   source=source)
        except StaleFence as exc:
            raise LostFence(str(exc)) from exc
        if journaled and self.metrics is not None:  # once per plan, so once per child id
            self.metrics.fanout.labels(task.kind).observe(len(plan))
            for entry in plan:
                self.metrics.children_started.labels(str(entry["kind"])).inc()
        if [(int(e["n"]), e["id"]) for e in plan] != [(e["n"], e["id"]) for e in wanted]:
            raise ToDeadLetter("delegation", f"step {step.name}: its children differ from those it planned", 0)
        # the plan's time, not this run's: a parent taken over or read again waits no longer, and a
        # child sent again has no more time, than when the step first planned them
        planned = planned_at(plan, self.clock())
        wait_until = task.deadline or planned + timedelta(seconds=self.config.delegation_max_wait_s)
        for _ in range(2):  # a second pass when the last child ended before the parent parked
            replies = await self.ledger.children.outcomes(task.key, step.name)
            if all(int(e["n"]) in replies for e in plan):
                return build_output(step, plan, replies)
            if await self._expired(step):
                raise ToDeadLetter("expired", f"step {step.name}: its children had not all ended by the wait's "
                                   "deadline", self.attempts)
            await self._produce(step, children, plan, replies, lineage, planned)
            await self._park(step, plan, wait_until)
        raise ToDeadLetter("delegation", f"step {step.name}: the ledger said its children ended but not all "
                           "replies are folded", self.attempts)

    async def _expired(self, step: DelegateStep) -> bool:
        """Whether the sweeper expired the step's wait (its decision, journaled once)."""
        decided = (await self.ledger.effects.journal(self.task.key)).get(decision_field("children", step.name, 0))
        if isinstance(decided, str | bytes):
            decided = json.loads(decided)
        return isinstance(decided, dict) and decided.get("decision") == "expired"

    async def _produce(self, step: DelegateStep, children: list[Delegate], plan: list[dict[str, Any]],
                       replies: Mapping[int, Any], lineage: Lineage, planned: datetime) -> None:
        """Send every planned child without a reply yet (the same id and deadline every time)."""
        task = self.task
        for entry in plan:
            n = int(entry["n"])
            if n in replies:
                continue
            child = children[n]
            value = child_value(task, entry["id"], child, child_deadline(task.deadline, planned, child.budget_s))
            headers = child_headers(task, self.record, step.name, n, lineage, self.config.replies_topic,
                                    self.traceparent)
            await self._send(str(entry["topic"]), str(entry["id"]), value, headers)

    async def _send(self, topic: str, child: str, value: bytes, headers: Headers) -> None:
        """Send one child; a topic that cannot be written (it does not exist, or this service may not
        write it) or a child the broker refuses for good is the parent's dead letter ``delegation``,
        not an outage retried for ever with its partition held."""
        try:
            await self.send(topic, child.encode(), value, headers)
        except RecordRejected as exc:
            raise ToDeadLetter("delegation", f"child {child} refused by topic {topic}: {exc}"[:500], 0) from exc
        except ProduceFailed as exc:
            if exc.code not in MISSING_TOPIC_CODES:
                raise
            raise ToDeadLetter("delegation", f"child {child}: topic {topic} cannot be written: {exc}"[:500],
                               0) from exc

    async def _park(self, step: DelegateStep, plan: list[dict[str, Any]], wait_until: datetime) -> None:
        """Park until every child has ended; returns when they all ended already (``ended``)."""
        now = self.clock()
        waiting: dict[str, Any] = {
            "what": "children", "step": step.name, "ordinal": 0, "key": f"{self.task.key}/{step.name}", "tool": "",
            "reason": f"{len(plan)} children of step {step.name}", "children": [e["id"] for e in plan],
            "since_ms": int(now.timestamp() * 1000), "deadline_ms": int(wait_until.timestamp() * 1000),
        }
        status = await self.ledger.children.park(self.task.key, self.fence, step.name, waiting)
        if status == "parked":
            raise Parked(waiting)
        if status == "stale":
            raise LostFence(f"task {self.task.key}: a newer fence holds it; not parked")


_PLACE = re.compile(r"[0-9]{1,9}")  # a child's place: ASCII digits only (int() reads "²" and "٣" too)


def place_of(text: str | None) -> int | None:
    """A child's place ``n`` from its header, or None when it is no plain number."""
    return int(text) if text is not None and _PLACE.fullmatch(text) else None


def reply_of(record: Record, task_key: str | None, kind: str, state: str, *, result: Any = None,
             reason: str | None = None, error: str | None = None,
             reply_topics: frozenset[str] = frozenset()) -> tuple[str, bytes, bytes] | None:
    """The reply a child task sends its parent when it ends: (topic, key, value), or None for a task
    that is no child (no ``agent.reply_to``, or headers that do not name a parent and place), or
    whose ``agent.reply_to`` is none of ``reply_topics`` (this deployment's replies topic and the
    ones ``AGENT_DELEGATION__REPLY_TOPICS`` allows): a record's header must not make the service
    write to any topic it names."""
    headers = record.headers
    topic, parent, step, n = (header(headers, REPLY_TO), header(headers, PARENT), header(headers, PARENT_STEP),
                              place_of(header(headers, CHILD)))
    if not topic or not parent or not step or n is None:
        return None
    if topic not in reply_topics:
        log.warning("task_id=%s: no reply to %r: not a replies topic this deployment may write "
                    "(AGENT_DELEGATION__REPLY_TOPICS)", task_key, topic[:100])
        return None
    if task_key is None:  # a record whose value does not decode: a child is keyed by its id
        task_key = record.key.decode("utf-8", "replace") if record.key else f"{parent}/{step}/{n}"
    value: dict[str, Any] = {"parent": parent, "step": step, "n": n, "task_id": task_key, "kind": kind,
                             "state": "succeeded" if state == "succeeded" else "dead"}
    if state == "succeeded":
        value["result"] = result
    else:
        value.update(reason=reason or "permanent", error=(error or "")[:2000])
    return topic, parent.encode(), canonical_json(value).encode()
