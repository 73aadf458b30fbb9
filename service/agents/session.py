"""What a kind declares about the sessions its tasks name, and what a step sees of one (docs/SESSIONS.md).

A kind with ``Agent(..., session=Session())`` runs the tasks of one session one at a time, in arrival
order, and applies each task's update to the session's state once per task id, as part of its
completion. Without ``state`` and ``reduce`` the state is the **turns**: each task's
``{task_id, input, result, at}`` in order. With them, ``reduce(state, task_input, result) -> state``
computes the next state; it must be pure (it may run again after a conflict).

A step sees the session in ``previous[SESSION]``: a :class:`SessionView`. The turns it carries are
the turns that fit ``history_share`` of the window after the summary (``summary`` covers the turns
before them, ``summarized`` of them; the pipeline's :mod:`~service.pipeline.history` folds the
oldest into it when they do not fit); :func:`session_messages` renders the summary, then the turns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

SESSION = "@session"  # the key of the session's view in a step's ``previous``
DEFAULT_TTL_S = 2_592_000  # 30 days
MAX_TTL_S = 10 * 365 * 86_400

Reduce = Callable[[Any, Any, Any], Any]  # (state, task_input, result) -> state: typed as the kind types them

SUMMARY_PREFIX = "Summary of the conversation so far: "  # how a stored summary opens its message


@dataclass(frozen=True)
class Session:
    """A kind's session declaration: ``state`` (a pydantic model) and ``reduce`` together or neither
    (the turns); ``ttl_s`` how long an idle session is kept; ``history_share`` the share of a step's
    window its turns may take; ``keep_turns`` the most turns shown (None: as the budget allows)."""

    state: type[BaseModel] | None = None
    reduce: Reduce | None = None
    ttl_s: int = DEFAULT_TTL_S
    history_share: float = 0.5
    keep_turns: int | None = None

    def __post_init__(self) -> None:
        if (self.state is None) != (self.reduce is None):
            raise ValueError("Session: state and reduce go together (or neither: the state is the turns)")
        if self.state is not None and not (isinstance(self.state, type) and issubclass(self.state, BaseModel)):
            raise ValueError("Session: state must be a pydantic model class")
        if self.reduce is not None and not callable(self.reduce):
            raise ValueError("Session: reduce must be callable as reduce(state, task_input, result)")
        if isinstance(self.ttl_s, bool) or not isinstance(self.ttl_s, int) or not 1 <= self.ttl_s <= MAX_TTL_S:
            raise ValueError(f"Session: ttl_s must be a whole number of seconds within 1..{MAX_TTL_S}")
        if isinstance(self.history_share, bool) or not 0.0 < float(self.history_share) <= 1.0:
            raise ValueError("Session: history_share must be within (0, 1]")
        if self.keep_turns is not None and (isinstance(self.keep_turns, bool) or not isinstance(self.keep_turns, int)
                                            or self.keep_turns < 1):
            raise ValueError("Session: keep_turns must be a whole number >= 1, or None")

    @property
    def turns(self) -> bool:
        """Whether the state is the turns (no reducer)."""
        return self.reduce is None

    def load(self, stored: Any) -> Any:
        """The state as a step sees it: the model validated from the stored JSON (its defaults when
        none is stored); None for the turns."""
        if self.state is None:
            return None
        return self.state.model_validate(stored if stored is not None else {})

    def next_state(self, stored: Any, task_input: BaseModel, result: Any) -> Any:
        """The reduced state as JSON data, from the stored state as read."""
        assert self.reduce is not None and self.state is not None
        state = self.reduce(self.load(stored), task_input, result)
        if not isinstance(state, self.state):
            state = self.state.model_validate(state)
        return state.model_dump(mode="json")


@dataclass(frozen=True)
class SessionView:
    """The session as a step sees it: its ``id``, the ``version`` read, the ``turns`` after the
    summary (each ``{task_id, input, result, at}``), the reduced ``state`` (None for the turns), the
    ``summary`` text of the turns before them (None: none), ``seen`` turns shown in full,
    ``summarized`` turns the summary covers and ``omitted`` turns neither shown nor summarised (a
    summary that failed for good: the result says so)."""

    id: str
    version: int
    turns: Sequence[Mapping[str, Any]]
    state: Any
    summary: str | None
    seen: int
    summarized: int
    omitted: int = 0

    def result_fields(self) -> dict[str, Any]:
        """What the result event says of the session the task saw (``omitted`` only when some were)."""
        fields = {"id": self.id, "version": self.version, "turns_seen": self.seen, "summarized": self.summarized}
        return fields | ({"omitted": self.omitted} if self.omitted else {})


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def session_messages(view: SessionView | None) -> list[dict[str, str]]:
    """The summary and the turns of ``view`` as chat messages (each turn's input as the user's, its
    result as the assistant's), to put before the task's own message; [] for no view."""
    if view is None:
        return []
    messages: list[dict[str, str]] = []
    if view.summary:
        messages.append({"role": "system", "content": SUMMARY_PREFIX + view.summary})
    for turn in view.turns:
        messages.append({"role": "user", "content": _text(turn.get("input"))})
        messages.append({"role": "assistant", "content": _text(turn.get("result"))})
    return messages
