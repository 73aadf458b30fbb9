"""A session's history as a budget (docs/SESSIONS.md, "History as a budget"): the turns a step is
shown fit ``history_share`` of the model's window; the oldest beyond it are summarised once.

- **The budget** is ``history_share`` of the window (``context_tokens``), counted with the service's
  token estimate (:func:`~service.pipeline.base.estimate_tokens`) of the history as a step renders
  it (:func:`~service.agents.session.session_messages`: the stored summary, then the turns after it).
  A kind's ``keep_turns`` caps the turns shown as well.
- **Folding.** When the history does not fit, the oldest turns are folded into a new summary (of
  the stored summary and those turns): a summary may take :func:`summary_room` (a quarter of the
  budget, at most the model's answer limit; the summary request's schema and check hold it to
  that), and the newest turns kept take at most half of what the summary leaves, so the turns that
  come next fit under the same summary until they fill the other half: one summary call per many
  turns, never one per turn. A newest turn larger than that half is folded too.
- **The call** is the pseudo-step ``@summary`` of the task (:class:`SummaryStep`, prompt version
  :data:`SUMMARY_PROMPT_VERSION`), made through the step's call loop (an endpoint's fault is given
  back and waited out like any call; the task's own failures spend its attempts) and journaled in
  the task's steps before it is stored: a replay of the task finds it there (same prompt version,
  same input digest) and makes no second call.
- **Stored** with ``ledger.sessions.summarize`` under the version read: later turns enter with it
  and reuse it; the ledger keeps the summary covering the most turns.
- **A summary that fails for good** (``invalid_output``, ``exhausted``, ``permanent``): the task
  goes on with the turns that fit and the stored summary, and its result says how many turns it was
  not shown (``session.omitted``); the next turn tries again. Any other dead end of the call
  (``unavailable`` after waiting for the endpoint, ``budget``, ``expired``) ends the task as it
  would end any call.
- **A summary request fits the window**: when the turns to fold do not (a history an operator put
  in at once), the oldest half is folded, halved again until it fits; the turns after them are
  shown, and the next turns fold more. (A single turn too large for a request is the call's
  ``oversize``.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dedup.ledger import Claim, StaleFence
from service.agents.base import Agent, Messages, Previous, Step
from service.agents.session import SessionView, session_messages
from service.agents.tasks import Task, canonical_json, digest
from service.core.errors import InvalidOutput
from service.core.metrics import Metrics
from service.llm.tokens import TokenCounter, utf8_bytes
from service.pipeline.base import LostFence, ToDeadLetter, estimate_tokens
from service.pipeline.calls import CallLoop

log = logging.getLogger(__name__)

SUMMARY_STEP = "@summary"  # the pseudo-step's name in the task's journal and attempts
SUMMARY_PROMPT_VERSION = "session-summary-v1"
SUMMARY_SYSTEM = (
    "Summarise the earlier part of a conversation for whoever answers its next turns. You are given the "
    "summary so far (if any) and the turns after it, oldest first. Keep the facts, names, numbers, "
    "decisions, requests and open questions; drop pleasantries. Answer with JSON: {\"summary\": \"...\"}.")
FAILED_FOR_GOOD = frozenset({"invalid_output", "exhausted", "permanent"})  # the task goes on without it


def budget_tokens(history_share: float, context_tokens: int) -> int:
    """The tokens a session's history may take of the window (never none)."""
    return max(1, int(history_share * context_tokens))


def summary_room(budget: int, max_output_tokens: int) -> int:
    """The tokens a summary may take: a quarter of the budget, at most the model's answer limit."""
    return max(1, min(max_output_tokens, budget // 4))


def history_tokens(summary: str | None, turns: Sequence[Mapping[str, Any]], counter: TokenCounter = utf8_bytes) -> int:
    """The token estimate of the history as a step renders it."""
    view = SessionView(id="", version=0, turns=turns, state=None, summary=summary, seen=len(turns), summarized=0)
    return estimate_tokens(session_messages(view), None, count=counter)


def to_fold(summary: str | None, turns: Sequence[Mapping[str, Any]], *, budget: int, room: int,
            keep_turns: int | None, counter: TokenCounter = utf8_bytes) -> int:
    """How many of the oldest ``turns`` to fold into a new summary: 0 when the history fits."""
    count = len(turns)
    if count == 0 or (history_tokens(summary, turns, counter) <= budget and (keep_turns is None or count <= keep_turns)):
        return 0
    half = (budget - room) // 2  # the kept turns' share: the other half waits for the turns to come
    kept, tokens = 0, 0
    for turn in reversed(turns):
        tokens += history_tokens(None, [turn], counter)  # the estimate adds up a message at a time
        if (keep_turns is not None and kept >= keep_turns) or tokens > half:
            break
        kept += 1
    return max(1, count - kept)


class SummaryOut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    summary: str = Field(min_length=1)


class SummaryStep(Step):
    """The pseudo-step ``@summary``: the stored summary and the turns it folds, summarised in at most
    ``max_chars`` characters and, as ``count`` counts them, ``room_tokens`` tokens (the room the budget
    keeps for it: a longer summary would outgrow the budget by itself)."""

    name, prompt_version, output_model = SUMMARY_STEP, SUMMARY_PROMPT_VERSION, SummaryOut

    def __init__(self, summary: str | None, turns: Sequence[Mapping[str, Any]], *, max_chars: int,
                 room_tokens: int | None = None, count: TokenCounter = utf8_bytes) -> None:
        self.summary, self.turns, self.max_chars = summary, list(turns), max_chars
        self.room_tokens, self.count = room_tokens, count

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        told = {"summary_so_far": self.summary or "",
                "turns": [{"input": t.get("input"), "result": t.get("result")} for t in self.turns]}
        return [{"role": "system", "content": SUMMARY_SYSTEM},
                {"role": "user", "content": json.dumps(told, ensure_ascii=False, sort_keys=True)}]

    def schema(self, task_input: BaseModel, previous: Mapping[str, Any]) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False, "required": ["summary"],
                "properties": {"summary": {"type": "string", "minLength": 1, "maxLength": self.max_chars}}}

    def check(self, task_input: BaseModel, output: BaseModel) -> None:
        assert isinstance(output, SummaryOut)
        if len(output.summary) > self.max_chars:
            raise InvalidOutput("schema", f"{self.name}: a summary of {len(output.summary)} characters, "
                                f"at most {self.max_chars}")
        if self.room_tokens is not None and (tokens := self.count(output.summary)) > self.room_tokens:
            raise InvalidOutput("schema", f"{self.name}: a summary of about {tokens} tokens, at most {self.room_tokens}")


def request_fits(step: SummaryStep, context_tokens: int, max_output_tokens: int,
                 counter: TokenCounter = utf8_bytes) -> bool:
    """Whether the summary request fits the model's window with its answer."""
    probe = SummaryOut(summary="-")
    needed = estimate_tokens(step.messages(probe, Previous()), step.schema(probe, Previous()), count=counter)
    return needed + max_output_tokens <= context_tokens


class History:
    """Fits one task's view of its session into the kind's budget (see the module's doc)."""

    def __init__(self, calls: CallLoop, metrics: Metrics) -> None:
        self.calls, self.metrics = calls, metrics

    async def fit(self, task: Task, agent: Agent, task_input: BaseModel, claim: Claim,
                  view: SessionView) -> SessionView:
        """The view as the steps see it: the turns that fit, after a summary of the rest."""
        declared, cfg = agent.session, self.calls.config
        if declared is None or not declared.turns:
            return view
        budget = budget_tokens(declared.history_share, cfg.context_tokens)
        room = summary_room(budget, cfg.max_output_tokens)
        fold = to_fold(view.summary, view.turns, budget=budget, room=room, keep_turns=declared.keep_turns,
                       counter=cfg.count_tokens)
        if fold == 0:
            return view
        step = SummaryStep(view.summary, view.turns[:fold], max_chars=room, room_tokens=room, count=cfg.count_tokens)
        while fold > 1 and not request_fits(step, cfg.context_tokens, cfg.max_output_tokens, cfg.count_tokens):
            fold //= 2  # a summary request fits the window: the turns after it are folded by later turns
            step = SummaryStep(view.summary, view.turns[:fold], max_chars=room, room_tokens=room, count=cfg.count_tokens)
        folded, kept = step.turns, tuple(view.turns[fold:])
        upto = view.summarized + fold
        input_digest = digest(canonical_json({"session": view.id, "from": view.summarized, "upto": upto,
                                              "summary": view.summary, "turns": folded}))
        try:
            text = await self._summary(task, step, task_input, claim, input_digest)
        except ToDeadLetter as dl:
            if dl.reason not in FAILED_FOR_GOOD:
                raise
            log.warning("task_id=%s: session %s not summarised (%s: %s); the task sees its %d newest turns and "
                        "not the %d before them", task.key, view.id, dl.reason, dl.error, len(kept), fold)
            return replace(view, turns=kept, seen=len(kept), omitted=fold)
        if await self.calls.ledger.sessions.summarize(view.id, upto, text, view.version):
            self.metrics.session_summaries.labels(kind=task.kind).inc()
        else:  # an operator's correction moved the session, or a longer summary is stored: this task's stands
            log.info("task_id=%s: the summary of session %s's first %d turns was not stored", task.key, view.id, upto)
        return replace(view, turns=kept, summary=text, seen=len(kept), summarized=upto)

    async def _summary(self, task: Task, step: SummaryStep, task_input: BaseModel, claim: Claim,
                       input_digest: str) -> str:
        """The summary journaled by this task before (a replay), or one model call journaled now."""
        ledger = self.calls.ledger
        recorded = (await ledger.steps(task.key)).get(SUMMARY_STEP)
        if (recorded is not None and recorded.get("prompt_version") == SUMMARY_PROMPT_VERSION
                and recorded.get("input_digest") == input_digest
                and recorded.get("digest") == digest(canonical_json(recorded.get("output")))):
            self.metrics.steps_reused.inc()
            return str(recorded["output"]["summary"])
        output, attempts = await self.calls.call_step(task, step, task_input, Previous(), claim.fence, claim.attempts)
        assert isinstance(output, dict)
        record = {"output": output, "digest": digest(canonical_json(output)), "input_digest": input_digest,
                  "prompt_version": SUMMARY_PROMPT_VERSION, "fence": claim.fence, "attempt": attempts}
        try:
            await ledger.record_step(task.key, claim.fence, SUMMARY_STEP, record)
        except StaleFence as exc:
            raise LostFence(str(exc)) from exc
        return str(output["summary"])
