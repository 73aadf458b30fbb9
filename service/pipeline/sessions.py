"""A task's session in the pipeline (docs/SESSIONS.md, "In the pipeline"): entered after the task's
claim and before its steps, held while they run, updated as part of the task's completion, left by
every dead end.

- **Enter** (:meth:`SessionGate.enter`): a kind that declares a session and a task that names one
  take the session's ticket and wait their turn: ``Waiting`` polls every ``session_poll_s`` for at
  most ``session_max_wait_s``, then dead letter ``session_busy`` naming the head it waited behind
  (``expired`` when the task's deadline came first; every wait observed); ``WrongKind`` and
  ``WrongTenant`` (the session belongs to another tenant) are dead letter ``session``;
  ``Applied`` (the task's update was applied before: its own ledger record expired, or was
  revived) runs nothing: the result stored in the session's turn is completed and re-emitted.
- **Hold** (:meth:`SessionGate.holding`): the session's lease is renewed at the task lease's pace
  (a third of ``lease_ms``) while the steps run; a renewal refused (the head passed over, a newer
  run took over) is logged and the task runs on: taken over, its DONE is refused by its fence;
  passed over, its apply still counts and loses no other update (the version CAS: ``moved``).
- **Park** (:meth:`SessionGate.park`): a task that parks keeps its turn: its hold is renewed once
  to the park's own deadline (with ``lease_ms`` of margin); resumed, it enters again as the holder.
- **Update** (:meth:`SessionGate.update`): after the steps, while the task still holds the session
  and before the ledger's DONE: the turn ``{task_id, input, result, at}`` or the reduced state from
  the state as read. A reduce that raises (or returns a state its model refuses) is the task's own
  dead end: dead letter ``session`` (and leave), never a result the session cannot take.
- **Apply** (:meth:`SessionGate.apply`): after the ledger's DONE accepted the result and before it
  is published, it only writes the update under the version read; ``moved``: read again and reduce
  again, at most :data:`MAX_APPLY_TRIES` times. It never raises for the update itself (the result is
  accepted and will be published): a reduce that refuses the moved state, or a version that keeps
  moving, drops the update (``agent_session_updates_dropped_total``, an error logged), the state
  stays as it is and the task leaves the session. The duplicate path of a task that succeeded and
  was not published applies too (``again`` when it was), reading and reducing as after ``moved``.
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
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from time import monotonic
from typing import Any

from pydantic import BaseModel

from dedup.errors import StaleFence
from dedup.ledger import Claim, Ledger, LedgerUnavailable
from dedup.sessions import Applied, Entered, Waiting, WrongKind, WrongTenant
from service.agents.base import Agent
from service.agents.registry import AgentRegistry
from service.agents.session import Session, SessionView
from service.agents.tasks import Task, canonical_json
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


@dataclass(frozen=True)
class Update:
    """A task's update of its session, computed before the ledger's DONE: the turn (the turns) or
    the reduced state (JSON data), under the ``version`` the task read."""

    version: int
    turn: dict[str, Any] | None
    state: Any


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
        by_deadline = remaining is not None and remaining < limit  # the task's deadline ends the wait first
        if remaining is not None:
            limit = min(limit, max(remaining, 0.0))
        started = monotonic()
        while True:
            try:
                answer = await self.ledger.sessions.enter(
                    session_id, task.kind, task.key, claim.fence, self.config.lease_ms, ttl_s=declared.ttl_s,
                    stall_ms=int(self.config.session_stall_s * 1000), tenant=task.tenant)
            except StaleFence as exc:
                raise LostFence(str(exc)) from exc
            if isinstance(answer, Entered):
                self.metrics.session_wait.labels(kind=task.kind).observe(monotonic() - started)
                return _view(session_id, declared, answer, claim.attempts)
            if isinstance(answer, WrongTenant):
                raise ToDeadLetter("session", f"session {session_id} belongs to tenant {answer.tenant}",
                                   claim.attempts)
            if isinstance(answer, WrongKind):
                raise ToDeadLetter("session", f"session {session_id} belongs to kind {answer.kind}", claim.attempts)
            if isinstance(answer, Applied):
                return await self._replay(session_id, task, declared, answer.version)
            waited = monotonic() - started
            if waited >= limit:
                raise self._waited_out(task, session_id, answer, waited, by_deadline, claim.attempts)
            await asyncio.sleep(min(self.config.session_poll_s, limit - waited))

    def _waited_out(self, task: Task, session_id: str, answer: Waiting, waited: float, by_deadline: bool,
                    attempts: int) -> ToDeadLetter:
        """The dead end of a wait for the task's turn that ran out (observed like an entered wait):
        ``expired`` when the task's deadline ended it, else ``session_busy`` (replayable)."""
        self.metrics.session_wait.labels(kind=task.kind).observe(waited)
        behind = f"behind task {answer.head} ({answer.ahead} ahead)"
        if by_deadline:
            return ToDeadLetter("expired", f"deadline passed waiting for its turn in session {session_id} "
                                f"({waited:.0f}s {behind})", attempts)
        return ToDeadLetter("session_busy", f"session {session_id}: waited {waited:.0f}s for its turn {behind}",
                            attempts)

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

    async def park(self, task: Task, fence: int, entry: SessionView | Replay | None,
                   waiting: Mapping[str, Any]) -> None:
        """A task that parks (an approval, a reconcile answer, its children) keeps its turn: its
        session is held until the park's own deadline (``waiting["deadline_ms"]``), with ``lease_ms``
        of margin, as one renewal (nothing renews it while no worker runs the task). Resumed (a
        decision, or the deadline's ``expired``), the task enters again as the holder; a park that
        ends dead leaves on that dead end. Refused (taken over, passed over): logged."""
        if not isinstance(entry, SessionView):
            return
        now_ms = self.clock().timestamp() * 1000
        lease_ms = max(0, int(float(waiting.get("deadline_ms", 0)) - now_ms)) + self.config.lease_ms
        if not await self.ledger.sessions.renew(entry.id, task.key, fence, lease_ms):
            log.warning("task_id=%s: parks and no longer holds session %s (passed over or taken over)", task.key,
                        entry.id)
            return
        log.info("task_id=%s: parked; holds session %s for %.0fs, until its park's deadline", task.key, entry.id,
                 lease_ms / 1000)

    def update(self, task: Task, agent: Agent, entry: SessionView | Replay | None,
               outputs: dict[str, dict[str, Any]], attempts: int) -> Update | None:
        """The task's update from the session as it read it, computed after its steps while it still
        holds the session and before the ledger's DONE (None: no session, or a replay, whose update
        was applied before). A reduce that fails is the task's own dead end: dead letter ``session``."""
        declared, session_id = agent.session, task.session
        if declared is None or session_id is None or not isinstance(entry, SessionView):
            return None
        result = json.loads(canonical_json(agent.result(outputs)))  # as the result is stored
        if declared.turns:
            return Update(entry.version, self._turn(task, result), None)
        try:
            return Update(entry.version, None, self._reduce(task, declared, _stored(entry.state), result))
        except Exception as exc:  # noqa: BLE001 - the kind's own reduce (or its input model): any failure
            raise ToDeadLetter("session", f"session {session_id}: the kind's reduce refused the result of task "
                               f"{task.key}: {type(exc).__name__}: {str(exc)[:500]}", attempts) from exc

    def _turn(self, task: Task, result: Any) -> dict[str, Any]:
        return {"task_id": task.key, "input": task.event.input, "result": result, "at": iso(self.clock())}

    def _reduce(self, task: Task, declared: Session, stored: Any, result: Any) -> Any:
        return declared.next_state(stored, self.agents.get(task.kind).parse_input(task.event.input), result)

    async def apply(self, task: Task, fence: int, result: Any, update: Update | None = None) -> None:
        """Write the task's update once (after the ledger's DONE, before publishing): ``update`` as
        computed before DONE (None: read the session and compute it now, the duplicate path);
        ``moved``: read again and reduce again. Raises only when Redis does not answer: the result is
        accepted, so an update that cannot be applied is dropped (:meth:`_drop`), never an error."""
        declared, session_id = self.declared(task), task.session
        if declared is None or session_id is None:
            return
        turn = self._turn(task, result) if declared.turns else None
        if update is None:
            update = await self._reread(task, fence, declared, turn, result)
        for _ in range(MAX_APPLY_TRIES):
            if update is None:  # dropped
                return
            answer = await self.ledger.sessions.apply(session_id, task.key, fence, update.version, update.turn,
                                                      update.state)
            if answer == "ok":
                self.metrics.session_turns.labels(kind=task.kind).inc()
                return
            if answer != "moved":  # again: applied before; stale: a newer run of the task, or erased
                log.info("task_id=%s: session %s update answered %s; nothing written", task.key, session_id, answer)
                return
            self.metrics.session_conflicts.labels(kind=task.kind).inc()
            update = await self._reread(task, fence, declared, update.turn, result)
        await self._drop(task, fence, f"the version moved under {MAX_APPLY_TRIES} applies")

    async def _reread(self, task: Task, fence: int, declared: Session, turn: dict[str, Any] | None,
                      result: Any) -> Update | None:
        """The update from the session as it stands now (None: the reduce refused it, the update dropped)."""
        assert task.session is not None
        record = await self.ledger.sessions.get(task.session)
        version, state = (0, None) if record is None else (record.version, record.state)
        if declared.turns:
            return Update(version, turn, None)
        try:
            return Update(version, None, self._reduce(task, declared, state, result))
        except Exception as exc:  # noqa: BLE001 - the kind's own reduce, after the result was accepted
            await self._drop(task, fence, f"the reduce refused the session's state as it stands now: "
                             f"{type(exc).__name__}: {str(exc)[:500]}")
            return None

    async def _drop(self, task: Task, fence: int, why: str) -> None:
        """An accepted result's update that cannot be applied: the session's state stays as it is (the
        newer state someone else wrote is never overwritten), the task leaves the session so the next
        turn enters at once, and the drop is counted and logged; the result is still published."""
        self.metrics.session_updates_dropped.labels(kind=task.kind).inc()
        log.error("task_id=%s: session %s: the update of its accepted result is dropped (%s); the state stays "
                  "as it is", task.key, task.session, why)
        await self.leave(task, fence)

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
