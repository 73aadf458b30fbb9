"""Sessions as a producer names them and a kind declares them (docs/SESSIONS.md): the field or the
``agent.session`` header, both and different refused; ``Session`` refuses a state without its reducer
and the reverse; a kinds file's ``session`` table; what a step sees and how it is rendered."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from service.agents.declared import KindsFileError, load_kinds_file
from service.agents.tasks import canonical_json, decode_task, digest
from service.core.errors import PoisonError
from service.core.settings import Settings
from service.sdk import SESSION, Agent, Session, SessionView, StrictInput, session_messages


def _value(**extra: Any) -> bytes:
    return json.dumps({"task_id": "t-1", "kind": "chat", "input": {"text": "hi"}, **extra}).encode()


def test_a_task_names_its_session_by_the_field_or_the_header() -> None:
    assert decode_task(_value(session="s-1"), None, 10_000).session == "s-1"
    assert decode_task(_value(), [("agent.session", b"s-2")], 10_000).session == "s-2"
    assert decode_task(_value(session="s-3"), [("agent.session", b"s-3")], 10_000).session == "s-3"
    assert decode_task(_value(), None, 10_000).session is None


@pytest.mark.parametrize("extra, headers, says", [
    ({"session": "s-1"}, [("agent.session", b"s-2")], "different sessions"),
    ({}, [("agent.session", b"a b")], "not a session id"),
    ({}, [("agent.session", b"\xff")], "not UTF-8"),
    ({}, [("agent.session", b"x" * 5000)], "long"),
    ({"session": ""}, None, "session"),
    ({"session": 7}, None, "session"),
    ({"session": "s" * 201}, None, "session"),
])
def test_a_session_that_is_no_session_id_or_disagrees_is_schema(
        extra: dict[str, Any], headers: list[tuple[str, bytes]] | None, says: str) -> None:
    with pytest.raises(PoisonError) as caught:
        decode_task(_value(**extra), headers, 10_000)
    assert caught.value.reason == "schema"
    assert says in str(caught.value)


def test_the_same_input_in_two_sessions_is_two_pieces_of_work() -> None:
    def auto(session: str | None) -> str:
        raw = {"kind": "chat", "input": {"text": "yes"}} | ({"session": session} if session else {})
        return decode_task(json.dumps(raw).encode(), None, 10_000).key

    assert len({auto("a"), auto("b"), auto(None)}) == 3
    # a task naming no session keeps the fingerprint it always had
    plain = decode_task(json.dumps({"kind": "chat", "input": {"text": "yes"}}).encode(), None, 10_000)
    assert plain.fingerprint == digest(canonical_json({"kind": "chat", "input": {"text": "yes"}}))


class Board(BaseModel):
    items: list[str] = []


class Item(StrictInput):
    item: str


def add(state: Board, task_input: Item, result: Any) -> Board:
    return Board(items=[*state.items, task_input.item])


def test_state_and_reduce_go_together() -> None:
    assert Session().turns
    reduced = Session(state=Board, reduce=add)
    assert not reduced.turns
    assert reduced.next_state(None, Item(item="a"), {}) == {"items": ["a"]}
    assert reduced.next_state({"items": ["a"]}, Item(item="b"), {}) == {"items": ["a", "b"]}
    with pytest.raises(ValueError, match="together"):
        Session(state=Board)
    with pytest.raises(ValueError, match="together"):
        Session(reduce=add)


@pytest.mark.parametrize("bad", [{"ttl_s": 0}, {"ttl_s": 1.5}, {"ttl_s": True}, {"history_share": 0},
                                 {"history_share": 1.5}, {"keep_turns": 0}, {"keep_turns": "3"}])
def test_session_limits_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Session(**bad)


def test_an_agent_carries_its_session() -> None:
    from service.agents.base import Step

    class Answer(Step):
        output_model = Board

    agent = Agent("board", Item, (Answer(),), session=Session(state=Board, reduce=add, ttl_s=86_400))
    assert agent.session is not None and agent.session.ttl_s == 86_400
    assert Agent("plain", Item, (Answer(),)).session is None


KIND: dict[str, Any] = {"kinds": [{
    "name": "support", "version": "v1",
    "input_schema": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
    "steps": [{"name": "answer", "prompt": "Answer: {text}",
               "output_schema": {"type": "object", "properties": {"answer": {"type": "string"}}}}],
}]}


def _kinds(tmp_path: Path, session: Any) -> Path:
    data = copy.deepcopy(KIND)
    if session is not None:
        data["kinds"][0]["session"] = session
    path = tmp_path / "kinds.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_kinds_file_declares_a_session_of_turns(tmp_path: Path) -> None:
    (plain,) = load_kinds_file(_kinds(tmp_path, None))
    assert plain.session is None
    (agent,) = load_kinds_file(_kinds(tmp_path, {"ttl_s": 3600, "history_share": 0.25}))
    assert agent.session == Session(ttl_s=3600, history_share=0.25)
    assert agent.definition_digest != plain.definition_digest
    (default,) = load_kinds_file(_kinds(tmp_path, {}))
    assert default.session == Session()


def test_a_kinds_file_step_shows_the_model_its_session(tmp_path: Path) -> None:
    """A declared kind's steps put the session's summary and turns between the system message and
    the prompt, as a Python kind does with session_messages; a task without a session sends none."""
    (agent,) = load_kinds_file(_kinds(tmp_path, {}))
    (step,) = agent.steps
    task_input = agent.parse_input({"text": "and now?"})
    view = SessionView(id="s", version=2, state=None, summary="they asked about a refund", seen=1, summarized=3,
                       turns=({"task_id": "t1", "input": {"text": "where is it"}, "result": {"answer": "shipped"},
                               "at": "2026-01-01T00:00:00Z"},))
    messages = step.messages(task_input, {SESSION: view})
    assert [m["role"] for m in messages] == ["system", "system", "user", "assistant", "user"]
    assert "refund" in messages[1]["content"] and "where is it" in messages[2]["content"]
    assert "shipped" in messages[3]["content"] and messages[4]["content"] == "Answer: and now?"
    assert [m["role"] for m in step.messages(task_input, {})] == ["system", "user"]


@pytest.mark.parametrize("session, says", [
    ("yes", "session: expected a table"),
    ({"reduce": "add"}, "session.reduce: unknown field"),
    ({"ttl_s": -1}, "session: ttl_s"),
    ({"history_share": "half"}, "session"),
])
def test_a_kinds_file_session_mistake_is_named(tmp_path: Path, session: Any, says: str) -> None:
    with pytest.raises(KindsFileError, match=says):
        load_kinds_file(_kinds(tmp_path, session))


def test_a_view_renders_its_summary_and_turns_as_messages() -> None:
    view = SessionView(id="s", version=3, turns=({"task_id": "a", "input": {"text": "hi"}, "result": {"answer": "yo"},
                                                  "at": "2026-01-01T00:00:00Z"},),
                       state=None, summary="they met", seen=1, summarized=2)
    messages = session_messages(view)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert "they met" in messages[0]["content"] and "hi" in messages[1]["content"] and "yo" in messages[2]["content"]
    assert session_messages(None) == []
    assert view.result_fields() == {"id": "s", "version": 3, "turns_seen": 1, "summarized": 2}
    assert SESSION == "@session"


def test_sessions_settings() -> None:
    s = Settings()
    assert (s.sessions.poll_s, s.sessions.max_wait_s, s.sessions.stall_s) == (0.5, 300.0, 120.0)
