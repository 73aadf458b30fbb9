"""docs/AGENTS.md shows the typed form as it runs: its "In Python" example is the sample user package
that ``mypy --strict`` checks (tests/unit/test_sample_agents_typing.py), and its tools example makes
the schemas it says and runs under ``service.sdk.testing``: a typed function tool called once, a call
the step's typed ``approval`` holds back."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from service.sdk import Agent
from service.sdk.testing import ScriptedModel, run, tool_call

REPO = Path(__file__).resolve().parents[2]


def section(title: str) -> str:
    text = (REPO / "docs" / "AGENTS.md").read_text()
    start = text.index(f"\n## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


def test_the_in_python_example_is_the_sample_package() -> None:
    (code,) = re.findall(r"^```python\n(.*?)^```", section("In Python"), re.S | re.M)
    sample = (REPO / "tests" / "agents_pkg" / "sample_agents" / "__init__.py").read_text()

    assert code.startswith("# sample_agents/__init__.py\n")
    assert code.removeprefix("# sample_agents/__init__.py\n") == sample[sample.index("from typing import"):]
    assert "assert " not in code and "cast(" not in code


@pytest.fixture
def tools_example() -> Any:
    code = re.findall(r"^```python\n(.*?)^```", section("Agents that act: tools"), re.S | re.M)[0]
    module = types.ModuleType("tools_example")
    sys.modules[module.__name__] = module  # function_tool reads the annotations in the module's namespace
    try:
        exec(compile(code, "docs/AGENTS.md#tools", "exec"), module.__dict__)  # noqa: S102 - the documented example
        yield module
    finally:
        del sys.modules[module.__name__]


def test_the_tools_example_makes_its_schemas_from_the_model_and_the_signature(tools_example: Any) -> None:
    tickets, add_note = tools_example.tickets, tools_example.add_note

    assert tickets.parameters["required"] == ["title"]
    assert tickets.parameters["properties"]["refund"]["minimum"] == 0
    assert add_note.description == "Add a note to the customer's file."
    assert add_note.parameters["required"] == ["text"] and "call" not in add_note.parameters["properties"]
    assert add_note.parameters["properties"]["text"]["maxLength"] == 500
    assert add_note.parameters["additionalProperties"] is False


def test_the_tools_example_runs_its_typed_tool_once_and_holds_a_large_refund(tools_example: Any) -> None:
    agent = Agent("file", tools_example.Complaint, (tools_example.File(),))
    model = ScriptedModel([tool_call("add_note", {"text": "charged twice"}), {"reply": "Noted."}])

    outcome = run(agent, {"text": "I was charged twice."}, model=model)

    assert outcome.ok, outcome.error
    assert list(tools_example.notes.values()) == ["charged twice"]
    assert [(c["tool"], c["outcome"]) for c in outcome.tool_calls] == [("add_note", "executed")]

    held = run(agent, {"text": "Refund me."}, model=ScriptedModel([
        tool_call("open_ticket", {"title": "Refund", "refund": 250})]), task_id="trial-2")

    assert held.status == "parked"
    assert held.waiting is not None and "refund above 100" in str(held.waiting)
