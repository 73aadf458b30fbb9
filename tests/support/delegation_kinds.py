"""Kinds that delegate, for the delegation tests: three levels, each kind a deployment may run.

::

    dl_orchestrate:  fanout (delegates) --> synthesis (model)
                        |-- 0: dl_leaf                 answer (model)
                        '-- 1: dl_middle:  sub (delegates) --> merge (model)
                                             '-- 0: dl_leaf

A worker loads them with ``AGENT_AGENTS=tests.support.delegation_kinds:agents`` (every child on the
deployment's own input topic); a test that runs several deployments builds them with :func:`fleet`,
naming the topic of each child kind that another deployment runs.

The ``synthesis`` and ``merge`` prompts list the children as :func:`children_lines` writes them, so a
test reads from the model's request what the step saw, and in which order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.sdk import Agent, Delegate, DelegateStep, Messages, Step, StrictInput, system_message, user_message


class TextInput(StrictInput):
    text: str = Field(min_length=1, max_length=2000)


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: str = Field(min_length=1)


def children_lines(delegated: Mapping[str, Any]) -> str:
    """The children of a delegating step's output, one line each, in the order the output lists them."""
    return "\n".join(f"child {c['n']} {c['id']} ({c['kind']}, {c['state']}): "
                     f"{json.dumps(c.get('result'), sort_keys=True)}" for c in delegated["children"])


def _text(task_input: BaseModel) -> str:
    assert isinstance(task_input, TextInput)
    return task_input.text


class AnswerStep(Step):
    name, prompt_version, output_model, needs = "answer", "answer-v1", Answer, ()

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        return [system_message("Answer in one sentence."), user_message(_text(task_input))]


class JoinStep(Step):
    """A model step that reads the children of the delegating step it needs."""

    output_model = Answer

    def __init__(self, name: str, delegating: str) -> None:
        self.name, self.prompt_version, self.needs = name, f"{name}-v1", (delegating,)
        self.delegating = delegating

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        return [system_message("Combine the answers."), user_message(children_lines(previous[self.delegating]))]


class Fanout(DelegateStep):
    """``dl_orchestrate``'s step: a leaf and a middle, in parallel."""

    name, needs = "fanout", ()

    def __init__(self, topics: Mapping[str, str], mode: str) -> None:
        self.topics, self.mode = topics, mode

    def children(self, task_input: BaseModel, previous: Mapping[str, Any]) -> list[Delegate]:
        text = _text(task_input)
        return [Delegate("dl_leaf", {"text": f"{text} (leaf)"}, topic=self.topics.get("dl_leaf")),
                Delegate("dl_middle", {"text": f"{text} (middle)"}, topic=self.topics.get("dl_middle"))]


class Sub(DelegateStep):
    """``dl_middle``'s step: one leaf, a hop further."""

    name, needs, mode = "sub", (), "required"

    def __init__(self, topic: str | None) -> None:
        self.topic = topic

    def children(self, task_input: BaseModel, previous: Mapping[str, Any]) -> list[Delegate]:
        return [Delegate("dl_leaf", {"text": f"{_text(task_input)} (grandchild)"}, topic=self.topic)]


def fleet(topics: Mapping[str, str] | None = None, *, grandchild_topic: str | None = None,
          mode: str = "required") -> list[Agent]:
    """The three kinds. ``topics``: the input topic of ``dl_leaf`` or ``dl_middle`` when another
    deployment runs it (for ``dl_orchestrate``'s children); ``grandchild_topic``: that of
    ``dl_middle``'s leaf; ``mode``: ``dl_orchestrate``'s (``required`` or ``optional``)."""
    return [
        Agent("dl_orchestrate", TextInput, (Fanout(dict(topics or {}), mode), JoinStep("synthesis", "fanout"))),
        Agent("dl_middle", TextInput, (Sub(grandchild_topic), JoinStep("merge", "sub"))),
        Agent("dl_leaf", TextInput, (AnswerStep(),)),
    ]


def agents() -> list[Agent]:
    """``AGENT_AGENTS=tests.support.delegation_kinds:agents``: every child on this deployment's topic."""
    return fleet()
