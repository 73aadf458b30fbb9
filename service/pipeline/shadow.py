"""Shadow runs: a sample of duplicates run again, and how often the answer would differ counted.

For a kind in rollout the shadow run is the version that did not answer (counted by
``agent_rollout_divergence``), so the two versions are compared on the same tasks; otherwise it is
the same version again (``agent_shadow_runs``). Nothing is written: no ledger step, no result. One
attempt per step, no retries. A kind with a session is never run in shadow: its steps saw the
session as it stood at the task's turn, which later turns have moved on (docs/SESSIONS.md).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from graphlib import TopologicalSorter
from typing import Any

from pydantic import BaseModel

from dedup.ledger import Ledger
from service.agents.base import Agent, Previous
from service.agents.tasks import Task, canonical_json, digest
from service.core.errors import EndpointFault, InvalidOutput, PermanentError, PoisonError, RetryableError
from service.core.metrics import Metrics
from service.pipeline.base import ProcessorConfig, ToDeadLetter, estimate_tokens
from service.pipeline.call_outcome import Answer, CallOutcome, Failure
from service.pipeline.calls import CallLoop
from service.pipeline.capacity import Capacity

log = logging.getLogger(__name__)


class Shadow:
    """Runs the sampled duplicates in shadow: owns nothing but the sampling; its calls go through
    ``calls`` and ``capacity`` as any call does."""

    def __init__(self, *, ledger: Ledger, calls: CallLoop, capacity: Capacity, metrics: Metrics,
                 config: ProcessorConfig) -> None:
        self.ledger = ledger
        self.calls = calls
        self.capacity = capacity
        self.metrics = metrics
        self.config = config

    async def maybe_run(self, task: Task, agent: Agent, task_input: BaseModel) -> None:
        """Re-run the duplicate ``task`` in shadow when it is sampled (see the module docstring)."""
        if agent.session is not None:
            return  # a kind with a session: what its steps saw of the session has moved on since
        if random.random() >= self.config.shadow_sample_rate or any(s.tools for s in agent.steps):
            return  # a step that acts cannot be run in shadow: its answers depend on its side effects
        stored = await self.ledger.get(task.key)
        if stored is None or stored.state != "succeeded" or stored.fingerprint != task.fingerprint:
            return  # only a true duplicate of a stored result
        other = agent.other_version(stored.fields.get("prompt_version", ""))

        def count(outcome: str) -> None:
            if other is None:
                self.metrics.shadow_runs.labels(outcome=outcome).inc()
            else:
                self.metrics.rollout_divergence.labels(kind=task.kind, outcome=outcome).inc()

        if other is not None:
            agent = other
            try:
                task_input = other.parse_input(task.event.input)
            except PoisonError:
                count("failed")
                return
        try:
            outputs = await self._run(task, agent, task_input)
        except (RetryableError, PermanentError, InvalidOutput, EndpointFault, ToDeadLetter) as exc:
            count("failed")
            log.info("task_id=%s: shadow run failed: %s", task.key, exc)
            return
        same = digest(canonical_json(agent.result(outputs))) == stored.fields.get("result_digest")
        count("same" if same else "different")

    async def _run(self, task: Task, agent: Agent, task_input: BaseModel) -> dict[str, dict[str, Any]]:
        """The agent's steps, one call at a time (a sample), on the primary endpoint."""
        outputs: dict[str, dict[str, Any]] = {}
        for name in TopologicalSorter(agent.graph).static_order():
            step = agent.step(name)
            previous = Previous({need: outputs[need] for need in agent.graph[name]})
            messages, schema = step.messages(task_input, previous), step.schema(task_input, previous)
            needed = estimate_tokens(messages, schema, count=self.config.count_tokens) + self.config.max_output_tokens
            # a shadow call is a call: the breaker, the rate limits, Retry-After, the window and
            # the tenant's budget hold for it too
            primary = self.capacity.primary
            await self.capacity.endpoint(task, needed, retry=False, primary_only=True)
            request = dataclasses.replace(
                self.calls.request(task, step, messages, schema, None, endpoint=primary),
                idempotency_key=f"{task.key}:{step.name}:shadow", tools=(), tool_choice=None)
            spend = await self.capacity.reserve(task, needed, 0)
            outcome: CallOutcome | None = None
            try:
                outcome = await self.calls.call_once(request, step, task_input, needed, 1, 0, primary,
                                                     task_key=task.key, spend=spend)
            finally:
                await self.capacity.settle(spend, outcome)
            outputs[step.name] = _output(outcome)
        return outputs


def _output(outcome: CallOutcome) -> dict[str, Any]:
    """A shadow call's output; a failure, or tools asked for, fails the shadow run."""
    if isinstance(outcome, Answer):
        return outcome.output
    raise outcome.error if isinstance(outcome, Failure) else InvalidOutput("schema", "asked for tools")

