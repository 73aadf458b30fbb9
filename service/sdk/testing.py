"""Run a kind in a unit test: in-process, against a scripted model and in-memory tools, with no
Kafka, Redis or model server (docs/AGENTS.md, "Testing your agent")::

    from service.sdk.testing import ScriptedModel, run, tool_call

    model = ScriptedModel([{"summary": "Charged twice."}, {"queue": "billing", "urgent": False}])
    outcome = run(my_agent, {"subject": "Refund", "body": "I was charged twice."}, model=model)
    assert outcome.ok and outcome.result == {"queue": "billing", "urgent": False}

The task runs through the service's own pipeline: its input validated as the consumer does, its
steps run by the same graph, each answer parsed and checked by the step (an invalid one retried
within ``max_attempts``, then dead-lettered ``invalid_output``), a step's tool calls run by the same
tool loop and journaled with their audit entries. Only the ledger is an in-memory stand-in.

The names:

- ``run``: run one task of a kind (an ``Agent``, or a kind's name in ``agents``) and return its ``TrialRun``.
- ``arun``: the same, awaited (inside a running event loop).
- ``ScriptedModel``: a model that answers from a script: answers in order, or a function of the request.
- ``tool_call``: a scripted answer that asks for a tool: ``tool_call("open_ticket", {"title": ...})``.
- ``ToolRequest``: what ``tool_call`` makes; a list of them is one round of calls.
- ``TrialRun``: the outcome: ``status``, ``result``, ``reason`` (the dead letter's), ``steps``,
  ``tool_calls``, ``audit``, ``attempts``, ``waiting`` (a parked task's).
- ``StepRun``: one step of a run: its name, input digest, output and attempts.
- ``TrialRefused``: the kind cannot run in-process (it has sessions, or a step that delegates).
- ``ScriptExhausted``: the scripted model was asked more often than it has answers.
- ``ChatRequest``: one request the model is sent (``messages``, ``schema``, ``tools``, ``tool_choice``):
  what a scripting function is given, and what ``ScriptedModel.requests`` keeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from service.agents.base import Agent
from service.agents.registry import AgentRegistry, default_agents
from service.agents.tools import Tool, ToolCall
from service.llm.client import ChatRequest
from service.llm.endpoints import Chat
from service.runtime.trial import (
    TRIAL_CONFIG,
    ScriptedModel,
    ScriptExhausted,
    StepRun,
    ToolRequest,
    TrialRefused,
    TrialRun,
    run_trial,
    tool_call,
    with_tools,
)

__all__ = ["ChatRequest", "ScriptExhausted", "ScriptedModel", "StepRun", "ToolRequest", "TrialRefused", "TrialRun", "arun", "run",
           "tool_call"]


async def arun(kind: Agent | str, task_input: Mapping[str, Any], *, model: Chat,
               tools: Mapping[str, Tool | Callable[[ToolCall], Any]] | None = None,
               agents: AgentRegistry | None = None, task_id: str = "trial-1", max_attempts: int = 4,
               context_tokens: int = 8192) -> TrialRun:
    """Run one task of ``kind`` on ``task_input``, its model calls answered by ``model``.

    ``kind``: an :class:`~service.sdk.Agent`, or a kind's name in ``agents`` (the built-in kinds
    when None). ``tools``: tools of the kind's steps replaced by name, each by a
    :class:`~service.sdk.Tool` or a function of the :class:`~service.sdk.ToolCall` (it keeps the
    replaced tool's parameters). ``max_attempts``: a step's model calls before it is dead-lettered."""
    agent = kind if isinstance(kind, Agent) else (agents or default_agents()).get(kind)
    config = dataclasses.replace(TRIAL_CONFIG, max_attempts=max_attempts, context_tokens=context_tokens)
    return await run_trial(with_tools(agent, tools or {}), task_input, model, task_id=task_id, config=config)


def run(kind: Agent | str, task_input: Mapping[str, Any], *, model: Chat,
        tools: Mapping[str, Tool | Callable[[ToolCall], Any]] | None = None,
        agents: AgentRegistry | None = None, task_id: str = "trial-1", max_attempts: int = 4,
        context_tokens: int = 8192) -> TrialRun:
    """:func:`arun` on an event loop of its own: for a test that is not async."""
    return asyncio.run(arun(kind, task_input, model=model, tools=tools, agents=agents, task_id=task_id,
                            max_attempts=max_attempts, context_tokens=context_tokens))
