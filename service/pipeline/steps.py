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
from service.agents.session import SessionView
from service.agents.tasks import Task
from service.pipeline.calls import CallLoop
from service.pipeline.delegation import Send
from service.pipeline.graph import GraphRun


class Steps:
    """The stage that runs the agent: owns no state between tasks; each run is a
    :class:`~service.pipeline.graph.GraphRun` of its own, calling the model through ``calls``."""

    def __init__(self, calls: CallLoop, send: Send | None = None) -> None:
        self.calls = calls
        self.send = send  # produces the children of a delegating step

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
        await run.start()
        return run.outputs, run.attempts, run.degraded
