"""A step's tool-call loop, with every tool call run once by construction.

The model answers a step with tools either with its output or with tool calls. Each round of
calls is journaled as the model asked for it, before any runs, so a resumed task rebuilds the same
conversation instead of asking again (and getting other calls). Each call then goes through:

    arguments checked against the tool's schema      invalid: the model is told, nothing runs
    approval (Step.approval)                          parks the task until a person decides
    intent journaled (key, tool, argument digest, fence; a stale fence is refused here)
    the tool runs with the call's idempotency key
    result journaled, with its audit entry

and is re-used from the journal whenever the task comes back. A call whose intent is journaled and
whose result is not (the worker died in between, or the tool could not tell) is reconciled first:
the tool asks the downstream whether the key landed; "landed" records that result, "absent" runs
it again with the same key, and "cannot tell" parks the task for an operator.

A call whose caller gave up may still be in flight downstream: it is asked about only once the
tool's settle time (:attr:`Tool.settle_s`, its timeout by default) has passed since the caller
gave up, and "in progress" answers (202, 409, a pending status) are asked again later, never run
again; past the task's deadline or :data:`_PENDING_CHECKS` checks the outcome is unknown: parked.
A reason stored for a parked task or logged carries no URL's userinfo, query or fragment.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

from pydantic import BaseModel

from consumers.records import Record
from dedup.effects import answer_of, approval_of
from dedup.ledger import Ledger
from dedup.lifecycles.tool_call import OUTCOME_EVENT, TOOL_CALL, call_state
from service.agents.base import Previous, Step
from service.agents.tasks import Task, canonical_json, digest, loads
from service.agents.tools import Reconciled, Tool, ToolCall, ToolError, ToolUnknown, run_bounded, scrub_urls
from service.core.metrics import Metrics
from service.llm.scrub import scrub
from service.pipeline.base import LINEAGE_HEADERS, LostFence, Parked, ToDeadLetter, current_span, iso


class Steps(Protocol):
    """What the loop uses of the call loop (:class:`service.pipeline.calls.CallLoop`): one step's
    model calls to an output or the tools asked for, the ledger, and the audit export."""

    ledger: Ledger
    metrics: Metrics
    clock: Callable[[], datetime]
    worker_id: str

    async def call_step(self, task: Task, step: Step, task_input: BaseModel, previous: Previous,
                        fence: int, attempts: int, *, conversation: list[dict[str, Any]] | None = None,
                        offer_tools: bool = False,
                        answered: list[tuple[str, str]] | None = None) -> tuple[Any, int]: ...

    async def export_audit(self, task_key: str) -> None: ...

log = logging.getLogger(__name__)

# how often one processing of a task runs a call again after the downstream said it did not land
_RUNS_PER_CALL = 3
# how often a call the downstream reports in progress is asked about again before it parks
_PENDING_CHECKS = 10
_PENDING_POLL_MAX_S = 30.0


def safe_text(text: str) -> str:
    """``text`` fit to store in a reason, log or show: URLs cut down, credentials redacted."""
    return scrub(scrub_urls(text))


def source_of(record: Record) -> dict[str, Any]:
    """What is needed to put the task's record on its topic again (to resume it after a decision):
    its headers but the service's own marks (``agent.resumed``), a child's place in its tree kept."""
    return {
        "topic": record.topic, "partition": record.partition, "offset": record.offset,
        "key": _b64(record.key), "value": _b64(record.value),
        "headers": [[name, _b64(value)] for name, value in record.headers
                    if not name.startswith("agent.") or name in LINEAGE_HEADERS],
    }


def _b64(value: bytes | None) -> str | None:
    return base64.b64encode(value).decode() if value is not None else None


def call_key(task_key: str, generation: int, step: str, ordinal: int) -> str:
    """The idempotency key of a call: the work (task, step, ordinal), never the attempt. A task
    compensated and run again is a new generation, whose calls must not be deduplicated against
    the undone ones."""
    if generation <= 1:
        return f"{task_key}/{step}/{ordinal}"
    return f"{task_key}/g{generation}/{step}/{ordinal}"


class ToolLoop:
    """The model's tool-call loop for one step of one task, under one claim."""

    def __init__(self, steps: Steps, task: Task, step: Step, task_input: BaseModel, previous: Previous,
                 fence: int, attempts: int, record: Record | None,
                 answered: list[tuple[str, str]] | None = None) -> None:
        self.steps, self.task, self.step, self.task_input = steps, task, step, task_input
        self.answered = answered  # (endpoint, model) of each round's answer
        self.previous, self.fence, self.attempts = previous, fence, attempts
        self.source = source_of(record) if record is not None else None
        self.effects = steps.ledger.effects
        self.tools: dict[str, Tool] = {t.name: t for t in step.tools}
        self.journal: dict[str, Any] = {}
        self.unknown: set[str] = set()  # calls whose intent this worker knows no outcome of (by field)
        self.generation = 1

    async def run(self) -> dict[str, Any]:
        """Run the loop to the step's output; raises :class:`Parked` when a person must decide."""
        self.journal = await self.effects.journal(self.task.key)
        self.generation = await self.steps.ledger.generation(self.task.key)
        name = self.step.name
        conversation: list[dict[str, Any]] = list(self.step.messages(self.task_input, self.previous))
        ordinal = 0
        for round_ in range(1, self.step.max_tool_rounds + 2):
            decided = self.journal.get(f"r:{name}:{round_}")
            if decided is None:
                answer = await self._ask(conversation, offer=round_ <= self.step.max_tool_rounds)
                if isinstance(answer, dict):
                    # best effort: a parked task is exported by the processor, a decision by its maker
                    await self.steps.export_audit(self.task.key)
                    return answer
                for _asked in answer:  # each call of the round is asked once the round is journaled
                    TOOL_CALL.move(TOOL_CALL.initial, "ask")
                round_record: dict[str, Any] = {"calls": list(answer), "fence": self.fence,
                                                "at": iso(self.steps.clock())}
                if self.answered:  # who asked for these calls: a resumed task stays flagged degraded
                    round_record["endpoint"], round_record["model"] = self.answered[-1]
                decided = await self._first(f"r:{name}:{round_}", round_record)
            elif self.answered is not None and decided.get("endpoint"):
                self.answered.append((str(decided["endpoint"]), str(decided.get("model", ""))))
            conversation.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in decided["calls"]]})
            for asked in decided["calls"]:
                ordinal += 1
                result = await self._call(asked, ordinal)
                conversation.append({"role": "tool", "tool_call_id": asked["id"], "content": canonical_json(result)})
        raise AssertionError("the last round offers no tools")  # pragma: no cover

    async def _ask(self, conversation: list[dict[str, Any]], *, offer: bool) -> Any:
        answer, attempts = await self.steps.call_step(self.task, self.step, self.task_input, self.previous,
                                                      self.fence, self.attempts, conversation=conversation,
                                                      offer_tools=offer, answered=self.answered)
        self.attempts = max(self.attempts, attempts)
        return answer

    async def _first(self, field: str, value: dict[str, Any]) -> dict[str, Any]:
        """Journal ``value`` unless something is there; returns what is journaled."""
        await self._intend(field, value)
        return dict(self.journal[field])

    async def _intend(self, field: str, value: dict[str, Any]) -> bool:
        """Journal ``value`` at ``field`` under this fence: True when it is ours, False when something
        was there already; a newer claim holding the task stops this worker (nothing runs)."""
        status, recorded = await self.effects.first(self.task.key, self.fence, field, value, self.source)
        if status == "stale":
            raise LostFence(f"task {self.task.key}: fence {self.fence} no longer holds the task")
        self.journal[field] = recorded
        return status == "ok"

    # -- one call ---------------------------------------------------------------------------------

    async def _call(self, asked: dict[str, str], ordinal: int) -> Any:
        field = f"c:{self.step.name}:{ordinal}"
        record = self.journal.get(field)
        tool = self.tools.get(asked["name"])
        label = tool.name if tool is not None else "unknown"
        if record is not None and record["state"] != "intent":
            self._count(label, "replayed")
            return record["result"]
        call = self._call_of(asked, ordinal)
        if record is None:
            refusal = self._refusal(tool, call, asked, ordinal)
            if refusal is not None:
                self._count(label, refusal[0])
                self._move(field, "refuse")
                recorded = await self._first(field, self._record(call, refusal[0], {"error": refusal[1]}))
                return recorded["result"]
            assert tool is not None
            await self._approved(call, ordinal)
            self._move(field, "intend")
            if not await self._intend(field, self._record(call, "intent", None)):
                return await self._call(asked, ordinal)  # journaled meanwhile: replay or reconcile it
            return await self._execute(tool, call, field)
        assert tool is not None  # an intent is only journaled for a known tool
        return await self._reconcile(tool, call, field, ordinal)

    def _move(self, field: str, event: str) -> str:
        """Move the call at ``field`` by ``event`` of :data:`TOOL_CALL`, before the journal is written:
        :class:`~dedup.lifecycles.IllegalTransition` when the table has no such move from its state."""
        current = "unknown" if field in self.unknown else call_state(self.journal.get(field))
        state = TOOL_CALL.move(current, event)
        if state == "unknown":  # never journaled as such: an intent whose outcome this worker lost
            self.unknown.add(field)
        else:
            self.unknown.discard(field)
        return state

    def _call_of(self, asked: dict[str, str], ordinal: int) -> ToolCall:
        try:
            arguments = loads(asked["arguments"])
        except ValueError:
            arguments = None
        return ToolCall(key=call_key(self.task.key, self.generation, self.step.name, ordinal),
                        task_id=self.task.key, step=self.step.name, ordinal=ordinal, tool=asked["name"],
                        arguments=arguments if isinstance(arguments, dict) else {}, fence=self.fence,
                        traceparent=current_span().traceparent or self.task.traceparent)

    def _refusal(self, tool: Tool | None, call: ToolCall, asked: dict[str, str], ordinal: int) -> tuple[str, str] | None:
        """Why the call must not run (outcome, what the model is told), or None."""
        if ordinal > self.step.max_tool_calls:
            return "limit", f"no more tool calls: the step allows {self.step.max_tool_calls}"
        if tool is None:
            return "invalid", f"there is no tool named {asked['name'][:64]!r}"
        try:
            arguments = loads(asked["arguments"])
        except ValueError:
            return "invalid", "the arguments are not JSON"
        problem = tool.invalid(arguments)
        return ("invalid", f"invalid arguments: {problem}") if problem is not None else None

    async def _approved(self, call: ToolCall, ordinal: int) -> None:
        """Return when the call may run: it needs no approval or was approved; else park or end."""
        reason = self.step.approval(self.task_input, call)
        if reason is None:
            return
        decision = approval_of(self.journal, self.step.name, ordinal)
        if decision is None:
            raise Parked(self._waiting("approval", call, reason))
        if decision["decision"] == "approved":
            return
        why = decision.get("reason") or ""
        if decision["decision"] == "expired":
            raise ToDeadLetter("expired", f"tool call {call.key} waited for approval past its deadline",
                               self.attempts)
        raise ToDeadLetter("rejected", f"tool call {call.key} rejected by {decision.get('by', '?')}: {why}"[:500],
                           self.attempts)

    def _waiting(self, what: str, call: ToolCall, reason: str) -> dict[str, Any]:
        now_ms = int(self.steps.clock().timestamp() * 1000)
        return {"what": what, "step": self.step.name, "ordinal": call.ordinal, "tool": call.tool, "key": call.key,
                "arguments": call.arguments, "reason": safe_text(reason)[:500], "since_ms": now_ms,
                "deadline_ms": now_ms + int(self.step.approval_timeout_s * 1000), "fence": self.fence}

    def _record(self, call: ToolCall, state: str, result: Any) -> dict[str, Any]:
        return {
            "state": state, "key": call.key, "tool": call.tool, "arguments": call.arguments,
            "args_digest": digest(canonical_json(call.arguments)), "fence": self.fence,
            "worker": self.steps.worker_id, "intent_at": iso(self.steps.clock()),
            "result": result, "result_digest": digest(canonical_json(result)) if result is not None else None,
        }

    async def _execute(self, tool: Tool, call: ToolCall, field: str) -> Any:
        """Run the call (with its key), up to a few times while the downstream says it did not land."""
        for _ in range(_RUNS_PER_CALL):
            try:
                result = await run_bounded(tool.run(call), tool.timeout_s, f"tool {tool.name}")
            except ToolError as exc:  # refused: nothing happened, the model is told
                return await self._done(call, field, {"error": safe_text(str(exc))[:500]}, "refused")
            except ToolUnknown as exc:
                log.info("task_id=%s: tool call %s: outcome unknown (%s); reconciling", self.task.key, call.key,
                         safe_text(str(exc)))
            except Exception as exc:  # noqa: BLE001 - the user's tool failed: whether it acted is unknown
                # no traceback: a user's exception may carry the URL (and its secret) it called
                log.warning("task_id=%s: tool call %s raised %s (%s); reconciling", self.task.key, call.key,
                            type(exc).__name__, safe_text(str(exc))[:300])
            else:
                return await self._done(call, field, result, "executed")
            self._move(field, "fail")
            answer = await self._settled(tool, call, self.steps.clock())
            if answer.state == "landed":
                return await self._done(call, field, answer.result, "reconciled_landed")
            if answer.state != "absent":  # cannot tell (or an answer the loop does not know)
                raise Parked(self._waiting("reconcile", call, answer.detail or "the tool cannot tell"))
            self._count(tool.name, "reconciled_absent")
            self._move(field, "absent")
        raise Parked(self._waiting("reconcile", call, f"did not land in {_RUNS_PER_CALL} runs"))

    async def _reconcile(self, tool: Tool, call: ToolCall, field: str, ordinal: int) -> Any:
        """A call journaled as intended and never finished: ask the downstream before anything else."""
        self._move(field, "recover")
        decision = answer_of(self.journal, self.step.name, ordinal)
        if decision is not None and decision["decision"] == "landed":  # an operator's answer
            return await self._done(call, field, decision.get("result"), "reconciled_landed")
        if decision is not None and decision["decision"] == "expired":
            raise ToDeadLetter("expired", f"tool call {call.key}: nobody said whether it landed before the deadline",
                               self.attempts)
        if decision is None or decision["decision"] != "absent":
            answer = await self._settled(tool, call, self._gave_up(self.journal.get(field), tool))
            if answer.state == "landed":
                return await self._done(call, field, answer.result, "reconciled_landed")
            if answer.state != "absent":  # cannot tell (or an answer the loop does not know)
                raise Parked(self._waiting("reconcile", call, answer.detail or "the tool cannot tell"))
            self._count(tool.name, "reconciled_absent")
        self._move(field, "absent")
        await self._still_held()
        return await self._execute(tool, call, field)

    async def _still_held(self) -> None:
        """A call about to run again must still be held by this fence (its intent is already there)."""
        if not await self.steps.ledger.heartbeat(self.task.key, self.fence):
            raise LostFence(f"task {self.task.key}: fence {self.fence} no longer holds the task")

    def _gave_up(self, intent: Any, tool: Tool) -> datetime:
        """When the caller of a call journaled as intended gave up on it, at the latest: its intent
        plus the tool's timeout (now, when the intent's time cannot be read)."""
        now = self.steps.clock()
        try:
            at = datetime.fromisoformat(str(intent["intent_at"]))
        except (TypeError, KeyError, ValueError):
            return now
        if at.tzinfo is None or at.tzinfo.utcoffset(at) is None:
            return now
        return min(now, at + timedelta(seconds=tool.timeout_s))

    async def _settled(self, tool: Tool, call: ToolCall, gave_up: datetime) -> Reconciled:
        """What the downstream says of a call once it cannot be in flight any more.

        Waits out the tool's settle time after the caller ``gave_up`` (a downstream still working
        answers "not found" before), then asks; "in progress" is asked again, at most
        :data:`_PENDING_CHECKS` times and never past the task's deadline, then it cannot tell."""
        settle_s = tool.settle_after_s
        wait_s = (gave_up + timedelta(seconds=settle_s) - self.steps.clock()).total_seconds()
        if wait_s > 0:
            if self._past_deadline(wait_s):
                return Reconciled.unknown(f"the task's deadline comes before tool {tool.name} could settle")
            await asyncio.sleep(wait_s)
        poll_s = min(max(settle_s, 0.1), _PENDING_POLL_MAX_S)
        answer = await self._ask_downstream(tool, call)
        for _ in range(_PENDING_CHECKS):
            if answer.state != "pending":
                return answer
            self._count(tool.name, "reconcile_pending")
            if self._past_deadline(poll_s):
                break
            await asyncio.sleep(poll_s)
            answer = await self._ask_downstream(tool, call)
        if answer.state != "pending":
            return answer
        return Reconciled.unknown(f"still in progress downstream: {answer.detail}"[:300])

    def _past_deadline(self, wait_s: float) -> bool:
        """Whether waiting ``wait_s`` more would take the task past its deadline."""
        deadline = self.task.deadline
        return deadline is not None and self.steps.clock() + timedelta(seconds=wait_s) >= deadline

    async def _ask_downstream(self, tool: Tool, call: ToolCall) -> Reconciled:
        try:
            answer = await run_bounded(tool.reconcile(call), tool.timeout_s, f"reconcile of {tool.name}")
        except Exception as exc:  # noqa: BLE001 - a failing reconcile cannot tell
            return Reconciled.unknown(f"reconcile failed: {type(exc).__name__}: {safe_text(str(exc))[:200]}")
        if not isinstance(answer, Reconciled):
            return Reconciled.unknown("reconcile answered nonsense")
        return Reconciled(answer.state, answer.result, safe_text(answer.detail))

    async def _done(self, call: ToolCall, field: str, result: Any, outcome: str) -> Any:
        record = self._record(call, "done", result)
        record["outcome"] = record_outcome = outcome
        intent = self.journal.get(field)
        if isinstance(intent, dict):
            record["intent_at"], record["seq"] = intent.get("intent_at"), intent.get("seq")
        record["done_at"] = iso(self.steps.clock())
        audit = audit_entry(self.task.key, self.generation, call, outcome, self.steps.worker_id, self.fence,
                            record["result_digest"], self.steps.clock())
        self._move(field, OUTCOME_EVENT[outcome])
        if not await self.effects.done(self.task.key, self.fence, field, record, audit):
            self._count(call.tool, "stale")
            raise LostFence(f"task {self.task.key}: result of {call.key} refused for fence {self.fence}")
        self.journal[field] = record
        self._count(call.tool, record_outcome)
        return result

    def _count(self, tool: str, outcome: str) -> None:
        self.steps.metrics.tool_calls.labels(tool=tool, outcome=outcome).inc()


def audit_entry(task_key: str, generation: int, call: ToolCall, outcome: str, worker: str, fence: int | None,
                result_digest: str | None, now: datetime) -> dict[str, Any]:
    """One line of the audit trail: who (worker, fence), what (tool, key, digests), when, the outcome."""
    return {
        "at": iso(now), "task_id": task_key, "generation": generation, "step": call.step, "ordinal": call.ordinal,
        "key": call.key, "tool": call.tool, "args_digest": digest(canonical_json(call.arguments)),
        "result_digest": result_digest, "outcome": outcome, "worker": worker, "fence": fence,
    }


