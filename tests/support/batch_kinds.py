"""A kind of the batch lane for the tests (``AGENT_AGENTS=tests.support.batch_kinds:agents``):
``batch_classify``, the built-in ``classify`` with ``batch = True``."""

from __future__ import annotations

import dataclasses
from typing import Any

from service.agents.base import Agent
from service.agents.registry import AgentRegistry, default_agents

KIND = "batch_classify"
LABELS = ["complaint", "praise", "question"]


def batch_classify() -> Agent[Any]:
    return dataclasses.replace(default_agents().get("classify"), kind=KIND, batch=True)


def agents() -> list[Agent[Any]]:
    return [batch_classify()]


def registry() -> AgentRegistry:
    """The built-in kinds and ``batch_classify``."""
    out = default_agents()
    out.register(batch_classify())
    return out
