"""Running an agent's steps: one model call each, journaled and resumed, retried within the task's
attempts; the endpoint's own failures (breaker, 429, auth) spend no attempt of the task.

Three parts, each readable alone: the step graph's run (:mod:`~service.pipeline.graph`), one step's
model calls (:mod:`~service.pipeline.calls`) and the room for each call: budget, endpoint, window
(:mod:`~service.pipeline.capacity`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from consumers.records import Record
from dedup.ledger import Claim
from service.agents.base import Agent
from service.agents.delegation import DelegateStep
from service.agents.session import SessionView
from service.agents.tasks import Task
from service.pipeline.batch_lane import wants_batch
from service.pipeline.calls import CallLoop
from service.pipeline.delegation import Send
from service.pipeline.graph import GraphRun


class Steps:
    """The stage that runs the agent: owns no state between tasks; each run is a
    :class:`~service.pipeline.graph.GraphRun` of its own, calling the model through ``calls``."""

    def __init__(self, calls: CallLoop, send: Send | None = None) -> None:
        self.calls = calls
        self.send = send  # produces the children of a delegating step

    def first_attempt(self, task: Task, agent: Agent) -> tuple[str, int] | None:
        """The step whose first attempt the task's claim counts with it (one ledger round trip for
        both, :meth:`Ledger.claim <dedup.ledger.Ledger.claim>`), with its max attempts: the agent's one
        step when its call follows the claim without a wait of its own (no session, tools, batch lane,
        pieces or children; no tenant budget or rate limits; the primary endpoint available). None:
        counted apart, right before the call."""
        if task.session is not None or len(agent.steps) != 1:
            return None
        step, capacity = agent.steps[0], self.calls.capacity
        if isinstance(step, DelegateStep) or step.tools or step.fit == "map_reduce" or not capacity.primary.available:
            return None
        limiter = capacity.primary.limiter
        if wants_batch(self.calls.config.batch, agent, task) or (limiter is not None and limiter.enabled) or (
                capacity.budgets is not None and capacity.budgets.applies(task.tenant)):
            return None
        return step.name, self.calls.config.max_attempts

    async def run(
        self, task: Task, agent: Agent, task_input: BaseModel, claim: Claim, record: Record | None = None,
        session: SessionView | None = None,
    ) -> tuple[dict[str, dict[str, Any]], int, dict[str, tuple[str, str]]]:
        """Run the agent's step graph (each step sees ``session`` in ``previous[SESSION]``); a multi-step agent journals each step and resumes from the journal.

        A step runs once every step it needs is journaled, and sees the task input and their
        recorded outputs, each checked against its digest, in the order it names them. Steps with no
        path between them run concurrently; the first that fails cancels the others. A journaled
        step is re-used only when its prompt version is current, its digest matches its output and
        it was computed from the current outputs of the steps it needs (a chain of digests);
        otherwise it runs again.

        Returns the outputs, the task's attempts, and the steps a fallback endpoint answered (step ->
        (endpoint, model); empty when the primary answered every step).
        """
        run = GraphRun(self.calls, task, agent, task_input, claim, record, self.send, session)
        try:
            await run.start()
        finally:  # counted by the claim, taken by no call (ended, parked or re-used before it): given back
            await self.calls.ledger.give_back_first_attempt(task.key, claim.fence)
        return run.outputs, run.attempts, run.degraded
