"""Tests for the fake model's tool calls (OpenAI function calling) over real loopback HTTP: rounds,
tool_choice, argument rules, the tool faults, request validation and configuration."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import jsonschema
import pytest

from service.devtools import processes
from service.devtools.fakellm import FakeLLM, FaultRule, ToolArguments

TICKET: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 3, "maxLength": 60},
        "priority": {"enum": ["low", "normal", "high"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 5},
        "labels": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["title", "priority"],
    "additionalProperties": False,
}
LOOKUP: dict[str, Any] = {
    "type": "object",
    "properties": {"ticket_id": {"type": "string", "maxLength": 12}, "verbose": {"type": "boolean"}},
    "required": ["ticket_id"],
}
ANSWER: dict[str, Any] = {
    "type": "object",
    "properties": {"summary": {"type": "string"}, "done": {"type": "boolean"}},
    "required": ["summary", "done"],
    "additionalProperties": False,
}
SCHEMAS: dict[str, Any] = {"create_ticket": TICKET, "lookup": LOOKUP, "ping": None}
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def tool(name: str, parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": f"The {name} tool."}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


TOOLS = [tool(name, schema) for name, schema in SCHEMAS.items()]
USER = [{"role": "user", "content": "Open a ticket for the broken printer."}]


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    with FakeLLM(seed=5) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeLLM) -> None:
    fake.reset()
    fake.tool_rounds = 1
    fake.tool_calls_per_round = 1
    fake.tool_arguments = []
    fake.idempotent = False


@pytest.fixture(scope="module")
def client(fake: FakeLLM) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=5.0) as http:
        yield http


@pytest.fixture(scope="module")
def control(fake: FakeLLM) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url.removesuffix("/v1"), timeout=5.0) as http:
        yield http


def ask(
    client: httpx.Client,
    messages: Sequence[Mapping[str, Any]] = USER,
    *,
    tools: Sequence[Mapping[str, Any]] | None = TOOLS,
    tool_choice: Any = None,
    key: str | None = None,
    schema: Mapping[str, Any] | None = ANSWER,
) -> httpx.Response:
    payload: dict[str, Any] = {"model": "m", "messages": list(messages)}
    if tools is not None:
        payload["tools"] = tools
    if tool_choice is not None:
        payload["tool_choice"] = tool_choice
    if schema is not None:
        payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/chat/completions", json=payload, headers=headers)


def message(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    """The finish reason and the assistant message of a 200 answer."""
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["finish_reason"], choice["message"]


def calls_of(response: httpx.Response) -> list[dict[str, Any]]:
    reason, answer = message(response)
    assert reason == "tool_calls"
    assert answer["role"] == "assistant" and answer["content"] is None
    calls: list[dict[str, Any]] = answer["tool_calls"]
    for call in calls:
        assert CALL_ID.fullmatch(call["id"]) and call["type"] == "function"
        assert isinstance(call["function"]["arguments"], str)
    return calls


def arguments(call: Mapping[str, Any]) -> Any:
    return json.loads(call["function"]["arguments"])


def assert_valid_call(call: Mapping[str, Any]) -> None:
    name = call["function"]["name"]
    assert name in SCHEMAS
    schema = SCHEMAS[name]
    if schema is None:
        assert arguments(call) == {}
    else:
        jsonschema.validate(arguments(call), schema)


def answered(messages: Sequence[Mapping[str, Any]], response: httpx.Response) -> list[Mapping[str, Any]]:
    """The conversation continued with the assistant's tool calls and a result for each."""
    calls = calls_of(response)
    results = [{"role": "tool", "tool_call_id": call["id"], "content": '{"ok": true}'} for call in calls]
    return [*messages, {"role": "assistant", "content": None, "tool_calls": calls}, *results]


def final(response: httpx.Response) -> Any:
    reason, answer = message(response)
    assert reason == "stop" and "tool_calls" not in answer
    return json.loads(answer["content"])


def assert_bad_request(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


# ----------------------------------------------------------------------------- rounds


def test_a_request_with_tools_gets_a_valid_tool_call_then_the_final_answer(
    fake: FakeLLM, client: httpx.Client
) -> None:
    first = ask(client, key="t-1")
    (call,) = calls_of(first)
    assert_valid_call(call)
    follow_up = answered(USER, first)
    jsonschema.validate(final(ask(client, follow_up, key="t-1")), ANSWER)
    stats = fake.stats()
    assert stats["tool_calls"] == 1 and stats["tool_calls_by_name"] == {call["function"]["name"]: 1}
    assert stats["valid_completions"] == 2 and stats["completions_by_key"] == {"t-1": 2}


def test_tool_call_arguments_always_fit_the_tool_schema(client: httpx.Client) -> None:
    names = set()
    for _ in range(40):
        (call,) = calls_of(ask(client))
        assert_valid_call(call)
        names.add(call["function"]["name"])
    assert names == set(SCHEMAS)  # the tool is drawn among all offered


def test_usage_counts_the_prompt_and_the_calls(client: httpx.Client) -> None:
    body = ask(client, [{"role": "user", "content": "u" * 40}]).json()
    (call,) = body["choices"][0]["message"]["tool_calls"]
    generated = len(call["function"]["name"]) + len(call["function"]["arguments"])
    cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]  # what this server saw before
    assert isinstance(cached, int) and 0 <= cached <= 11
    assert body["usage"] == {
        "prompt_tokens": 11, "completion_tokens": generated // 4 + 1, "total_tokens": 11 + generated // 4 + 1,
    }


def test_tool_rounds_gives_that_many_rounds(fake: FakeLLM, client: httpx.Client) -> None:
    fake.tool_rounds = 2
    messages: list[Mapping[str, Any]] = list(USER)
    for _ in range(2):
        response = ask(client, messages)
        for call in calls_of(response):
            assert_valid_call(call)
        messages = answered(messages, response)
    jsonschema.validate(final(ask(client, messages)), ANSWER)
    assert fake.stats()["tool_calls"] == 2


def test_zero_tool_rounds_answers_at_once(fake: FakeLLM, client: httpx.Client) -> None:
    fake.tool_rounds = 0
    jsonschema.validate(final(ask(client)), ANSWER)
    assert fake.stats()["tool_calls"] == 0


def test_parallel_calls_each_need_a_result(fake: FakeLLM, client: httpx.Client) -> None:
    fake.tool_calls_per_round = 3
    first = ask(client)
    calls = calls_of(first)
    assert len(calls) == 3 and len({call["id"] for call in calls}) == 3
    for call in calls:
        assert_valid_call(call)
    follow_up = answered(USER, first)
    assert_bad_request(ask(client, follow_up[:-1]), "messages[1].tool_calls")  # one result missing
    jsonschema.validate(final(ask(client, follow_up)), ANSWER)
    assert fake.stats()["tool_calls"] == 3


def test_without_a_schema_the_final_answer_is_text(client: httpx.Client) -> None:
    first = ask(client, schema=None)
    assert set(final(ask(client, answered(USER, first), schema=None))) == {"text"}


# ----------------------------------------------------------------------------- tool_choice


def test_a_forced_tool_is_always_the_one_called(fake: FakeLLM, client: httpx.Client) -> None:
    fake.tool_calls_per_round = 2
    forced = {"type": "function", "function": {"name": "lookup"}}
    for _ in range(10):
        for call in calls_of(ask(client, tool_choice=forced)):
            assert call["function"]["name"] == "lookup"
            assert_valid_call(call)
    assert fake.stats()["tool_calls_by_name"] == {"lookup": 20}


def test_tool_choice_none_answers_with_content(fake: FakeLLM, client: httpx.Client) -> None:
    jsonschema.validate(final(ask(client, tool_choice="none")), ANSWER)
    assert fake.stats()["tool_calls"] == 0


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_auto_and_required_call_a_tool(client: httpx.Client, choice: str) -> None:
    (call,) = calls_of(ask(client, tool_choice=choice))
    assert_valid_call(call)


def test_a_tool_without_parameters_gets_empty_arguments(client: httpx.Client) -> None:
    (call,) = calls_of(ask(client, tools=[tool("ping")]))
    assert call["function"] == {"name": "ping", "arguments": "{}"}


# ----------------------------------------------------------------------------- argument rules


def test_argument_rules_match_the_key_and_the_tool(fake: FakeLLM, client: httpx.Client) -> None:
    wanted = {"title": "printer on fire", "priority": "high"}
    fake.tool_arguments = [
        ToolArguments("lookup", {"ticket_id": "T-1"}, match="order-7"),  # another tool: never applies here
        {"match": "order-7", "tool": "create_ticket", "arguments": wanted},
        {"match": "order-7", "tool": "create_ticket", "arguments": {"title": "shadowed", "priority": "low"}},
        {"tool": "create_ticket", "arguments": {"anything": ["used", "as", "is"]}},
    ]
    only_ticket = [tool("create_ticket", TICKET)]
    (call,) = calls_of(ask(client, tools=only_ticket, key="task:order-7:step-1"))
    assert arguments(call) == wanted
    (call,) = calls_of(ask(client, tools=only_ticket, key="task:order-8:step-1"))
    assert arguments(call) == {"anything": ["used", "as", "is"]}  # not merged nor checked
    (call,) = calls_of(ask(client, tools=only_ticket))  # no key: only a rule without match applies
    assert arguments(call) == {"anything": ["used", "as", "is"]}
    (call,) = calls_of(ask(client, tools=[tool("lookup", LOOKUP)], key="order-7"))
    assert arguments(call) == {"ticket_id": "T-1"}
    (call,) = calls_of(ask(client, tools=[tool("lookup", LOOKUP)], key="order-9"))
    assert arguments(call) != {"ticket_id": "T-1"}
    assert_valid_call(call)


def test_argument_rules_through_the_control_endpoint(
    fake: FakeLLM, client: httpx.Client, control: httpx.Client
) -> None:
    rules = [{"match": "k-", "tool": "lookup", "arguments": {"ticket_id": "T-000042"}}]
    response = control.post("/_config", json={"tool_arguments": rules})
    assert response.status_code == 200
    assert response.json()["tool_arguments"] == rules
    assert fake.tool_arguments == [ToolArguments("lookup", {"ticket_id": "T-000042"}, match="k-")]
    (call,) = calls_of(ask(client, tool_choice={"type": "function", "function": {"name": "lookup"}}, key="k-1"))
    assert arguments(call) == {"ticket_id": "T-000042"}


# ----------------------------------------------------------------------------- faults


def test_invalid_tool_args_break_the_schema(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("invalid_tool_args"))
    for name in ("create_ticket", "lookup", "ping"):
        (call,) = calls_of(ask(client, tool_choice={"type": "function", "function": {"name": name}}))
        assert call["function"]["name"] == name
        schema = SCHEMAS[name] or {"type": "object", "additionalProperties": False}
        assert not jsonschema.Draft202012Validator(schema).is_valid(arguments(call))
    stats = fake.stats()
    assert stats["faults"] == {"invalid_tool_args": 3} and stats["tool_calls"] == 3
    assert stats["completions"] == 3 and stats["valid_completions"] == 0


def test_unknown_tool_names_a_tool_that_was_not_offered(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("unknown_tool", times=1))
    (call,) = calls_of(ask(client))
    assert call["function"]["name"] not in SCHEMAS
    assert json.loads(call["function"]["arguments"]) == {}
    assert fake.stats()["tool_calls_by_name"] == {call["function"]["name"]: 1}


def test_tool_faults_hit_after_the_rounds_too(fake: FakeLLM, client: httpx.Client) -> None:
    follow_up = answered(USER, ask(client))
    fake.add_fault(FaultRule("unknown_tool", times=1))
    (call,) = calls_of(ask(client, follow_up))
    assert call["function"]["name"] not in SCHEMAS
    jsonschema.validate(final(ask(client, follow_up)), ANSWER)


@pytest.mark.parametrize("fault", ["invalid_tool_args", "unknown_tool"])
@pytest.mark.parametrize("tool_choice", [None, "none"])
def test_tool_faults_without_tools_are_schema_violations(
    fake: FakeLLM, client: httpx.Client, fault: str, tool_choice: str | None
) -> None:
    fake.add_fault(FaultRule(fault))
    tools = None if tool_choice is None else TOOLS
    reason, answer = message(ask(client, tools=tools, tool_choice=tool_choice))
    assert reason == "stop"
    assert not jsonschema.Draft202012Validator(ANSWER).is_valid(json.loads(answer["content"]))
    assert fake.stats()["tool_calls"] == 0


def test_idempotent_mode_replays_a_tool_call(fake: FakeLLM, client: httpx.Client) -> None:
    fake.idempotent = True
    first, again = ask(client, key="same"), ask(client, key="same")
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    assert fake.stats()["tool_calls"] == 1


# ----------------------------------------------------------------------------- malformed requests


def _call(call_id: str = "call_1", name: str = "lookup") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


def _assistant(*calls: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


def _result(call_id: Any = "call_1", content: Any = "ok") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


@pytest.mark.parametrize(
    ("tools", "tool_choice", "param"),
    [
        ([], None, "tools"),
        ({"create_ticket": TICKET}, None, "tools"),
        ([{"type": "retrieval"}], None, "tools[0]"),
        (["create_ticket"], None, "tools[0]"),
        ([{"type": "function"}], None, "tools[0].function"),
        ([{"type": "function", "function": {"description": "no name"}}], None, "tools[0].function.name"),
        ([tool("has space")], None, "tools[0].function.name"),
        ([tool("x" * 65)], None, "tools[0].function.name"),
        ([tool("lookup"), tool("lookup")], None, "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "a", "description": 3}}], None, "tools[0].function.description"),
        ([{"type": "function", "function": {"name": "a", "parameters": []}}], None, "tools[0].function.parameters"),
        ([tool("a", {"type": "integer", "minimum": 3, "maximum": 1})], None, "tools"),
        (TOOLS, "always", "tool_choice"),
        (TOOLS, {"type": "function"}, "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
        (TOOLS, {"type": "tool", "function": {"name": "lookup"}}, "tool_choice"),
        (None, "auto", "tool_choice"),
    ],
)
def test_malformed_tools_and_tool_choice_get_a_400(
    fake: FakeLLM, client: httpx.Client, tools: Any, tool_choice: Any, param: str
) -> None:
    assert_bad_request(ask(client, tools=tools, tool_choice=tool_choice), param)
    stats = fake.stats()
    assert stats["bad_requests"] == 1 and stats["completions"] == 0


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([_assistant(_call())], "messages[0].tool_calls"),  # never answered
        ([*USER, _assistant(_call()), *USER], "messages[1].tool_calls"),  # a user message before the result
        ([*USER, _result()], "messages[1].tool_call_id"),  # a result of no call
        ([*USER, _assistant(_call()), _result("call_2")], "messages[2].tool_call_id"),
        ([*USER, _assistant(_call()), _result(), _result()], "messages[3].tool_call_id"),  # answered twice
        ([*USER, _assistant(_call()), _result(7)], "messages[2].tool_call_id"),
        ([*USER, _assistant(_call()), {"role": "tool", "content": "ok"}], "messages[2].tool_call_id"),
        ([*USER, _assistant(_call()), _result(content=None)], "messages[2].content"),
        ([*USER, _assistant(_call()), _result(content=3)], "messages[2].content"),
        ([*USER, _assistant()], "messages[1].tool_calls"),
        ([*USER, {"role": "assistant", "content": None, "tool_calls": {}}], "messages[1].tool_calls"),
        ([*USER, _assistant({"id": "call_1", "type": "function"})], "messages[1].tool_calls[0]"),
        ([*USER, _assistant({**_call(), "function": {"name": "lookup", "arguments": {}}})],
         "messages[1].tool_calls[0]"),
        ([*USER, _assistant({**_call(), "type": "code"})], "messages[1].tool_calls[0]"),
        ([*USER, _assistant(_call(""))], "messages[1].tool_calls[0]"),
        ([*USER, _assistant(_call(), _call())], "messages[1].tool_calls[1].id"),
        ([{"role": "user", "content": "x", "tool_calls": [_call()]}], "messages[0].tool_calls"),
    ],
)
def test_malformed_tool_messages_get_a_400(
    fake: FakeLLM, client: httpx.Client, messages: list[dict[str, Any]], param: str
) -> None:
    assert_bad_request(ask(client, messages), param)
    stats = fake.stats()
    assert stats["bad_requests"] == 1 and stats["completions"] == 0


def test_a_conversation_with_text_parts_and_assistant_text_is_accepted(client: httpx.Client) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "s" * 8},
        {"role": "user", "content": [{"type": "text", "text": "u" * 8}]},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [_call("a"), _call("b", "ping")]},
        _result("b", "p" * 8),
        _result("a", [{"type": "text", "text": "r" * 8}]),
    ]
    body = ask(client, messages).json()
    assert body["choices"][0]["finish_reason"] == "stop"  # one round is done
    assert body["usage"]["prompt_tokens"] == (8 * 4 + len("Let me look.")) // 4 + 1


# ----------------------------------------------------------------------------- configuration


def test_config_shows_and_sets_the_tool_settings(fake: FakeLLM, control: httpx.Client) -> None:
    assert control.get("/_config").json() == {
        "idempotent": False, "latency_s": 0.0, "latency_max_s": 0.0, "tool_rounds": 1, "tool_calls_per_round": 1,
        "tool_arguments": [],
        "max_concurrency": 0,
    }
    rule = {"match": None, "tool": "lookup", "arguments": {"ticket_id": "T-9"}}
    response = control.post("/_config", json={"tool_rounds": 3, "tool_calls_per_round": 2, "tool_arguments": [rule]})
    assert response.status_code == 200
    assert response.json() == {
        "idempotent": False, "latency_s": 0.0, "latency_max_s": 0.0, "tool_rounds": 3, "tool_calls_per_round": 2,
        "tool_arguments": [rule],
        "max_concurrency": 0,
    }
    assert (fake.tool_rounds, fake.tool_calls_per_round) == (3, 2)
    assert control.post("/_reset").status_code == 200
    assert control.get("/_config").json() == response.json()  # reset keeps the configuration


@pytest.mark.parametrize(
    "body",
    [
        {"tool_rounds": -1},
        {"tool_rounds": 1.5},
        {"tool_rounds": True},
        {"tool_calls_per_round": 0},
        {"tool_calls_per_round": "2"},
        {"tool_arguments": {"tool": "lookup", "arguments": {}}},
        {"tool_arguments": [{"tool": "lookup"}]},
        {"tool_arguments": [{"tool": "", "arguments": {}}]},
        {"tool_arguments": [{"tool": "lookup", "arguments": [1]}]},
        {"tool_arguments": [{"tool": "lookup", "arguments": {}, "match": 7}]},
        {"tool_arguments": [{"tool": "lookup", "arguments": {}, "colour": "red"}]},
        {"tool_arguments": "lookup"},
        {"tool_rounds": 4, "latency_s": 0.1, "idempotent": True, "tool_calls_per_round": 0},  # all or nothing
        {"tool_rounds": 4, "tools": []},
    ],
)
def test_bad_config_changes_nothing(fake: FakeLLM, control: httpx.Client, body: dict[str, Any]) -> None:
    fake.tool_arguments = [ToolArguments("ping", {})]
    before = control.get("/_config").json()
    response = control.post("/_config", json=body)
    assert response.status_code == 400, response.text
    assert control.get("/_config").json() == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tool_rounds": -1},
        {"tool_calls_per_round": 0},
        {"tool_arguments": [{"tool": "x"}]},
        {"tool_arguments": [{"tool": "x", "arguments": {"n": float("nan")}}]},
    ],
)
def test_constructor_and_properties_validate(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FakeLLM(**kwargs)
    server = FakeLLM()
    [(name, value)] = kwargs.items()
    with pytest.raises(ValueError):
        setattr(server, name, value)


def test_constructor_sets_the_tool_settings() -> None:
    rule = ToolArguments("ping", {"loud": True})
    with FakeLLM(tool_rounds=2, tool_calls_per_round=2, tool_arguments=[rule]) as server, \
            httpx.Client(base_url=server.base_url, timeout=5.0) as http:
        first = ask(http, tools=[tool("ping")])
        assert [arguments(call) for call in calls_of(first)] == [{"loud": True}] * 2
        assert len(calls_of(ask(http, answered(USER, first), tools=[tool("ping")]))) == 2


def test_command_line_takes_the_tool_settings() -> None:
    command = [sys.executable, "-m", "service.devtools.fakellm", "--port", "0",
               "--tool-rounds", "2", "--tool-calls-per-round", "3"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            base_url = process.stdout.readline().strip().removeprefix("fakellm listening on ")
            with httpx.Client(base_url=base_url, timeout=5.0) as http:
                config = http.get("/_config").json()
                assert (config["tool_rounds"], config["tool_calls_per_round"]) == (2, 3)
        finally:
            assert processes.stop(process, grace_s=10) == 0  # SIGTERM; SIGKILLed (and reaped) after 10 s
