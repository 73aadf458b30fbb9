"""One run of an agent's step graph for one task, under one claim: each step journaled and resumed,
steps with no path between them run at once, and a step too large for the model's window mapped over
pieces of its input and reduced.

A step runs once every step it needs is journaled, and sees the task input and their recorded
outputs, each checked against its digest, in the order it names them. Steps with no path between
them run concurrently; the first that fails cancels the others. A journaled step is re-used only
when its prompt version is current, its digest matches its output and it was computed from the
current outputs of the steps it needs (a chain of digests); otherwise it runs again. The model calls
of a step are the :class:`~service.pipeline.calls.CallLoop`'s (a step with tools, the
:class:`~service.pipeline.tools.ToolLoop`'s on top of it).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from graphlib import TopologicalSorter
from typing import Any

from pydantic import BaseModel

from consumers.records import Record
from dedup.ledger import Claim, StaleFence
from service.agents.base import Agent, Messages, Previous, Step
from service.agents.delegation import DelegateStep
from service.agents.session import SESSION, SessionView
from service.agents.tasks import Task, canonical_json, digest
from service.pipeline.base import LostFence, ToDeadLetter, estimate_tokens
from service.pipeline.batch_lane import batched, wants_batch
from service.pipeline.calls import CallLoop
from service.pipeline.delegation import DEGRADED_BY, Delegation, Send
from service.pipeline.tools import ToolLoop


class GraphRun:
    """One run of an agent's step graph for one task, under one claim: owns the run's journal as
    read, each step's record and output, the task's attempts so far, and who answered each step.

    Its model calls go through ``calls``, whose ledger, metrics and config it shares."""

    def __init__(self, calls: CallLoop, task: Task, agent: Agent, task_input: BaseModel, claim: Claim,
                 record: Record | None, send: Send | None = None, session: SessionView | None = None) -> None:
        self.calls, self.task, self.agent, self.task_input, self.claim = calls, task, agent, task_input, claim
        self.record = record
        self.send = send  # produces a delegating step's children
        self.session = session  # the task's session as it entered: every step sees it in previous[SESSION]
        self.journaled = agent.journaled
        self.journal: dict[str, dict[str, Any]] = {}
        self.records: dict[str, dict[str, Any]] = {}  # step -> its record (journaled or new)
        self.outputs: dict[str, dict[str, Any]] = {}
        self.attempts = claim.attempts
        self.declared = [s.name for s in agent.steps]
        self.read = agent.read_steps
        # step (or piece) -> (endpoint, model) of each answered by a fallback, journaled or new
        self.degraded: dict[str, tuple[str, str]] = {}
        self._answered: dict[str, tuple[str, str]] = {}  # step -> who answered its call in this run

    async def start(self) -> None:
        """Run the graph to the last step; the outputs, attempts and degraded steps are then read off the run."""
        if self.journaled:
            self.journal = await self.calls.ledger.steps(self.task.key)
        if len(self.declared) == 1:  # one step (most kinds): no graph to walk
            await self._step(self.declared[0])
            return
        order = TopologicalSorter(self.agent.graph)
        order.prepare()
        running: dict[asyncio.Task[str], str] = {}
        try:
            while order.is_active():
                ready = order.get_ready()
                if len(ready) == 1 and not running:  # a chain, or a single step: no task to schedule
                    order.done(await self._step(ready[0]))
                    continue
                for name in ready:
                    running[asyncio.create_task(self._step(name))] = name
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for finished in sorted(done, key=lambda t: self.declared.index(running[t])):
                    running.pop(finished)
                    order.done(finished.result())  # the first failure (in declaration order) is raised
        finally:
            await _cancel(running)

    async def _step(self, name: str) -> str:
        """Re-use the journaled record of step ``name`` or run it; returns its name."""
        agent, needs = self.agent, self.agent.graph[name]
        step = agent.step(name)
        input_digest = self._input_digest(needs)
        recorded = self._reusable(step, input_digest)
        if recorded is not None:
            self.outputs[name], self.records[name] = recorded["output"], recorded
            return name
        read: dict[str, Any] = {}
        for need in needs:  # in the order the step names them, never in the order they finished
            record = self.records[need]
            if record.get("digest") != digest(canonical_json(record.get("output"))):
                raise ToDeadLetter("permanent", f"step {need}: recorded output does not match its digest",
                                   self.attempts)
            read[need] = record["output"]
        if self.session is not None:
            read[SESSION] = self.session
        previous = Previous(read)
        if isinstance(step, DelegateStep):  # no model call: children, once each, and their outcomes
            output = await self._delegate(step, previous)
        elif step.fit == "map_reduce" and not self._fits(step, self.task_input, previous):
            output = await self._map_reduce(step, previous, input_digest)
        else:
            output = await self._call(step, self.task_input, previous)
        self.outputs[name] = output
        self.records[name] = await self._record(step, output, input_digest)
        return name

    def _reusable(self, step: Step, input_digest: str) -> dict[str, Any] | None:
        """The journaled record of ``step`` when it is current: same prompt version, computed from the
        same inputs, and its output matching its digest (counted as re-used); else None."""
        recorded = self.journal.get(step.name)
        if (
            recorded is None
            or recorded.get("prompt_version") != step.prompt_version
            or recorded.get("input_digest", "") != input_digest
            or recorded.get("digest") != digest(canonical_json(recorded.get("output")))
        ):
            return None
        self.calls.metrics.steps_reused.inc()
        endpoint = recorded.get("endpoint")
        if endpoint and endpoint != "primary":
            self.degraded[step.name] = (str(endpoint), str(recorded.get("model", "")))
        return recorded

    async def _call(self, step: Step, task_input: BaseModel, previous: Previous) -> dict[str, Any]:
        answered: list[tuple[str, str]] = []
        try:
            if step.tools:
                loop = ToolLoop(self.calls, self.task, step, task_input, previous, self.claim.fence, self.attempts,
                                self.record, answered)
                try:
                    return await loop.run()
                finally:
                    self.attempts = max(self.attempts, loop.attempts)
            if wants_batch(self.calls.config.batch, self.agent, self.task):  # parked until its batch ends
                from_batch = await batched(self.calls, self.task, step, task_input, previous, self.claim.fence,
                                           self.attempts, self.record, answered)
                if from_batch is not None:
                    return from_batch
            output, attempts = await self.calls.call_step(self.task, step, task_input, previous, self.claim.fence,
                                                          self.attempts, answered=answered)
            self.attempts = max(self.attempts, attempts)
            assert isinstance(output, dict)  # offered no tools, the model's answer is the output
            return output
        finally:
            # a step answered (in any of its rounds) by a fallback is degraded; else the last answer's
            by = next((a for a in answered if a[0] != "primary"), answered[-1] if answered else None)
            if by is not None:
                self._answered[step.name] = by
                if by[0] != "primary":
                    self.degraded[step.name] = by

    async def _delegate(self, step: DelegateStep, previous: Previous) -> dict[str, Any]:
        """A delegating step's output (:mod:`~service.pipeline.delegation`); raises Parked while it waits."""
        if self.send is None:
            raise RuntimeError(f"step {step.name} delegates and this run has no producer for its children")
        calls = self.calls
        output = await Delegation(
            ledger=calls.ledger, send=self.send, config=calls.config, clock=calls.clock,
            traceparent=calls.tracing.current_traceparent() or self.task.traceparent, task=self.task,
            fence=self.claim.fence, record=self.record, attempts=self.attempts, metrics=calls.metrics,
        ).run(step, self.task_input, previous)
        if output.get("degraded"):  # flagged like a fallback's answer, journaled with the step
            self._answered[step.name] = self.degraded[step.name] = DEGRADED_BY
        return output

    async def _record(self, step: Step, output: dict[str, Any], input_digest: str) -> dict[str, Any]:
        """Journal ``step``'s output under the task's fence (when the agent journals); returns the record."""
        record = {
            "output": output, "input_digest": input_digest,
            "prompt_version": step.prompt_version, "fence": self.claim.fence, "attempt": self.attempts,
        }
        if self.journaled or step.name in self.read:  # the digest is for the journal and the steps after
            record["digest"] = digest(canonical_json(output))
        answered = self._answered.get(step.name)
        if answered is not None:  # which endpoint answered (a fallback's answer is degraded)
            record["endpoint"], record["model"] = answered
        if self.journaled:
            try:
                await self.calls.ledger.record_step(self.task.key, self.claim.fence, step.name, record)
            except StaleFence as exc:
                raise LostFence(str(exc)) from exc
        return record

    def _fits(self, step: Step, task_input: BaseModel, previous: Previous) -> bool:
        cfg = self.calls.config
        needed = estimate_tokens(step.messages(task_input, previous), step.schema(task_input, previous),
                                count=cfg.count_tokens)
        return needed + cfg.max_output_tokens <= cfg.context_tokens

    async def _map_reduce(self, step: Step, previous: Previous, input_digest: str) -> dict[str, Any]:
        """The step over pieces of its input that each fit the window, then the reduce of their outputs.

        Each piece is journaled as ``<step>-part-NNN`` (its input digest covers the piece's text), so
        a resumed task calls the model only for the pieces not yet journaled. Nothing is truncated:
        a paragraph that does not fit alone, or a reduce request that does not fit, is ``oversize``.
        """
        assert step.chunk_field is not None
        pieces = self._pieces(step, previous)
        partials: list[dict[str, Any]] = []
        for number, text in enumerate(pieces, 1):
            piece_input = self.task_input.model_copy(update={step.chunk_field: text})
            part = _Piece(step, f"{step.name}-part-{number:03d}", step.messages)
            partials.append(await self._journaled_call(part, piece_input, previous,
                                                       digest(canonical_json([input_digest, text]))))
        reduce = _Piece(step, step.name, lambda task_input, _previous: step.reduce_messages(task_input, partials))
        if not self._fits(reduce, self.task_input, Previous()):
            raise ToDeadLetter("oversize", f"step {step.name}: the outputs of its {len(pieces)} pieces do not fit "
                               "the model's window together", self.attempts)
        return await self._call(reduce, self.task_input, Previous())

    def _pieces(self, step: Step, previous: Previous) -> list[str]:
        """The step's ``chunk_field`` split on blank lines and packed, in order, into pieces that fit."""
        field = step.chunk_field
        assert field is not None
        text = str(getattr(self.task_input, field))
        paragraphs = [p.strip() for p in _PARAGRAPHS.split(text) if p.strip()]

        def fits(candidate: str) -> bool:
            return self._fits(step, self.task_input.model_copy(update={field: candidate}), previous)

        pieces: list[str] = []
        current = ""
        for paragraph in paragraphs:
            joined = f"{current}\n\n{paragraph}" if current else paragraph
            if fits(joined):
                current = joined
                continue
            if not fits(paragraph):
                raise ToDeadLetter("oversize", f"step {step.name}: a paragraph of {len(paragraph)} characters does "
                                   "not fit the model's window on its own", self.attempts)
            pieces.append(current)
            current = paragraph
        if current:
            pieces.append(current)
        return pieces

    async def _journaled_call(self, step: Step, task_input: BaseModel, previous: Previous,
                              input_digest: str) -> dict[str, Any]:
        """One call of ``step`` (a piece), re-used from the journal when it is there and current."""
        recorded = self._reusable(step, input_digest)
        if recorded is not None:
            return dict(recorded["output"])
        output = await self._call(step, task_input, previous)
        await self._record(step, output, input_digest)
        return output

    def _input_digest(self, needs: tuple[str, ...]) -> str:
        """What a step was computed from: nothing (''), the one step it reads (that step's digest, as
        a chain always recorded it), or the digests of several, in the step's order."""
        if not needs:
            return ""
        if len(needs) == 1:
            return str(self.records[needs[0]]["digest"])
        return digest(canonical_json([[need, self.records[need]["digest"]] for need in needs]))


class _Piece(Step):
    """A piece of a ``map_reduce`` step, or its reduce: the step's schema, checks and versions under a
    name of its own (its journal entry and attempt budget), with the messages given."""

    def __init__(self, step: Step, name: str, messages: Callable[[BaseModel, Previous], Messages]) -> None:
        self.step, self.name, self._messages = step, name, messages
        self.prompt_version, self.output_model = step.prompt_version, step.output_model
        self.model, self.temperature = step.model, step.temperature

    def messages(self, task_input: BaseModel, previous: Previous) -> Messages:
        return self._messages(task_input, previous)

    def schema(self, task_input: BaseModel, previous: Previous) -> dict[str, Any]:
        return self.step.schema(task_input, previous)

    def check(self, task_input: BaseModel, output: BaseModel) -> None:
        self.step.check(task_input, output)


_PARAGRAPHS = re.compile(r"\n[ \t]*\n")


async def _cancel(running: dict[asyncio.Task[str], str]) -> None:
    """Cancel steps still running (a sibling failed, or the task itself was cancelled) and wait for them."""
    for task in running:
        task.cancel()
    if running:
        await asyncio.gather(*running, return_exceptions=True)
