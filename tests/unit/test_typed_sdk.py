"""The typed SDK: steps generic in their input and output, earlier outputs read back as their models
(``Previous``), tools whose parameters come from a typed function or a pydantic model, and the sample
user package's typed kinds run in-process, with tool calls and a retry after an invalid answer."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, Field
from sample_agents import Routing, Summarize, Summary
from sample_agents.filing import Tracker
from sample_agents.filing import agents as filing_agents

from service.sdk import (
    SESSION,
    Agent,
    FunctionTool,
    HttpTool,
    Previous,
    Step,
    StrictInput,
    ToolCall,
    ToolError,
    function_tool,
)
from service.sdk.testing import ScriptedModel, run, tool_call

COMPLAINT = {"customer": "Ana", "text": "I was charged twice for my plan and want my money back."}


def call(arguments: dict[str, Any], tool: str = "t") -> ToolCall:
    return ToolCall(key="task-1/file/1", task_id="task-1", step="file", ordinal=1, tool=tool,
                    arguments=arguments, fence=1)


# ---- Previous ----------------------------------------------------------------------------------

def test_previous_gives_a_read_step_back_as_its_model_and_by_name_as_data() -> None:
    previous = Previous({"summarize": {"summary": "Charged twice."}})

    assert previous.get(Summarize) == Summary(summary="Charged twice.")
    assert isinstance(previous[Summarize], Summary)
    assert previous.get(Summarize()) == Summary(summary="Charged twice.")  # an instance names its step too
    assert previous["summarize"] == {"summary": "Charged twice."}
    assert previous.get("route") is None and previous.get("route", "none") == "none"
    assert dict(previous) == {"summarize": {"summary": "Charged twice."}} and len(previous) == 1
    assert previous.session is None


def test_previous_refuses_a_step_the_step_does_not_read() -> None:
    class RouteStep(Step[StrictInput, Routing]):
        name, output_model = "route", Routing

    with pytest.raises(KeyError, match="'route' is not among the steps this one reads"):
        Previous({"summarize": {"summary": "x"}}).get(RouteStep)


def test_previous_validates_the_recorded_output_with_the_model() -> None:
    with pytest.raises(ValueError, match="summary"):
        Previous({"summarize": {"summry": "typo"}}).get(Summarize)


def test_previous_session_is_the_view_under_its_key() -> None:
    assert Previous({SESSION: "not a view"}).session is None
    assert SESSION in Previous({SESSION: "not a view"})


# ---- tools from typed functions and models -----------------------------------------------------

class Refund(BaseModel):
    order: str
    amount: Annotated[float, Field(gt=0)]


def open_ticket(call: ToolCall, title: Annotated[str, Field(min_length=3)], priority: str = "normal") -> Refund:
    """Open a ticket for the support team.

    Returns the refund it asks for."""
    return Refund(order=f"{call.key}:{title}:{priority}", amount=1.5)


def test_function_tool_makes_the_schema_from_the_signature_and_the_description_from_the_docstring() -> None:
    tool = function_tool(open_ticket)

    assert isinstance(tool, FunctionTool) and tool.name == "open_ticket"
    assert tool.description == "Open a ticket for the support team.\n\nReturns the refund it asks for."
    assert tool.parameters["type"] == "object"
    assert tool.parameters["required"] == ["title"]
    assert set(tool.parameters["properties"]) == {"title", "priority"}  # the ToolCall is not an argument
    assert tool.parameters["properties"]["title"]["minLength"] == 3
    assert tool.parameters["properties"]["priority"]["default"] == "normal"
    assert tool.parameters["additionalProperties"] is False
    assert tool.invalid({"title": "ok!"}) is None
    assert tool.invalid({"title": "ok!", "extra": 1}) is not None
    assert tool.invalid({}) is not None


def test_a_function_tool_runs_with_validated_arguments_and_the_call() -> None:
    tool = function_tool(open_ticket)

    result = asyncio.run(tool.run(call({"title": "Charged twice"})))

    assert result == {"order": "task-1/file/1:Charged twice:normal", "amount": 1.5}  # JSON for the model
    json.dumps(result)


def test_arguments_the_signature_refuses_are_a_tool_error_and_the_function_does_not_run() -> None:
    ran: list[str] = []

    @function_tool
    def note(text: Annotated[str, Field(max_length=5)]) -> dict[str, bool]:
        ran.append(text)
        return {"ok": True}

    with pytest.raises(ToolError, match="text"):
        asyncio.run(note.run(call({"text": "far too long"})))
    assert ran == []


def test_a_function_taking_one_model_gets_that_models_schema_and_an_instance() -> None:
    got: list[Refund] = []

    @function_tool(name="refund", description="Refund an order.", timeout_s=3.0)
    async def refund(request: Refund) -> dict[str, str]:
        got.append(request)
        return {"refunded": request.order}

    assert (refund.name, refund.description, refund.timeout_s) == ("refund", "Refund an order.", 3.0)
    assert set(refund.parameters["properties"]) == {"order", "amount"}
    assert refund.parameters["properties"]["amount"]["exclusiveMinimum"] == 0
    assert asyncio.run(refund.run(call({"order": "o-1", "amount": 2}))) == {"refunded": "o-1"}
    assert got == [Refund(order="o-1", amount=2.0)]


def test_signatures_that_cannot_be_a_tool_are_refused() -> None:
    def star(*words: str) -> None: ...

    def two_calls(a: ToolCall, b: ToolCall) -> None: ...

    def unresolved(order: Missing) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(ValueError, match="can be named"):
        function_tool(star)
    with pytest.raises(ValueError, match="tool unresolved: its annotations cannot be resolved"):
        function_tool(unresolved)
    with pytest.raises(ValueError, match="only one parameter may take the ToolCall"):
        function_tool(two_calls)


def test_tools_take_their_parameters_from_a_pydantic_model() -> None:
    by_function = FunctionTool("refund", lambda c: None, parameters=Refund)
    by_http = HttpTool("refund", "http://127.0.0.1:9/refund", parameters=Refund)

    for tool in (by_function, by_http):
        assert tool.parameters["required"] == ["order", "amount"]
        assert "title" not in tool.parameters
        assert tool.invalid({"order": "o-1", "amount": 0}) is not None  # gt=0 holds
        assert tool.invalid({"order": "o-1", "amount": 1}) is None


# ---- the sample package's typed kinds, in-process ------------------------------------------------

def test_typed_kind_calls_its_tool_reads_the_step_before_and_retries_an_invalid_answer() -> None:
    tracker = Tracker()
    (agent,) = filing_agents(tracker)
    model = ScriptedModel([
        {"problem": "Charged twice for the plan.", "wants_refund": True},
        tool_call("open_ticket", {"title": "Charged twice", "priority": "high"}),
        {"ticket_id": "T-1", "reply": "We filed T-1 for you."},  # does not name the customer: refused
        {"ticket_id": "T-1", "reply": "Ana, we filed T-1 for you."},
    ])

    outcome = run(agent, COMPLAINT, model=model)

    assert outcome.ok, outcome.error
    assert outcome.result == {"ticket_id": "T-1", "reply": "Ana, we filed T-1 for you."}
    # the file step's model calls: the tool call, the refused answer, the answer
    assert [(s.name, s.attempts) for s in outcome.steps] == [("understand", 1), ("file", 3)]
    assert [(c["tool"], c["outcome"], c["arguments"]) for c in outcome.tool_calls] == [
        ("open_ticket", "executed", {"title": "Charged twice", "priority": "high"})]
    assert outcome.tool_calls[0]["result"] == {"id": "T-1", "title": "Charged twice", "priority": "high"}
    assert [t.id for t in tracker.tickets.values()] == ["T-1"]  # filed once, under the call's key
    # the step read the first one's output as its model: the problem, and a refund made it "high"
    file_request = model.requests[1]
    assert "Problem: Charged twice for the plan." in file_request.messages[1]["content"]
    assert "priority high" in file_request.messages[0]["content"]
    spec = {t["function"]["name"]: t["function"] for t in file_request.tools or []}
    assert spec["open_ticket"]["description"].startswith("Open a ticket in the support tracker")
    assert spec["open_ticket"]["parameters"]["required"] == ["title"]


def test_typed_kind_refuses_tool_arguments_its_signature_refuses_and_files_nothing() -> None:
    tracker = Tracker()
    (agent,) = filing_agents(tracker)
    model = ScriptedModel([
        {"problem": "Charged twice.", "wants_refund": False},
        tool_call("open_ticket", {"title": "x", "priority": "urgent"}),  # too short, not a priority
        {"ticket_id": "T-9", "reply": "Ana, sorry: we could not file it."},
    ])

    outcome = run(agent, COMPLAINT, model=model)

    assert outcome.ok, outcome.error
    assert tracker.tickets == {}
    assert [c["outcome"] for c in outcome.tool_calls] == ["invalid"]
    # the schema made from the signature told the model why: the enum of the Literal
    assert "'urgent' is not one of ['low', 'normal', 'high']" in outcome.tool_calls[0]["result"]["error"]


def test_typed_and_untyped_steps_run_in_one_agent() -> None:
    class Text(StrictInput):
        text: str

    class Old(Step):  # the untyped form: the pipeline does not care which a step uses
        name, prompt_version, output_model = "old", "old-v1", Summary
        needs = ()

        def messages(self, task_input: Any, previous: Any) -> list[dict[str, str]]:
            return [{"role": "user", "content": task_input.text}]

    class New(Step[Text, Routing]):
        name, prompt_version, output_model = "new", "new-v1", Routing

        def messages(self, task_input: Text, previous: Previous) -> list[dict[str, str]]:
            return [{"role": "user", "content": previous.get(Old).summary + " / " + previous["old"]["summary"]}]

    model = ScriptedModel([{"summary": "s"}, {"queue": "other", "urgent": False}])
    outcome = run(Agent("mixed", Text, (Old(), New())), {"text": "hello"}, model=model)

    assert outcome.ok, outcome.error
    assert model.requests[1].messages[-1]["content"] == "s / s"


def test_every_built_in_step_is_written_in_the_typed_form() -> None:
    """The built-in kinds are the examples users copy: each step class names its input and output
    (``Step[In, Out]``, ``DelegateStep[In]``), and none casts its input back with ``assert isinstance``."""
    import importlib
    import inspect
    import pkgutil

    import service.agents
    from service.agents.delegation import DelegateStep

    generic = (Step, DelegateStep)
    untyped, asserting = [], []
    for info in pkgutil.iter_modules(service.agents.__path__):
        module = importlib.import_module(f"service.agents.{info.name}")
        if "assert isinstance" in inspect.getsource(module):
            asserting.append(module.__name__)
        for cls in vars(module).values():
            if (isinstance(cls, type) and issubclass(cls, Step) and cls.__module__ == module.__name__
                    and cls not in generic and any(base in generic for base in cls.__bases__)
                    and "__orig_bases__" not in cls.__dict__):  # a bare Step base: no type parameters
                untyped.append(f"{module.__name__}.{cls.__name__}")
    assert untyped == [] and asserting == [], (untyped, asserting)
