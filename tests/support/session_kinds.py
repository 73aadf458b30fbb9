"""Kinds with sessions, for the tests that run them in spawned workers (``AGENT_AGENTS``).

- ``sk_chat``: one model step whose prompt shows the session's turns (the default session: the turns).
- ``sk_count``: the same step, its session a reduced :class:`Count` (no turns), each task named by
  its text. Its reducer pauses (it stays pure: the same arguments give the same state):
  :data:`REDUCE_PAUSE_S`, or :data:`SLOW_PAUSE_S` for a task whose text starts with
  :data:`SLOW_PREFIX`. The reduce runs while the task holds its session, before the ledger's DONE
  (and again in the duplicate path, before a late apply); the pause blocks the worker's loop, so
  whatever that worker has between DONE and apply waits too, which gives a SIGKILL time to land
  there. Short, and long for a few tasks only.

A worker loads them with ``AGENT_AGENTS=tests.support.session_kinds:agents``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.sdk import (
    SESSION,
    Agent,
    Messages,
    Session,
    Step,
    StrictInput,
    session_messages,
    system_message,
    user_message,
)

REDUCE_PAUSE_S = 0.02
SLOW_PAUSE_S = 0.6
SLOW_PREFIX = "slow-"


class Text(StrictInput):
    text: str = Field(min_length=1, max_length=500)


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: str = Field(min_length=1)


class Chat(Step):
    name, prompt_version, output_model = "answer", "sk-chat-v1", Answer

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        assert isinstance(task_input, Text)
        return [system_message("Answer the user."), *session_messages(previous.get(SESSION)),
                user_message(task_input.text)]


class Count(BaseModel):
    n: int = 0
    seen: list[str] = []


def count(state: Count, task_input: Text, result: Any) -> Count:
    """One more task, named by its text (the test sends each task's id as its text)."""
    time.sleep(SLOW_PAUSE_S if task_input.text.startswith(SLOW_PREFIX) else REDUCE_PAUSE_S)
    return Count(n=state.n + 1, seen=[*state.seen, task_input.text])


def agents() -> list[Agent]:
    """``AGENT_AGENTS=tests.support.session_kinds:agents``."""
    return [Agent("sk_chat", Text, (Chat(),), session=Session()),
            Agent("sk_count", Text, (Chat(),), session=Session(state=Count, reduce=count))]
