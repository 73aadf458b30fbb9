"""One tool call of a step: asked, intended, executed, refused, unknown, reconciled, undone.

The journal (:mod:`dedup.effects`) holds a call as the model asked for it (in its round,
``r:<step>:<round>``), then at ``c:<step>:<ordinal>``: its intent, then its result with an
outcome, and at ``u:<step>:<ordinal>`` its undo. :func:`call_state` reads the state of a call from
its journal record; :data:`OUTCOME_EVENT` names the move each recorded outcome makes. ``unknown``
is never journaled as such: it is an intent whose run's outcome this worker does not know (the tool
raised or timed out), or one found without a result when the task comes back.
"""

from __future__ import annotations

from typing import Any

from dedup.lifecycles.machine import Lifecycle, Transition

_T = Transition

TOOL_CALL = Lifecycle(
    name="tool call",
    initial="none",
    states={
        "asked": "the model asked for it: its round is journaled, nothing of the call yet",
        "intended": "its intent journaled (key, tool, argument digest, fence): it is about to run",
        "executed": "it ran; its result and audit entry journaled",
        "refused": "it never ran (over the step's limit, an unknown tool, invalid arguments) or the tool "
                   "refused it (nothing happened): the model is told",
        "unknown": "it may have acted: the tool raised or timed out, or the task came back to an intent "
                   "without a result",
        "reconciled": "the downstream (or an operator) says it landed: that result journaled",
        "undone": "compensated: its undo ran, once",
    },
    transitions=(
        _T("none", "ask", "asked", "the model's round of calls journaled, first writer wins"),
        _T("asked", "refuse", "refused", "over the step's limit, no such tool, or arguments that fail its schema"),
        _T("asked", "intend", "intended", "approved or needing no approval; the holder's fence (first writer)"),
        _T("intended", "run", "executed", "the tool returned"),
        _T("intended", "refuse", "refused", "the tool refused it (ToolError): nothing happened"),
        _T("intended", "fail", "unknown", "the tool raised or timed out"),
        _T("intended", "recover", "unknown", "found intended without a result when the task comes back"),
        _T("unknown", "land", "reconciled", "the downstream or an operator says it landed"),
        _T("unknown", "absent", "intended", "the downstream or an operator says it did not land: it runs "
           "again with its key, under a fence that still holds"),
        _T("executed", "undo", "undone", "its tool can undo it; the task has ended"),
        _T("reconciled", "undo", "undone", "its tool can undo it; the task has ended"),
    ),
    final=frozenset({"refused", "undone"}),
)

# the outcome a result is journaled with -> the event that made it
OUTCOME_EVENT = {"executed": "run", "refused": "refuse", "invalid": "refuse", "limit": "refuse",
                 "reconciled_landed": "land"}


def call_state(record: Any, undo: Any = None) -> str:
    """The state of a call from its journal record (``c:``; None: only asked) and its undo (``u:``).

    A journaled intent reads ``intended``: whether it is ``unknown`` is for the worker that finds it
    to say (it moves it with ``recover``)."""
    if isinstance(undo, dict) and undo.get("state") == "done":
        return "undone"
    if not isinstance(record, dict):
        return "asked"
    state = record.get("state")
    if state == "intent":
        return "intended"
    outcome = record.get("outcome") if state == "done" else state  # a refusal is journaled as its outcome
    event = OUTCOME_EVENT.get(str(outcome))
    if event is None:
        raise ValueError(f"tool call: no state for a journal record in state {state!r}, outcome {outcome!r}")
    return TOOL_CALL.target(event)
