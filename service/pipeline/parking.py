"""What happens to a task's side effects after its records: the audit topic, decisions on parked
tasks, their deadlines, compensation and a fresh run.

A parked task (waiting for an approval, or for an operator to say whether a call landed) has had
its Kafka offset committed: the ledger holds the obligation. A decision is recorded once, by a
script (a second decision finds the task no longer waiting), and resumes the task by putting its
original record on its topic again, so any replica picks it up through the ordinary pipeline,
claims it, replays its journal and continues from the decided call. Every replica sweeps the
parked list for deadlines that passed (decided ``expired``) and for decisions whose resumption
was not produced (the producer failed after the decision).

Which decision a wait accepts, and which move each makes, is the table of
:data:`~dedup.lifecycles.parked.PARKED`; the ledger's side of each move is one script of
:mod:`dedup.effects` (``park``, ``resolve``, ``rerun``), and this module makes the rest: a decision
(:func:`decide`, whoever takes it: the API, the console, the approvals topic, the CLI), an expiry
and a resumption not yet produced (:func:`sweep`), and a compensated task's new run
(:func:`compensate`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from consumers.producers import Headers
from dedup.effects import BUSY, DECISION_PREFIX
from dedup.ledger import Ledger, TaskRecord
from dedup.lifecycles.machine import IllegalTransition
from dedup.lifecycles.parked import DECISIONS, LEDGER_STATE, PARKED, WAITING, parked_state
from dedup.lifecycles.tool_call import TOOL_CALL, call_state
from service.agents.base import Agent
from service.agents.registry import AgentRegistry
from service.agents.tasks import canonical_json, digest
from service.agents.tools import Tool, ToolCall, run_bounded
from service.core.metrics import Metrics
from service.pipeline.base import iso
from service.pipeline.tools import audit_entry

log = logging.getLogger(__name__)

Send = Callable[[str, bytes | None, bytes | None, Headers], Awaitable[None]]

__all__ = ["DECISIONS", "RESUME_RETRY_MS", "Busy", "Compensation", "Decided", "NotDecidable", "Send", "compensate",
           "decide", "export_audit", "resume", "side_effects", "sweep", "waiting_parents"]

RESUME_RETRY_MS = 30_000


class NotDecidable(Exception):
    """The decision does not fit what the task waits for (or it waits for nothing)."""


class Busy(Exception):
    """The task is running or waiting: compensate it once it has ended."""


async def export_audit(ledger: Ledger, send: Send, topic: str, task_key: str, metrics: Metrics) -> int:
    """Send the task's audit entries not yet on ``topic`` (key: task id; ``index`` orders them and
    lets a consumer drop a repeat). At least once: a crash before the mark sends them again."""
    effects = ledger.effects
    start = await effects.exported(task_key)
    entries = await effects.audit(task_key, start)
    if not entries:
        return 0
    await asyncio.gather(*(send(topic, task_key.encode(), canonical_json({**entry, "index": i}).encode(), [])
                           for i, entry in enumerate(entries, start)))
    await effects.mark_exported(task_key, start + len(entries))
    metrics.audit_exports.inc(len(entries))
    return len(entries)


async def resume(send: Send, source: dict[str, Any], why: str) -> None:
    """Put the task's original record on its topic again, marked ``agent.resumed``."""
    headers: Headers = [(name, base64.b64decode(value)) for name, value in source.get("headers", [])]
    headers.append(("agent.resumed", why.encode()))
    key = base64.b64decode(source["key"]) if source.get("key") is not None else None
    value = base64.b64decode(source["value"]) if source.get("value") is not None else None
    await send(source["topic"], key, value, headers)


@dataclass(frozen=True, slots=True)
class Decided:
    status: str  # decided | resumed_again (decided before; its resumption produced once more)
    task_id: str
    decision: str  # what is recorded: with resumed_again, the earlier decision, not the one asked for
    what: str


async def decide(ledger: Ledger, send: Send, metrics: Metrics, now: datetime, task_key: str, decision: str, *,
                 by: str, reason: str = "", result: Any = None, audit_topic: str | None = None) -> Decided:
    """Record ``decision`` for the call the task waits on, once, and resume the task.

    Raises :class:`KeyError` for an unknown task and :class:`NotDecidable` when it waits for
    nothing or for something else; a task already decided is resumed again (harmless: its claim
    finds it running or done), so a caller whose first try failed to produce can simply repeat.
    """
    record = await ledger.get(task_key)
    if record is None:
        raise KeyError(task_key)
    state = parked_state(record.state)
    if state is not None and PARKED.allows(state, "resume"):  # decided before; perhaps never produced
        journal = await _resume_stored(ledger, send, task_key, "again", state)
        decided = [v for k, v in journal.items() if k[:2] in DECISION_PREFIX.values() and isinstance(v, dict)]
        latest = max(decided, key=lambda d: str(d.get("at", "")), default={})
        return Decided("resumed_again", task_key, str(latest.get("decision", "")), "")
    if state is None or "waiting" not in record.fields:
        raise NotDecidable(f"task {task_key} is {record.state}, not waiting for a decision")
    waiting_raw = record.fields["waiting"]
    waiting = json.loads(waiting_raw)
    what = waiting["what"]
    try:
        moved_to = PARKED.move(WAITING[what], decision)
    except IllegalTransition:
        raise NotDecidable(f"task {task_key} waits for {what}: the decision is one of "
                           f"{', '.join(DECISIONS[what])}") from None
    at = iso(now)
    listed_at = await ledger.effects.listed_at(task_key)  # the wait's listing, to end it and no later one
    entry = {"at": at, "task_id": task_key, "step": waiting["step"], "ordinal": waiting["ordinal"],
             "key": waiting["key"], "tool": waiting["tool"], "outcome": f"{what}:{decision}", "by": by,
             "reason": reason[:500], "worker": None, "fence": None}
    status, source = await ledger.effects.resolve(
        task_key, waiting_raw, {"decision": decision, "by": by, "reason": reason[:500], "at": at, "result": result},
        entry)
    if status != "ok":
        raise NotDecidable(f"task {task_key} is {source}, not waiting for a decision")
    metrics.decisions.labels(decision=decision).inc()
    log.info("task_id=%s: %s %s by %s; resuming", task_key, what, decision, by)
    PARKED.move(moved_to, "resume")
    try:
        await resume(send, json.loads(source), decision)
    except Exception:
        # decided but not resumed: the sweeper produces it again soon
        await ledger.effects.relist(task_key, now.timestamp() * 1000 + RESUME_RETRY_MS)
        raise
    if listed_at is not None:  # resumed: unless it was parked again meanwhile (listed with its new deadline)
        await ledger.effects.unlist_at(task_key, listed_at)
    if audit_topic is not None:
        await export_audit(ledger, send, audit_topic, task_key, metrics)
    return Decided("decided", task_key, decision, what)


async def _resume_stored(ledger: Ledger, send: Send, task_key: str, why: str, state: str) -> dict[str, Any]:
    """Produce the task's record again from its journal (a move of :data:`PARKED` from ``state``);
    returns the journal."""
    PARKED.move(state, "resume")
    journal = await ledger.effects.journal(task_key)
    listed_at = await ledger.effects.listed_at(task_key)
    source = journal.get("source")
    if isinstance(source, dict):
        await resume(send, source, why)
    if listed_at is not None:  # unless it was parked again meanwhile
        await ledger.effects.unlist_at(task_key, listed_at)
    return journal


async def side_effects(ledger: Ledger, task_key: str) -> dict[str, Any]:
    """The task's tool calls, decisions and undos (each with its step and ordinal), and its audit trail."""
    journal = await ledger.effects.journal(task_key)
    grouped: dict[str, list[dict[str, Any]]] = {"c:": [], "a:": [], "u:": []}
    for name, value in journal.items():
        prefix = "a:" if name[:2] in DECISION_PREFIX.values() else name[:2]  # approvals and answers
        if prefix in grouped and isinstance(value, dict):
            step, _, ordinal = name[2:].rpartition(":")
            grouped[prefix].append({"step": step, "ordinal": int(ordinal), **value})
    calls = sorted(grouped["c:"], key=lambda c: (c.get("seq") or 0, c["step"], c["ordinal"]))
    return {"tool_calls": calls, "decisions": grouped["a:"], "undos": grouped["u:"],
            "audit": await ledger.effects.audit(task_key)}


async def sweep(ledger: Ledger, send: Send, metrics: Metrics, now: datetime, audit_topic: str | None = None) -> int:
    """Expire parked tasks past their deadline (a parent waiting for its children too: decided
    ``expired`` at ``w:<step>:0``, its record produced again, and the resumed parent dead-letters
    ``expired``) and resume decided ones not yet resumed; returns how many it acted on. Safe on every
    replica at once: each decision is taken once by its script."""
    acted = 0
    for task_key, _deadline in await ledger.effects.parked(limit=500, until_ms=now.timestamp() * 1000):
        record = await ledger.get(task_key)
        state = parked_state(record.state, listed=True) if record is not None else None
        try:
            if state is not None and PARKED.allows(state, "expired"):
                await decide(ledger, send, metrics, now, task_key, "expired", by="deadline", audit_topic=audit_topic)
                acted += 1
            elif state is not None and PARKED.allows(state, "resume"):
                await _resume_stored(ledger, send, task_key, "again", state)
                acted += 1
            else:  # running or ended: unless parked again meanwhile (listed then with its deadline)
                await ledger.effects.unlist_at(task_key, _deadline)
        except NotDecidable:  # decided by someone else meanwhile
            continue
    metrics.parked_tasks.set(await ledger.effects.parked_count())
    metrics.waiting_parents.set(await waiting_parents(ledger))
    return acted


async def waiting_parents(ledger: Ledger, limit: int = 1000) -> int:
    """How many of the listed tasks (the first ``limit``, earliest deadline first) are parents
    waiting for their children."""
    listed = await ledger.effects.parked(limit=limit)
    records = await asyncio.gather(*(ledger.get(task_key) for task_key, _ in listed))
    return sum(1 for r in records if r is not None and r.state == LEDGER_STATE["waiting_children"])


# -- compensation ---------------------------------------------------------------------------------


@dataclass
class Compensation:
    task_id: str
    undone: list[str] = field(default_factory=list)  # keys of calls undone now
    already: list[str] = field(default_factory=list)  # undone by an earlier compensation
    skipped: list[str] = field(default_factory=list)  # calls whose tool has no undo
    failed: dict[str, str] = field(default_factory=dict)  # key -> error (compensation stopped there)
    rerun: bool = False


def _undoable(rec: Any) -> bool:
    """Whether the journal record of a call is in a state :data:`TOOL_CALL` may undo."""
    try:
        return TOOL_CALL.allows(call_state(rec), "undo")
    except ValueError:  # a record of no known state
        return False


def _tool(agent: Agent | None, step: str, name: str) -> Tool | None:
    versions = [agent, agent.candidate] if agent is not None else []
    for version in versions:
        if version is None:
            continue
        for candidate in version.steps:
            if candidate.name == step:
                found = next((t for t in candidate.tools if t.name == name), None)
                if found is not None:
                    return found
    return None


async def compensate(ledger: Ledger, agents: AgentRegistry, send: Send, metrics: Metrics,
                     clock: Callable[[], datetime], task_key: str, *, by: str, rerun: bool = False,
                     audit_topic: str | None = None) -> Compensation:
    """Undo the task's side effects in reverse order, each once, then (``rerun``) start it again as
    a new generation. Stops at the first undo that fails: the rest wait for the next try.

    Raises :class:`KeyError` for an unknown task and :class:`Busy` while it runs or waits."""
    record = await ledger.get(task_key)
    if record is None:
        raise KeyError(task_key)
    if record.state in BUSY:
        raise Busy(f"task {task_key} is {record.state}: compensate it once it has ended")
    journal = await ledger.effects.journal(task_key)
    kind = record.fields.get("kind", "")
    agent = agents.get(kind) if kind in agents.kinds() else None
    report = Compensation(task_key)
    generation = int(record.fields.get("generation", "1"))
    calls = sorted(((name, rec) for name, rec in journal.items() if name.startswith("c:") and _undoable(rec)),
                   key=lambda item: -int(item[1].get("seq") or 0))
    for name, rec in calls:
        await _undo_one(ledger, agent, metrics, clock, record, generation, journal, name, rec, by, report)
        if report.failed:
            break
    if audit_topic is not None:
        await export_audit(ledger, send, audit_topic, task_key, metrics)
    if rerun and not report.failed:
        # listed before the state changes: a resumption never produced (the producer failed, the
        # process died) leaves the task `resuming` and listed (`decided`), and the sweeper produces it
        retry_at = clock().timestamp() * 1000 + RESUME_RETRY_MS
        await ledger.effects.relist(task_key, retry_at, keep=True)
        status, source = await ledger.effects.rerun(task_key, generation)
        if status != "ok":
            raise Busy(f"task {task_key} cannot run again: {source}")
        PARKED.move(PARKED.target("rerun"), "resume")
        try:
            await resume(send, json.loads(source), "rerun")
        except Exception:
            log.warning("task_id=%s: compensated and set to run again; its record was not produced: "
                        "the sweeper produces it", task_key)
            raise
        await ledger.effects.unlist_at(task_key, retry_at)
        report.rerun = True
    return report


async def _undo_one(ledger: Ledger, agent: Agent | None, metrics: Metrics, clock: Callable[[], datetime],
                    record: TaskRecord, generation: int, journal: dict[str, Any], name: str, rec: dict[str, Any],
                    by: str, report: Compensation) -> None:
    step, _, ordinal = name[2:].rpartition(":")  # c:<step>:<ordinal>
    key = rec["key"]
    tool = _tool(agent, step, rec["tool"])
    if tool is None or not tool.can_undo:
        report.skipped.append(key)
        metrics.compensations.labels(outcome="skipped").inc()
        return
    undo_field = "u:" + name[2:]
    if (journal.get(undo_field) or {}).get("state") == "done":
        report.already.append(key)
        return
    call = ToolCall(key=key, task_id=record.task_key, step=step, ordinal=int(ordinal), tool=tool.name,
                    arguments=rec.get("arguments") or {}, fence=record.fence)
    status = await ledger.effects.undo(record.task_key, undo_field, {"state": "intent", "by": by, "at": iso(clock())},
                                       None)
    if status == "busy":
        raise Busy(f"task {record.task_key} started again while it was being compensated")
    if status == "done":
        report.already.append(key)
        return
    try:
        result = await run_bounded(tool.undo(call, rec.get("result")), tool.timeout_s, f"undo of {tool.name}")
    except Exception as exc:  # noqa: BLE001 - reported; the next compensation tries again with the same key
        report.failed[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
        metrics.compensations.labels(outcome="failed").inc()
        return
    TOOL_CALL.move(call_state(rec), "undo")
    entry = audit_entry(record.task_key, generation, call, "compensated", by, None,
                        None if result is None else digest(canonical_json(result)), clock())
    await ledger.effects.undo(record.task_key, undo_field, {"state": "done", "by": by, "at": iso(clock()),
                                                            "result": result}, entry)
    report.undone.append(key)
    metrics.compensations.labels(outcome="undone").inc()
