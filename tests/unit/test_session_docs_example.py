"""docs/AGENTS.md's worked example of kinds with a session runs as written: its Python block imports
and builds the agents, their steps render a session built by hand, the reduce folds a result into
the board; the task it shows names its session as the decoder reads it, and the result's
``session`` field it shows has the fields a result carries."""

from __future__ import annotations

import json
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.agents.tasks import decode_task
from service.core.errors import PoisonError
from service.sdk import SESSION, AgentRegistry, Previous, SessionView

REPO = Path(__file__).resolve().parents[2]


def section() -> str:
    text = (REPO / "docs" / "AGENTS.md").read_text()
    start = text.index("\n## Sessions\n")
    return text[start:text.index("\n### Seeing and correcting a session\n", start)]


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section(), re.S | re.M)


@pytest.fixture
def example() -> Iterator[types.ModuleType]:
    """The Python block, run as the module ``session_agents`` it says it is."""
    (code,) = blocks("python")
    assert code.startswith("# session_agents.py\n")
    module = types.ModuleType("session_agents")
    sys.modules["session_agents"] = module  # pydantic resolves the models' annotations in their module
    try:
        exec(compile(code, "docs/AGENTS.md#session_agents.py", "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules["session_agents"]


def view(state: Any = None, turns: tuple[dict[str, Any], ...] = (), summary: str | None = None) -> SessionView:
    return SessionView(id="chat-118", version=len(turns), turns=turns, state=state, summary=summary,
                       seen=len(turns), summarized=3 if summary else 0)


def test_the_example_builds_its_agents(example: types.ModuleType) -> None:
    registry = AgentRegistry(example.agents(), source="docs")
    assert registry.kinds() == ["planning_board", "support_chat"]
    chat, board = registry.get("support_chat"), registry.get("planning_board")
    assert chat.session is not None and chat.session.turns
    assert board.session is not None and not board.session.turns
    assert board.session.state is example.Board and board.session.ttl_s == 90 * 86_400


def test_the_chat_step_puts_the_summary_and_the_turns_before_the_question(example: types.ModuleType) -> None:
    (step,) = example.agents()[0].steps
    question = example.Question(text="And can I change the delivery address?")
    turns = ({"task_id": "chat-118-1", "input": {"text": "Where is my order?"},
              "result": {"answer": "It ships tomorrow."}, "at": "2026-12-06T10:00:00.000Z"},
             {"task_id": "chat-118-2", "input": {"text": "Which carrier?"},
              "result": {"answer": "DHL."}, "at": "2026-12-06T10:01:00.000Z"})
    messages = step.messages(question, Previous({SESSION: view(turns=turns, summary="The customer ordered a lamp.")}))
    assert [m["role"] for m in messages] == ["system", "system", "user", "assistant", "user", "assistant", "user"]
    assert "ordered a lamp" in messages[1]["content"]
    assert "Where is my order?" in messages[2]["content"] and "DHL." in messages[5]["content"]
    assert messages[-1]["content"] == "And can I change the delivery address?"
    alone = step.messages(question, Previous())  # a task that names no session
    assert [m["role"] for m in alone] == ["system", "user"]


def test_the_board_reduces_and_its_step_sees_the_board(example: types.ModuleType) -> None:
    agent = example.agents()[1]
    session = agent.session
    stored = session.next_state(None, agent.parse_input({"card": "login page"}), {"points": 5})
    stored = session.next_state(stored, agent.parse_input({"card": "search"}), {"points": 3})
    assert stored == {"cards": {"login page": 5, "search": 3}, "total": 8}
    again = example.add_card(session.load(stored), example.Card(card="search"), {"points": 8})
    assert again == example.Board(cards={"login page": 5, "search": 8}, total=13)  # a card sized again

    (step,) = agent.steps
    messages = step.messages(example.Card(card="billing"), Previous({SESSION: view(state=session.load(stored))}))
    assert '"total":8' in messages[-1]["content"] and "billing" in messages[-1]["content"]
    assert '"total":0' in step.messages(example.Card(card="billing"), Previous())[-1]["content"]


def test_the_task_shown_names_its_session_as_the_decoder_reads_it() -> None:
    task, result = blocks("json")
    decoded = decode_task(task.encode(), None, 100_000)
    assert (decoded.key, decoded.kind, decoded.session) == ("chat-118-3", "support_chat", "chat-118")
    without = {k: v for k, v in json.loads(task).items() if k != "session"}
    assert decode_task(json.dumps(without).encode(), [("agent.session", b"chat-118")], 100_000).session == "chat-118"
    with pytest.raises(PoisonError):
        decode_task(task.encode(), [("agent.session", b"chat-119")], 100_000)

    (shown,) = re.findall(r'"session": (\{[^}]*\})', result)
    assert json.loads(shown) == view(turns=({}, {})).result_fields()  # what a result's session field holds
