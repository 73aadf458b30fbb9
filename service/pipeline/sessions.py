"""A task's session in the pipeline (docs/SESSIONS.md, "In the pipeline"): entered after the task's
claim and before its steps, held while they run, updated as part of the task's completion, left by
every dead end.

- **Enter** (:meth:`SessionGate.enter`): a kind that declares a session and a task that names one
  take the session's ticket and wait their turn: ``Waiting`` polls every ``session_poll_s`` for at
  most ``session_max_wait_s`` (or until the task's deadline, if sooner), then dead letter
  ``session_busy`` naming the head it waited behind; ``WrongKind`` is dead letter ``session``;
  ``Applied`` (the task's update was applied before: its own ledger record expired, or was
  revived) runs nothing: the result stored in the session's turn is completed and re-emitted.
- **Hold** (:meth:`SessionGate.holding`): the session's lease is renewed at the task lease's pace
  (a third of ``lease_ms``) while the steps run; a renewal refused (the head passed over, a newer
  run took over) is logged, and the task's apply still counts (the ledger takes a late apply).
- **Apply** (:meth:`SessionGate.apply`): after the ledger's DONE accepted the result and before it
  is published: the turn ``{task_id, input, result, at}`` or the reduced state under the version
  read; ``moved``: read again and reduce again, at most :data:`MAX_APPLY_TRIES` times. The duplicate
  path of a task that succeeded and was not published applies too (``again`` when it was).
- A stored state that does not load into the kind's state model (an operator's correction, a model
  changed by a deploy) is the entering task's dead letter ``session`` (and leave).
- **Leave** (:meth:`SessionGate.leave`): every dead end of a task that may have entered.

- **Fit** (:meth:`SessionGate.fit`): before the steps, the view is fitted into the kind's history
  budget, the oldest turns beyond it summarised once (:mod:`~service.pipeline.history`); the result
  event's ``session`` field says what the task saw (``turns_seen``, ``summarized``, and ``omitted``
  when a summary failed for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from time import monotonic
from typing import Any

from pydantic import BaseModel

from dedup.errors import StaleFence
from dedup.ledger import Claim, Ledger, LedgerUnavailable
from dedup.sessions import Applied, Entered, WrongKind
from service.agents.base import Agent
from service.agents.registry import AgentRegistry
from service.agents.session import Session, SessionView
from service.agents.tasks import Task
from service.core.errors import PoisonError
from service.core.metrics import Metrics
from service.pipeline.base import LostFence, ProcessorConfig, ToDeadLetter, iso
from service.pipeline.calls import CallLoop
from service.pipeline.history import History

log = logging.getLogger(__name__)

MAX_APPLY_TRIES = 16  # applies that found the version moved, read and reduced again, before giving up


@dataclass(frozen=True)
class Replay:
    """The session applied this task's update before: nothing runs; ``result`` (None: not kept in
    the session) is completed and re-emitted."""

    view: SessionView
    result: Any


class SessionGate:
    """The stage between the claim and the steps for kinds with sessions: owns no state between
    tasks; what a session holds is the ledger's (``ledger.sessions``)."""

    def __init__(self, *, ledger: Ledger, agents: AgentRegistry, metrics: Metrics, config: ProcessorConfig,
                 clock: Callable[[], datetime]) -> None:
        self.ledger = ledger
        self.agents = agents
        self.metrics = metrics
        self.config = config
        self.clock = clock

    def declared(self, task: Task) -> Session | None:
        """The session declaration of a task that names a session and whose kind keeps them."""
        if task.session is None:
            return None
        try:
            return self.agents.get(task.kind).session
        except PoisonError:  # a kind no longer loaded: it keeps no session here
            return None

    async def enter(self, task: Task, agent: Agent, claim: Claim) -> SessionView | Replay | None:
        """Wait for the task's turn in its session: its view, a :class:`Replay`, or None (no session)."""
        declared, session_id = agent.session, task.session
        if declared is None or session_id is None:
            return None
        limit = self.config.session_max_wait_s
        remaining = task.remaining_s(self.clock())
        if remaining is not None:
            limit = min(limit, max(remaining, 0.0))
        started = monotonic()
        while True:
            try:
                answer = await self.ledger.sessions.enter(
                    session_id, task.kind, task.key, claim.fence, self.config.lease_ms, ttl_s=declared.ttl_s,
                    stall_ms=int(self.config.session_stall_s * 1000))
            except StaleFence as exc:
                raise LostFence(str(exc)) from exc
            if isinstance(answer, Entered):
                self.metrics.session_wait.labels(kind=task.kind).observe(monotonic() - started)
                return _view(session_id, declared, answer, claim.attempts)
            if isinstance(answer, WrongKind):
                raise ToDeadLetter("session", f"session {session_id} belongs to kind {answer.kind}", claim.attempts)
            if isinstance(answer, Applied):
                return await self._replay(session_id, task, declared, answer.version)
            waited = monotonic() - started
            if waited >= limit:
                raise ToDeadLetter("session_busy", f"session {session_id}: waited {waited:.0f}s for its turn behind "
                                   f"task {answer.head} ({answer.ahead} ahead)", claim.attempts)
            await asyncio.sleep(min(self.config.session_poll_s, limit - waited))

    async def fit(self, task: Task, agent: Agent, task_input: BaseModel, claim: Claim, view: SessionView | None,
                  calls: CallLoop) -> SessionView | None:
        """The view fitted into the kind's history budget: the oldest turns that do not fit summarised
        by the pseudo-step ``@summary`` (:mod:`~service.pipeline.history`), before the steps run."""
        if view is None:
            return None
        return await History(calls, self.metrics).fit(task, agent, task_input, claim, view)

    async def _replay(self, session_id: str, task: Task, declared: Session, version: int) -> Replay:
        record = await self.ledger.sessions.get(session_id)
        turns = record.turns if record is not None else []
        turn = next((t for t in turns if t.get("task_id") == task.key), None)
        view = SessionView(id=session_id, version=version, turns=(), state=None, summary=None, seen=0, summarized=0)
        return Replay(view, None if turn is None else turn.get("result"))

    @contextlib.asynccontextmanager
    async def holding(self, task: Task, fence: int, entry: SessionView | Replay | None) -> AsyncIterator[None]:
        """Renew the session's lease as the task's own is renewed while the body runs."""
        if not isinstance(entry, SessionView):
            yield
            return
        renewer = asyncio.get_running_loop().create_task(self._renew(entry.id, task.key, fence),
                                                         name=f"session-lease:{task.key}")
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _renew(self, session_id: str, task_key: str, fence: int) -> None:
        interval_s = self.config.lease_ms / 3000
        while True:
            await asyncio.sleep(interval_s)
            try:
                held = await self.ledger.sessions.renew(session_id, task_key, fence, self.config.lease_ms)
            except LedgerUnavailable as exc:
                log.debug("task_id=%s: session %s lease not renewed this turn: %s", task_key, session_id, exc)
                continue
            if not held:
                log.warning("task_id=%s: no longer holds session %s (passed over or taken over); its result "
                            "is still applied once", task_key, session_id)
                return

    async def apply(self, task: Task, fence: int, result: Any, view: SessionView | None = None) -> None:
        """Apply the task's update once (after the ledger's DONE, before publishing); ``view`` the
        session as the task read it (None: read it now, the duplicate path)."""
        declared, session_id = self.declared(task), task.session
        if declared is None or session_id is None:
            return
        task_input = self.agents.get(task.kind).parse_input(task.event.input) if not declared.turns else None
        turn = None if not declared.turns else {
            "task_id": task.key, "input": task.event.input, "result": result, "at": iso(self.clock())}
        if view is not None and view.id == session_id:
            version, state = view.version, _stored(view.state)
        else:
            version, state = await self._read(session_id)
        for _ in range(MAX_APPLY_TRIES):
            update = None if task_input is None else declared.next_state(state, task_input, result)
            answer = await self.ledger.sessions.apply(session_id, task.key, fence, version, turn, update)
            if answer == "ok":
                self.metrics.session_turns.labels(kind=task.kind).inc()
                return
            if answer != "moved":  # again: applied before; stale: a newer run of the task, or erased
                log.info("task_id=%s: session %s update answered %s; nothing written", task.key, session_id, answer)
                return
            self.metrics.session_conflicts.labels(kind=task.kind).inc()
            version, state = await self._read(session_id)
        raise RuntimeError(f"session {session_id}: the version moved under {MAX_APPLY_TRIES} applies of {task.key}")

    async def _read(self, session_id: str) -> tuple[int, Any]:
        record = await self.ledger.sessions.get(session_id)
        return (0, None) if record is None else (record.version, record.state)

    async def leave(self, task: Task, fence: int | None = None) -> None:
        """The task ended without an update: out of its session's queue (nothing for a task without one)."""
        if self.declared(task) is None or task.session is None:
            return
        answer = await self.ledger.sessions.leave(task.session, task.key, fence)
        log.debug("task_id=%s: left session %s (%s)", task.key, task.session, answer)


def _stored(state: Any) -> Any:
    """A view's state as stored (JSON data)."""
    return state.model_dump(mode="json") if hasattr(state, "model_dump") else state


def _view(session_id: str, declared: Session, entered: Entered, attempts: int) -> SessionView:
    """The view of the session the task entered; a state its kind's model refuses is the task's dead
    letter ``session`` (the processor leaves the session on it)."""
    summary = entered.summary
    try:
        state = declared.load(entered.state)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        model = declared.state.__name__ if declared.state is not None else "state"
        raise ToDeadLetter("session", f"session {session_id}: its state does not load into {model}: "
                           f"{str(exc)[:500]}", attempts) from exc
    return SessionView(id=session_id, version=entered.version, turns=tuple(entered.turns),
                       state=state, summary=summary.text if summary else None,
                       seen=len(entered.turns), summarized=entered.first_turn)
