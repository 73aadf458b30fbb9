"""Delegation: a step that hands work to other kinds and waits for them instead of calling the model.

A :class:`DelegateStep` is a step of the graph like any other (``needs``, its output read by the
steps after it in ``previous``), but it makes no model call: :meth:`DelegateStep.children` returns
the child tasks (:class:`Delegate`), the pipeline sends each once under a deterministic id and the
task waits, parked, until every child has ended. Its output (:class:`DelegateOutput`) lists the
children's outcomes in the declared order, whatever order they finished in (docs/DELEGATION.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from service.agents.base import InputT, Messages, Previous, Step

DELEGATE_MODES = ("required", "optional")
MAX_BUDGET_S = 366 * 24 * 3600.0  # a child's own time: finite, at most a year


def budget_problem(budget: Any) -> str | None:
    """Why ``budget`` is no child's time in seconds (None: it is one)."""
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        return f"{budget!r} is not a number of seconds"
    if not (math.isfinite(budget) and 0 < budget <= MAX_BUDGET_S):
        return f"{budget!r} is not a positive number of seconds up to {MAX_BUDGET_S:.0f}"
    return None
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")  # as service.agents.tasks.KIND_PATTERN


@dataclass(frozen=True, slots=True)
class Delegate:
    """One child task: its ``kind`` and ``input``; ``topic`` names another deployment's input topic
    (None: this deployment's); ``budget_s`` bounds its time below the parent's deadline."""

    kind: str
    input: dict[str, Any] = field(default_factory=dict)
    topic: str | None = None
    budget_s: float | None = None

    def problem(self) -> str | None:
        """Why this child cannot be sent (None: it can)."""
        if not isinstance(self.kind, str) or not _KIND_RE.fullmatch(self.kind):
            return f"child kind {str(self.kind)[:80]!r} is not a kind name"
        if not isinstance(self.input, dict):
            return f"child of kind {self.kind}: its input is not an object"
        if self.topic is not None and (not isinstance(self.topic, str) or not self.topic or len(self.topic) > 249):
            return f"child of kind {self.kind}: topic {str(self.topic)[:80]!r} is not a topic name"
        if self.budget_s is not None and (problem := budget_problem(self.budget_s)):
            return f"child of kind {self.kind}: budget_s: {problem}"
        return None


class ChildOutcome(BaseModel):
    """How one child ended, at its place ``n`` in the declared order."""

    n: int
    id: str
    kind: str
    state: Literal["succeeded", "dead"]
    result: Any = None
    reason: str | None = None
    error: str | None = None


class DelegateOutput(BaseModel):
    """A delegating step's output: its children in declared order; ``degraded`` when an optional
    delegation went on without a child that failed."""

    children: list[ChildOutcome]
    degraded: bool = False


class DelegateStep(Step[InputT, DelegateOutput]):
    """A step that delegates: subclasses set ``name``, ``mode`` and :meth:`children`.

    ``mode``: ``"required"`` (a child's failure fails the step, with the child's reason in the
    task's dead letter) or ``"optional"`` (the step goes on with what it has, flagged degraded)."""

    name: str = "delegate"
    prompt_version: str = "delegate-v1"  # no prompt: the version of what the step hands out
    output_model: type[DelegateOutput] = DelegateOutput
    mode: str = "required"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.mode not in DELEGATE_MODES:
            raise ValueError(f"delegating step {cls.__name__}: mode must be one of {', '.join(DELEGATE_MODES)}, "
                             f"not {cls.mode!r}")

    def children(self, task_input: InputT, previous: Previous) -> list[Delegate]:
        """The child tasks, in the order their outcomes appear in the step's output."""
        raise NotImplementedError(f"delegating step {self.name} has no children()")

    def messages(self, task_input: InputT, previous: Previous) -> Messages:
        raise TypeError(f"step {self.name} delegates: it sends no prompt to the model")
