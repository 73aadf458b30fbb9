"""A session's history as a budget (docs/SESSIONS.md, "History as a budget"): the arithmetic of what
fits ``history_share`` of the window, how many of the oldest turns a summary folds, and the
``@summary`` request the model is sent."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from service.agents.session import SessionView, session_messages
from service.core.errors import InvalidOutput
from service.pipeline.base import estimate_tokens
from service.pipeline.history import (
    SUMMARY_PROMPT_VERSION,
    SUMMARY_STEP,
    SUMMARY_SYSTEM,
    SummaryStep,
    budget_tokens,
    history_tokens,
    request_fits,
    summary_room,
    to_fold,
)


def _turn(i: int, size: int = 30) -> dict[str, Any]:
    return {"task_id": f"t-{i}", "input": {"text": f"{i:03d}" + "x" * size}, "result": {"answer": "y" * size},
            "at": "2026-01-01T00:00:00.000Z"}


class _Input(BaseModel):
    text: str = "now"


def test_the_budget_is_the_share_of_the_window_and_the_summary_has_a_quarter_of_it_at_most() -> None:
    assert budget_tokens(0.5, 8192) == 4096
    assert budget_tokens(0.01, 256) == 2
    assert budget_tokens(1e-9, 256) == 1  # never nothing
    assert summary_room(4096, 512) == 512  # the answer's limit
    assert summary_room(400, 512) == 100  # a quarter of a small budget


def test_the_history_is_counted_as_it_is_rendered() -> None:
    turns = [_turn(i) for i in range(3)]
    view = SessionView(id="s", version=3, turns=turns, state=None, summary="earlier", seen=3, summarized=2)
    assert history_tokens("earlier", turns) == estimate_tokens(session_messages(view), None)
    assert history_tokens(None, []) == 0


def test_turns_that_fit_fold_nothing() -> None:
    turns = [_turn(i) for i in range(5)]
    budget = history_tokens(None, turns)
    assert to_fold(None, turns, budget=budget, room=10, keep_turns=None) == 0
    with_summary = history_tokens("a summary", turns)
    assert to_fold("a summary", turns, budget=with_summary, room=10, keep_turns=None) == 0
    assert to_fold("a summary", turns, budget=with_summary - 1, room=10, keep_turns=None) > 0
    assert to_fold(None, [], budget=1, room=1, keep_turns=None) == 0


def test_over_budget_the_oldest_fold_and_the_kept_take_half_of_what_the_summary_leaves() -> None:
    turns = [_turn(i) for i in range(20)]
    budget = history_tokens(None, turns[:8])
    room = summary_room(budget, 512)
    fold = to_fold(None, turns, budget=budget, room=room, keep_turns=None)
    kept = turns[fold:]
    assert 0 < fold < len(turns)
    assert history_tokens(None, kept) <= (budget - room) // 2  # the kept leave room for the next turns
    assert history_tokens(None, turns[fold - 1:]) > (budget - room) // 2  # and are as many as fit
    # one turn more than the budget is enough to fold
    just = [_turn(i) for i in range(9)]
    assert to_fold(None, just, budget=budget, room=room, keep_turns=None) > 0


def test_a_stored_summary_counts_against_the_budget() -> None:
    turns = [_turn(i) for i in range(6)]
    budget = history_tokens(None, turns) + 5
    assert to_fold(None, turns, budget=budget, room=20, keep_turns=None) == 0
    assert to_fold("s" * 300, turns, budget=budget, room=20, keep_turns=None) > 0


def test_a_newest_turn_larger_than_the_room_folds_every_turn() -> None:
    turns = [_turn(0), _turn(1, size=3000)]
    assert to_fold(None, turns, budget=200, room=50, keep_turns=None) == 2


def test_keep_turns_caps_the_turns_shown() -> None:
    turns = [_turn(i, size=1) for i in range(6)]
    huge = 10_000
    assert to_fold(None, turns, budget=huge, room=100, keep_turns=6) == 0
    assert to_fold(None, turns, budget=huge, room=100, keep_turns=4) == 2
    assert to_fold(None, turns, budget=huge, room=100, keep_turns=1) == 5


def test_a_summary_bigger_than_the_budget_with_no_turns_to_fold_folds_nothing() -> None:
    assert to_fold("s" * 3000, [], budget=100, room=25, keep_turns=None) == 0


def test_the_summary_request_is_recognisable_carries_the_old_summary_and_the_folded_turns() -> None:
    folded = [_turn(3), _turn(4)]
    step = SummaryStep("what came before", folded, max_chars=120)
    assert step.name == SUMMARY_STEP == "@summary" and step.prompt_version == SUMMARY_PROMPT_VERSION
    messages = step.messages(_Input(), {})
    assert messages[0] == {"role": "system", "content": SUMMARY_SYSTEM}
    told = json.loads(messages[1]["content"])
    assert told["summary_so_far"] == "what came before"
    assert [t["input"] for t in told["turns"]] == [t["input"] for t in folded]
    assert "task_id" not in json.dumps(told)  # the model sees the conversation, not the bookkeeping
    schema = step.schema(_Input(), {})
    assert schema["properties"]["summary"]["maxLength"] == 120 and schema["required"] == ["summary"]
    assert step.parse(_Input(), json.dumps({"summary": "short"})) == {"summary": "short"}
    with pytest.raises(InvalidOutput):
        step.parse(_Input(), json.dumps({"summary": "z" * 121}))
    with pytest.raises(InvalidOutput):
        step.parse(_Input(), json.dumps({"summary": ""}))


def test_a_view_that_omitted_turns_says_so_and_one_that_did_not_keeps_its_fields() -> None:
    view = SessionView(id="s", version=4, turns=[], state=None, summary=None, seen=0, summarized=0)
    assert view.result_fields() == {"id": "s", "version": 4, "turns_seen": 0, "summarized": 0}
    cut = SessionView(id="s", version=4, turns=[], state=None, summary=None, seen=1, summarized=0, omitted=3)
    assert cut.result_fields() == {"id": "s", "version": 4, "turns_seen": 1, "summarized": 0, "omitted": 3}


def test_the_kept_turns_are_counted_as_the_estimate_counts_them() -> None:
    turns = [_turn(i, size=40 + i) for i in range(12)]
    for half in range(1, 400, 7):
        budget, room = 2 * half + 10, 10  # (budget - room) // 2 == half
        fold = to_fold(None, turns, budget=budget, room=room, keep_turns=None)
        if fold == 0:  # all fit the budget
            assert history_tokens(None, turns) <= budget
            continue
        if fold < len(turns):
            assert history_tokens(None, turns[fold:]) <= half
        assert history_tokens(None, turns[fold - 1:]) > half


def test_a_summary_request_is_checked_against_the_window_with_its_answer() -> None:
    turns = [_turn(i, size=100) for i in range(40)]
    step = SummaryStep(None, turns, max_chars=300)
    needed = estimate_tokens(step.messages(_Input(), {}), step.schema(_Input(), {}))
    assert request_fits(step, needed + 512, 512)
    assert not request_fits(step, needed + 511, 512)
