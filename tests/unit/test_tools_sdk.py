"""The tool contract: schemas checked when a tool is made and before a call runs, what each HTTP
answer means for a call's outcome, how a model's tool calls are read, and what an agent refuses."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from service.agents.base import Agent, Step
from service.agents.helpers import StrictInput
from service.agents.tools import FunctionTool, HttpTool, Reconciled, ToolCall, ToolError, ToolUnknown
from service.core.errors import InvalidOutput
from service.devtools.downstream import DownstreamFault, FakeDownstream
from service.llm.responses import answer, tool_calls

PARAMS = {"type": "object", "required": ["title"], "additionalProperties": False,
          "properties": {"title": {"type": "string", "minLength": 1}, "refund": {"type": "number", "minimum": 0}}}


def call(key: str = "t-1/file/1", **arguments: Any) -> ToolCall:
    return ToolCall(key=key, task_id="t-1", step="file", ordinal=1, tool="open_ticket",
                    arguments=arguments or {"title": "Broken"}, fence=3)


@pytest.fixture
def api() -> Iterator[FakeDownstream]:
    with FakeDownstream() as downstream:
        yield downstream


def tickets(api: FakeDownstream) -> HttpTool:
    return HttpTool("open_ticket", f"{api.base_url}/tickets", parameters=PARAMS, timeout_s=2,
                    status_url=f"{api.base_url}/tickets/by-key/{{key}}",
                    undo_url=f"{api.base_url}/tickets/{{result[id]}}/cancel")


def test_a_tool_with_a_bad_name_or_schema_is_refused_when_made() -> None:
    with pytest.raises(ValueError, match="must match"):
        FunctionTool("open ticket", lambda c: None)
    with pytest.raises(ValueError, match="not a JSON Schema"):
        FunctionTool("open_ticket", lambda c: None, parameters={"type": "no-such-type"})


@pytest.mark.parametrize(("arguments", "problem"), [
    ({"title": "Broken"}, None),
    ({"title": ""}, "title:"),
    ({"title": "x", "refund": -1}, "refund:"),
    ({"title": "x", "extra": 1}, "(root):"),
    ({}, "(root):"),
    ([1, 2], "must be a JSON object"),
])
def test_arguments_are_checked_against_the_schema(arguments: Any, problem: str | None) -> None:
    tool = FunctionTool("open_ticket", lambda c: None, parameters=PARAMS)
    found = tool.invalid(arguments)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_a_function_tool_runs_plain_and_coroutine_functions_and_reconciles_only_when_told() -> None:
    async def run_async(c: ToolCall) -> dict[str, Any]:
        return {"key": c.key}

    plain = FunctionTool("plain", lambda c: {"title": c.arguments["title"]})
    coro = FunctionTool("coro", run_async, reconcile=lambda c: Reconciled.absent(), undo=lambda c, r: "undone")

    async def scenario() -> None:
        assert await plain.run(call()) == {"title": "Broken"}
        assert await coro.run(call()) == {"key": "t-1/file/1"}
        assert (await plain.reconcile(call())).state == "unknown"  # only its owner knows whether it ran
        assert (await coro.reconcile(call())).state == "absent"
        assert not plain.can_undo and coro.can_undo
        assert await coro.undo(call(), None) == "undone"
        wrong = FunctionTool("wrong", lambda c: None, reconcile=lambda c: True)
        with pytest.raises(TypeError):
            await wrong.reconcile(call())

    asyncio.run(scenario())


def test_the_http_tool_sends_the_key_and_reconciles_by_it(api: FakeDownstream) -> None:
    tool = tickets(api)

    async def scenario() -> None:
        try:
            assert (await tool.reconcile(call())).state == "absent"
            created = await tool.run(call())
            assert created["key"] == "t-1/file/1" and created["fence"] == 3
            landed = await tool.reconcile(call())
            assert landed.state == "landed" and landed.result == created
            cancelled = await tool.undo(call(), created)
            assert cancelled["status"] == "cancelled"
        finally:
            await tool.aclose()

    asyncio.run(scenario())
    assert api.stats()["undos_by_key"] == {"t-1/file/1/undo": 1}


@pytest.mark.parametrize(("fault", "raised"), [
    (DownstreamFault("error", status=400), ToolError),  # refused: nothing happened, the model is told
    (DownstreamFault("error", status=422), ToolError),
    (DownstreamFault("error", status=503), ToolUnknown),  # it may have happened
    (DownstreamFault("error", status=429), ToolUnknown),
    (DownstreamFault("drop_before"), ToolUnknown),
    (DownstreamFault("drop_after"), ToolUnknown),
    (DownstreamFault("delay", delay_s=5), ToolUnknown),  # past the tool's timeout
])
def test_what_a_failed_http_call_means(api: FakeDownstream, fault: DownstreamFault, raised: type[Exception]) -> None:
    api.add_fault(fault)
    tool = tickets(api)

    async def scenario() -> None:
        try:
            with pytest.raises(raised):
                await tool.run(call())
        finally:
            await tool.aclose()

    asyncio.run(scenario())


def test_a_status_endpoint_that_cannot_answer_cannot_tell(api: FakeDownstream) -> None:
    api.add_fault(DownstreamFault("status_error", status=500))
    tool = tickets(api)

    async def scenario() -> Reconciled:
        try:
            return await tool.reconcile(call())
        finally:
            await tool.aclose()

    assert asyncio.run(scenario()).state == "unknown"


def test_tool_calls_are_read_from_an_answer() -> None:
    raw = [{"id": "call_1", "type": "function", "function": {"name": "open_ticket", "arguments": '{"title":"x"}'}},
           {"type": "function", "function": {"name": "note", "arguments": {"text": "y"}}}]
    assert tool_calls(raw) == ({"id": "call_1", "name": "open_ticket", "arguments": '{"title":"x"}'},
                               {"id": "call-1", "name": "note", "arguments": '{"text":"y"}'})
    assert tool_calls(None) == () and tool_calls([]) == ()
    assert [c["id"] for c in tool_calls([raw[0], raw[0]])] == ["call_1", "call-1"]  # ids stay distinct
    for bad in ("x", [1], [{"function": {"name": "", "arguments": "{}"}}], [{"function": {"name": "a"}}]):
        with pytest.raises(InvalidOutput):
            tool_calls(bad)
    content, reason, calls = answer({"finish_reason": "tool_calls"}, {"content": None, "tool_calls": raw[:1]}, 200, 5)
    assert content == "" and reason == "tool_calls" and calls[0]["name"] == "open_ticket"
    with pytest.raises(InvalidOutput):  # no content and no calls is still an empty answer
        answer({"finish_reason": "stop"}, {"content": None, "tool_calls": []}, 200, 5)


class _In(StrictInput):
    text: str


class _Out(BaseModel):
    reply: str


def test_an_agent_refuses_a_tool_named_twice_and_tools_on_a_map_reduce_step() -> None:
    tool = FunctionTool("note", lambda c: None)

    class Twice(Step):
        name, output_model, tools = "twice", _Out, (tool, FunctionTool("note", lambda c: None))

    class Pieces(Step):
        name, output_model, tools, fit, chunk_field = "pieces", _Out, (tool,), "map_reduce", "text"

    with pytest.raises(ValueError, match="tool name twice"):
        Agent("a", _In, (Twice(),))
    with pytest.raises(ValueError, match="cannot offer tools"):
        Agent("b", _In, (Pieces(),))
