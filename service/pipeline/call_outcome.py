"""What one model call came to, as one type: the step's output, the tools the model asks to call, or
a failure with whose it is and how long the endpoint asked to wait.

    CallOutcome = Answer | ToolCalls | Failure

Whose a failure is decides what it costs: the task's (``blame="task"``: an invalid output, a 5xx, a
timeout) spends one of the task's attempts; the endpoint's (``blame="endpoint"``: a 429, a revoked
key, nothing listening) gives the attempt back and waits for the endpoint. A 400 for the request is
neither: it dead-letters the task at once (:class:`~service.pipeline.base.ToDeadLetter`), no outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Blame = Literal["task", "endpoint"]


@dataclass(frozen=True, slots=True)
class Answer:
    """The model answered with the step's output, parsed and checked."""

    output: dict[str, Any]


class ToolCalls(tuple[dict[str, str], ...]):
    """The model's answer to a step with tools: the calls it asks for, ``{"id", "name", "arguments"}``."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Failure:
    """The call failed: ``error`` says how, ``blame`` whose it is, ``delay`` how long the endpoint
    asked to wait before the next call (None: it asked nothing)."""

    error: Exception
    blame: Blame = "task"
    delay: float | None = None

    @property
    def endpoints_fault(self) -> bool:
        return self.blame == "endpoint"


CallOutcome = Answer | ToolCalls | Failure
