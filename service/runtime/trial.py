"""One task of a kind run in-process, without Kafka, Redis or a model server: the engine of
:mod:`service.sdk.testing` and of ``agent-service try``.

The run goes through the pipeline's own parts: the record decoded as the consumer decodes it
(:func:`~service.pipeline.decode.decode_record`), the step graph run by
:class:`~service.pipeline.graph.GraphRun`, each step's model calls by
:class:`~service.pipeline.calls.CallLoop` (validation, the step's checks, attempts and retries) and
a step with tools by :class:`~service.pipeline.tools.ToolLoop`. Only the ledger is a stand-in
(:class:`~service.runtime.memory_ledger.MemoryLedger`), and the model is whatever ``chat`` client
is given: a :class:`ScriptedModel`, or a real client pointed at a server.

Refused with :class:`TrialRefused`: a kind with sessions, and a kind with a step that delegates.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from consumers.records import Record
from dedup.records import Claim
from service.agents.base import Agent, Step
from service.agents.delegation import DelegateStep
from service.agents.registry import AgentRegistry
from service.agents.tasks import TaskEvent
from service.agents.tools import FunctionTool, Tool, ToolCall
from service.core.batch_settings import BatchSettings
from service.core.errors import PoisonError
from service.core.metrics import Metrics
from service.core.tracing import Tracing
from service.llm.client import ChatRequest, ChatResult
from service.llm.endpoints import PRIMARY, Chat, Endpoint
from service.llm.tenancy import Tenancy
from service.pipeline.base import Parked, ProcessorConfig, ToDeadLetter, utcnow
from service.pipeline.calls import CallLoop
from service.pipeline.capacity import Capacity
from service.pipeline.decode import decode_record
from service.pipeline.graph import GraphRun
from service.pipeline.waits import Waits
from service.runtime.memory_ledger import MemoryLedger

# retries at once: a test waits for nothing (the retry itself, its count and its outcome are the service's)
TRIAL_CONFIG = ProcessorConfig(backoff_base_s=0.0, backoff_max_s=0.0, max_wait_s=30.0,
                               batch=BatchSettings(enabled=False))  # in process: no Batch API, no parking
TRIAL_TOPIC = "agent.tasks"


class TrialRefused(ValueError):
    """The kind cannot run in-process (it has sessions, or a step that delegates)."""


class ScriptExhausted(AssertionError):
    """The scripted model was asked more often than its script answers."""


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """One tool call a scripted model asks for: the tool's name and its arguments (a dict, or the
    raw text a model wrote)."""

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)
    id: str | None = None


def tool_call(name: str, arguments: Mapping[str, Any] | str | None = None, *, id: str | None = None) -> ToolRequest:
    """A scripted answer that asks for the tool ``name`` with ``arguments``."""
    return ToolRequest(name, {} if arguments is None else arguments, id)


# one scripted answer: an output (a dict, sent as its JSON), the raw text of an answer (a str), one
# tool call or a round of them, or an exception the client raises (LLMTimeout, LLMRateLimited, ...)
Answer = Mapping[str, Any] | str | ToolRequest | Sequence[ToolRequest] | BaseException


class ScriptedModel:
    """A model client that answers from a script: the answers in order, or ``answer(request)``.

    Every request it was sent is kept in :attr:`requests` (messages, schema, tools, tool_choice)."""

    def __init__(self, answers: Iterable[Answer] | Callable[[ChatRequest], Answer], *, model: str = "scripted") -> None:
        self._answer = answers if callable(answers) else None
        self._script = [] if callable(answers) else list(answers)
        self.model = model
        self.requests: list[ChatRequest] = []

    @property
    def left(self) -> int:
        """The scripted answers not yet given."""
        return len(self._script)

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.requests.append(request)
        if self._answer is not None:
            answer = self._answer(request)
        elif self._script:
            answer = self._script.pop(0)
        else:
            raise ScriptExhausted(f"the scripted model was asked {len(self.requests)} times and has "
                                  f"{len(self.requests) - 1} answers ({request.idempotency_key})")
        return self._result(answer, len(self.requests))

    def _result(self, answer: Answer, n: int) -> ChatResult:
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, ToolRequest):
            answer = [answer]
        if isinstance(answer, str):
            return ChatResult(answer, "stop", self.model, 0, 0, 0.0)
        if isinstance(answer, Mapping):
            return ChatResult(json.dumps(answer, ensure_ascii=False), "stop", self.model, 0, 0, 0.0)
        calls = tuple({"id": call.id or f"call_{n}_{i}", "name": call.name,
                       "arguments": call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)}
                      for i, call in enumerate(answer, 1))
        return ChatResult("", "tool_calls", self.model, 0, 0, 0.0, tool_calls=calls)


@dataclass(frozen=True, slots=True)
class StepRun:
    """One step of the run, as its journal holds it: ``input_digest`` is what it was computed from
    (the digests of the steps it reads; empty for a step that reads none), ``attempts`` its model
    calls counted (a tool round is one), ``output`` None when it did not finish."""

    name: str
    prompt_version: str
    input_digest: str
    output: dict[str, Any] | None
    attempts: int


@dataclass(frozen=True, slots=True)
class TrialRun:
    """What one task came to: ``status`` succeeded, dead_lettered (with the ``reason`` and ``error``
    the dead letter would carry) or parked (``waiting`` says for what)."""

    kind: str
    task_id: str
    fingerprint: str  # the task's input digest, as the ledger knows it
    status: Literal["succeeded", "dead_lettered", "parked"]
    result: dict[str, Any] | None
    reason: str | None
    error: str | None
    attempts: int
    steps: list[StepRun]
    tool_calls: list[dict[str, Any]]  # the journal's record of each call, in order, with its step and outcome
    audit: list[dict[str, Any]]  # the audit entries, as the audit topic would get them
    waiting: dict[str, Any] | None = None
    exception: Exception | None = None  # what the kind's code raised, for an `internal` dead letter

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    def step(self, name: str) -> StepRun:
        """The step called ``name`` (KeyError when it did not run)."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


def with_tools(agent: Agent, tools: Mapping[str, Tool | Callable[[ToolCall], Any]]) -> Agent:
    """``agent`` with its steps' tools of these names replaced: a :class:`Tool` as it is, a function
    as a :class:`FunctionTool` with the replaced tool's parameters and description."""
    offered = {t.name for s in agent.steps for t in s.tools}
    unknown = sorted(set(tools) - offered)
    if unknown:
        raise ValueError(f"kind {agent.kind!r} offers no tool named {unknown[0]!r} (it offers: "
                         f"{', '.join(sorted(offered)) or 'none'})")
    if not tools:
        return agent
    steps = tuple(_step_with_tools(s, tools) for s in agent.steps)
    return dataclasses.replace(agent, steps=steps)


def _step_with_tools(step: Step, tools: Mapping[str, Tool | Callable[[ToolCall], Any]]) -> Step:
    if not any(t.name in tools for t in step.tools):
        return step
    replaced = copy.copy(step)
    replaced.tools = tuple(_tool(t, tools[t.name]) if t.name in tools else t for t in step.tools)
    return replaced


def _tool(original: Tool, given: Tool | Callable[[ToolCall], Any]) -> Tool:
    if isinstance(given, Tool):
        return given
    return FunctionTool(original.name, given, parameters=original.parameters, description=original.description,
                        timeout_s=original.timeout_s)


def refusal(agent: Agent) -> str | None:
    """Why ``agent`` cannot run in-process, or None."""
    if agent.session is not None:
        return (f"kind {agent.kind!r} has sessions: its tasks need the ledger's session store; "
                "run it through the service (docs/SESSIONS.md)")
    delegating = [s.name for s in agent.steps if isinstance(s, DelegateStep)]
    if delegating:
        return (f"kind {agent.kind!r}: step {delegating[0]!r} delegates to other kinds, whose tasks go "
                "through Kafka; run it through the service, or run each child kind on its own")
    return None


async def run_trial(agent: Agent, task_input: Mapping[str, Any], chat: Chat, *, task_id: str = "trial-1",
                    config: ProcessorConfig = TRIAL_CONFIG, model_name: str = "scripted") -> TrialRun:
    """Run one task of ``agent`` on ``task_input`` against ``chat``; see the module docstring."""
    why = refusal(agent)
    if why is not None:
        raise TrialRefused(why)
    agents = AgentRegistry([agent], source="trial")
    event = TaskEvent(task_id=task_id, kind=agent.kind, input=dict(task_input))
    record = Record(TRIAL_TOPIC, 0, 0, task_id.encode(), event.model_dump_json(exclude_none=True).encode())
    try:
        task, agent, parsed = decode_record(record, agents, config.max_task_bytes)
    except PoisonError as exc:
        return TrialRun(agent.kind, task_id, "", "dead_lettered", None, exc.reason, str(exc), 0, [], [], [])
    ledger = MemoryLedger()
    claim = Claim(decision="claimed", fence=ledger.claim(task.key), attempts=0,
                  lease_remaining_ms=config.lease_ms, published_by=None)
    run = GraphRun(_calls(ledger, agents, chat, config, model_name), task, agent, parsed, claim, record)
    outcome = await _outcome(run, agent)
    journal = await ledger.effects.journal(task.key)
    # a call refused before it ran (invalid, over the limit) is journaled with its outcome as its state
    calls = sorted(({"step": k[2:].rpartition(":")[0], "outcome": v["state"], **v}
                    for k, v in journal.items() if k.startswith("c:")),
                   key=lambda c: c.get("seq", 0))
    return TrialRun(
        kind=agent.kind, task_id=task.key, fingerprint=task.fingerprint, attempts=ledger.tasks[task.key].attempts,
        steps=_steps(agent, run, ledger, task.key), tool_calls=calls, audit=await ledger.effects.audit(task.key),
        **outcome)


async def _outcome(run: GraphRun, agent: Agent) -> dict[str, Any]:
    """The run to its end, as the processor ends a task: its result, its dead letter, or its parking.

    An exception of the kind's own code is the service's ``internal`` dead letter at once (the
    service tries the record ``internal_retries`` more times first), kept in ``exception``."""
    outcome: dict[str, Any] = {"status": "succeeded", "result": None, "reason": None, "error": None,
                               "waiting": None, "exception": None}
    try:
        await run.start()
        outcome["result"] = agent.result(run.outputs)
    except ToDeadLetter as dl:
        outcome.update(status="dead_lettered", reason=dl.reason, error=dl.error)
    except Parked as parked:
        outcome.update(status="parked", waiting=parked.waiting, error=str(parked))
    except ScriptExhausted:
        raise  # the test's script, not the kind, is short
    except Exception as exc:  # noqa: BLE001 - as the processor: a bug ends the task as `internal`
        outcome.update(status="dead_lettered", reason="internal", error=f"{type(exc).__name__}: {str(exc)[:500]}",
                       exception=exc)
    return outcome


def _calls(ledger: MemoryLedger, agents: AgentRegistry, chat: Chat, config: ProcessorConfig,
           model_name: str) -> CallLoop:
    """The call loop the processor builds (:meth:`TaskProcessor.build`), on the in-memory ledger."""
    metrics, waits = Metrics(), Waits()
    capacity = Capacity(primary=Endpoint(PRIMARY, "in-process", chat), fallbacks=(), agents=agents,
                        default_unavailable="wait", tenancy=Tenancy(), budgets=None, waits=waits, metrics=metrics,
                        config=config, clock=utcnow, model_name=model_name)

    async def audit(_task_key: str) -> None:  # the entries stay in the ledger: TrialRun.audit
        return None

    return CallLoop(ledger=ledger, capacity=capacity, waits=waits, metrics=metrics,  # type: ignore[arg-type]
                    config=config, clock=utcnow, tracing=Tracing.disabled(), model_name=model_name,
                    worker_id="trial", audit=audit)


def _steps(agent: Agent, run: GraphRun, ledger: MemoryLedger, task_key: str) -> list[StepRun]:
    """The steps that ran or were tried, in declaration order (pieces of a map_reduce step after it)."""
    journal = ledger.tasks[task_key].steps
    counted = ledger.tasks[task_key].step_attempts
    names = [s.name for s in agent.steps]
    names += sorted(n for n in {*journal, *counted} if n not in names)
    steps = []
    for name in names:
        record = run.records.get(name) or journal.get(name)
        if record is None and not counted.get(name):
            continue  # never reached
        version = agent.step(name).prompt_version if name in agent.graph else str((record or {}).get(
            "prompt_version", ""))
        steps.append(StepRun(name, version, str((record or {}).get("input_digest", "")),
                             (record or {}).get("output"), counted.get(name, 0)))
    return steps
