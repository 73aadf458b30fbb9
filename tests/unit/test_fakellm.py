"""Tests for service.devtools.fakellm: answers, faults, statistics and control endpoints over real loopback HTTP."""

from __future__ import annotations

import json
import math
import operator
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from enum import StrEnum
from typing import Any, Literal

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.devtools import processes
from service.devtools.fakellm import REFUSAL, FakeLLM, FaultRule, SchemaError, random_instance

# ----------------------------------------------------------------------------- a small checker


def violations(value: Any, schema: Any, root: Any = None, path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the subset the fake server claims to support)."""
    root = schema if root is None else root
    if schema is True:
        return []
    if schema is False:
        return [f"{path}: nothing matches false"]
    if "$ref" in schema:
        target: Any = root
        for token in schema["$ref"].lstrip("#/").split("/"):
            target = target[token]
        return violations(value, target, root, path)
    problems = _branch_violations(value, schema, root, path)
    if problems:
        return problems
    if "const" in schema and value != schema["const"]:
        return [f"{path}: {value!r} is not the const {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not in the enum"]
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_is_type(value, k) for k in kinds):
            return [f"{path}: {value!r} is not of type {kind}"]
    if isinstance(value, dict):
        return _object_violations(value, schema, root, path)
    if isinstance(value, list):
        return _array_violations(value, schema, root, path)
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            return [f"{path}: length {len(value)} is out of bounds"]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return _number_violations(value, schema, path)
    return []


def _branch_violations(value: Any, schema: Mapping[str, Any], root: Any, path: str) -> list[str]:
    for keyword in ("anyOf", "oneOf"):
        if keyword in schema:
            matching = sum(not violations(value, option, root, path) for option in schema[keyword])
            if matching == 0 or (keyword == "oneOf" and matching > 1):
                return [f"{path}: {matching} {keyword} branches match"]
    return []


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    types: dict[str, type | tuple[type, ...]] = {
        "string": str, "boolean": bool, "object": dict, "array": list, "null": type(None),
    }
    return isinstance(value, types[kind])


def _object_violations(value: dict[str, Any], schema: Mapping[str, Any], root: Any, path: str) -> list[str]:
    problems = [f"{path}: missing {name!r}" for name in schema.get("required", []) if name not in value]
    properties = schema.get("properties", {})
    additional = schema.get("additionalProperties", True)
    for name, member in value.items():
        if name in properties:
            problems += violations(member, properties[name], root, f"{path}.{name}")
        elif additional is False:
            problems.append(f"{path}: unexpected {name!r}")
        elif isinstance(additional, Mapping):
            problems += violations(member, additional, root, f"{path}.{name}")
    return problems


def _array_violations(value: list[Any], schema: Mapping[str, Any], root: Any, path: str) -> list[str]:
    problems = []
    if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf):
        problems.append(f"{path}: {len(value)} items is out of bounds")
    if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
        problems.append(f"{path}: items are not unique")
    for index, item in enumerate(value):
        problems += violations(item, schema.get("items", True), root, f"{path}[{index}]")
    return problems


def _number_violations(value: float, schema: Mapping[str, Any], path: str) -> list[str]:
    bounds: list[tuple[str, Callable[[float, float], bool]]] = [
        ("minimum", operator.ge), ("maximum", operator.le),
        ("exclusiveMinimum", operator.gt), ("exclusiveMaximum", operator.lt),
    ]
    return [
        f"{path}: {value} breaks {key}={schema[key]}"
        for key, holds in bounds
        if key in schema and not holds(value, schema[key])
    ]


# ----------------------------------------------------------------------------- schemas


class Color(StrEnum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")
    street: str = Field(min_length=3, max_length=40)
    zip: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=30)
    age: int = Field(ge=0, lt=130)
    score: float = Field(gt=0, le=1)
    color: Color
    mood: Literal["happy", "sad"]
    verified: bool
    nickname: str | None
    address: Address
    tags: list[str] = Field(min_length=1, max_length=4)
    previous: list[Address] = Field(default_factory=list, max_length=2)


PERSON = Person.model_json_schema()

CLASSIFY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["billing", "shipping", "other"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["label", "confidence"],
    "additionalProperties": False,
}
EXTRACT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "fields": {
            "type": "object",
            "properties": {"name": {"type": ["string", "null"]}, "city": {"type": ["string", "null"]}},
            "required": ["name", "city"],
            "additionalProperties": False,
        }
    },
    "required": ["fields"],
    "additionalProperties": False,
}
TREE: dict[str, Any] = {
    "$ref": "#/definitions/node",
    "definitions": {
        "node": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "children": {"type": "array", "items": {"$ref": "#/definitions/node"}, "maxItems": 2},
            },
            "required": ["name", "children"],
            "additionalProperties": False,
        }
    },
}
MIXED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3},
        "ratio": {"type": "number", "exclusiveMinimum": 0.5, "maximum": 0.6},
        "kind": {"const": "order"},
        "flags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True, "minItems": 2},
        "note": {"anyOf": [{"type": "string", "minLength": 40}, {"type": "null"}]},
        "counts": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1, "maximum": 9}},
        "nothing": {"type": "null"},
    },
    "required": ["id", "ratio", "kind", "flags", "note", "counts", "nothing"],
    "additionalProperties": False,
}
RAW_SCHEMAS = {"classify": CLASSIFY, "extract": EXTRACT, "tree": TREE, "mixed": MIXED, "person": PERSON}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeLLM) -> None:
    fake.reset()
    fake.latency_s = 0.0
    fake.idempotent = False


@pytest.fixture(scope="module")
def client(fake: FakeLLM) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=5.0) as http:
        yield http


def chat(
    client: httpx.Client,
    schema: Mapping[str, Any] | None = None,
    *,
    key: str | None = None,
    style: str = "json_schema",
    model: str = "test-model",
    text: str = "Say something.",
    timeout: float | None = None,
) -> httpx.Response:
    payload: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if schema is not None and style == "json_schema":
        payload["response_format"] = {
            "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True},
        }
    elif schema is not None:
        payload["response_format"] = {"type": "json_object", "schema": schema}
    headers = {"Idempotency-Key": key} if key is not None else {}
    kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    return client.post("/chat/completions", json=payload, headers=headers, **kwargs)


def choice(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["choices"]) == 1
    result: dict[str, Any] = body["choices"][0]
    return result


def content(response: httpx.Response) -> str:
    text: str = choice(response)["message"]["content"]
    return text


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert {"type", "param", "code"} <= set(error)
    return error


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("style", ["json_schema", "json_object"])
def test_answers_validate_against_a_pydantic_model(client: httpx.Client, style: str) -> None:
    for _ in range(15):
        Person.model_validate_json(content(chat(client, PERSON, style=style)))


@pytest.mark.parametrize("name", sorted(RAW_SCHEMAS))
def test_answers_satisfy_the_schema(client: httpx.Client, name: str) -> None:
    schema = RAW_SCHEMAS[name]
    for _ in range(15):
        value = json.loads(content(chat(client, schema)))
        assert violations(value, schema) == []


def test_response_has_the_openai_shape(client: httpx.Client) -> None:
    response = chat(client, CLASSIFY, model="gpt-test", text="x" * 41)
    body = response.json()
    assert response.headers["content-type"] == "application/json"
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 60
    assert body["model"] == "gpt-test"
    answer = body["choices"][0]
    assert answer["index"] == 0 and answer["finish_reason"] == "stop"
    assert answer["message"]["role"] == "assistant"
    text = answer["message"]["content"]
    cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]  # what this server saw before
    assert isinstance(cached, int) and 0 <= cached <= 41 // 4 + 1
    assert body["usage"] == {
        "prompt_tokens": 41 // 4 + 1,
        "completion_tokens": len(text) // 4 + 1,
        "total_tokens": 41 // 4 + 1 + len(text) // 4 + 1,
    }


def test_prompt_tokens_count_every_message(client: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": "s" * 10},
        {"role": "user", "content": [{"type": "text", "text": "t" * 20}]},
        {"role": "assistant", "content": None},
    ]
    response = client.post("/chat/completions", json={"model": "m", "messages": messages})
    assert response.json()["usage"]["prompt_tokens"] == 30 // 4 + 1


def test_every_call_gets_a_new_answer(client: httpx.Client) -> None:
    first, second = content(chat(client, PERSON)), content(chat(client, PERSON))
    assert first != second


def test_without_a_schema_the_answer_is_a_text_object(client: httpx.Client) -> None:
    for response in (chat(client), chat(client, None, style="json_object")):
        value = json.loads(content(response))
        assert set(value) == {"text"}
        assert 1 <= len(value["text"].split()) <= 6


def test_a_seed_makes_the_answers_reproducible() -> None:
    runs = []
    for _ in range(2):
        with FakeLLM(seed=7) as server, httpx.Client(base_url=server.base_url) as http:
            runs.append([content(chat(http, PERSON)) for _ in range(3)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 3


def test_models_lists_the_fake_model(client: httpx.Client) -> None:
    response = client.get("/models")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["fake"]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        json.dumps({"model": "m"}).encode(),
        json.dumps({"model": "m", "messages": []}).encode(),
        json.dumps({"model": "m", "messages": [{"content": "no role"}]}).encode(),
        json.dumps({"model": 3, "messages": [{"role": "user", "content": "x"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}).encode(),
        json.dumps({
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
        }).encode(),
    ],
)
def test_malformed_requests_get_a_400(fake: FakeLLM, client: httpx.Client, body: bytes) -> None:
    response = client.post("/chat/completions", content=body, headers={"content-type": "application/json"})
    assert assert_openai_error(response, 400)["type"] == "invalid_request_error"
    assert fake.stats()["bad_requests"] == 1 and fake.stats()["completions"] == 0


def test_unknown_routes_and_methods(client: httpx.Client) -> None:
    assert_openai_error(client.get("/nothing-here"), 404)
    assert_openai_error(client.get("/chat/completions"), 405)
    assert_openai_error(client.put("/_faults", json=[]), 405)


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize("status", [400, 500, 503])
def test_error_fault_answers_with_its_status(fake: FakeLLM, client: httpx.Client, status: int) -> None:
    fake.add_fault(FaultRule("error", status=status))
    error = assert_openai_error(chat(client, CLASSIFY), status)
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    stats = fake.stats()
    assert stats["faults"] == {"error": 1} and stats["completions"] == 0 and stats["requests"] == 1


def test_rate_limit_sends_retry_after_headers(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("rate_limit", retry_after_s=1.2))
    response = chat(client, CLASSIFY)
    assert assert_openai_error(response, 429)["code"] == "rate_limit_exceeded"
    assert response.headers["retry-after"] == "2"
    assert response.headers["retry-after-ms"] == "1200"


def test_truncate_cuts_the_answer_and_says_length(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("truncate"))
    answer = choice(chat(client, PERSON))
    assert answer["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(answer["message"]["content"])
    assert fake.stats()["completions"] == 1 and fake.stats()["valid_completions"] == 0


def test_refuse_answers_with_a_refusal(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("refuse"))
    answer = choice(chat(client, CLASSIFY))
    assert answer["finish_reason"] == "content_filter"
    assert answer["message"]["content"] == REFUSAL == "I can't help with that."


def test_invalid_json_is_not_json(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("invalid_json"))
    answer = choice(chat(client, CLASSIFY))
    assert answer["finish_reason"] == "stop"
    with pytest.raises(ValueError):
        json.loads(answer["message"]["content"])


@pytest.mark.parametrize("schema", [CLASSIFY, PERSON, {"type": "object"}, {"type": "string"}])
def test_schema_violation_is_json_that_breaks_the_schema(
    fake: FakeLLM, client: httpx.Client, schema: dict[str, Any]
) -> None:
    fake.add_fault(FaultRule("schema_violation"))
    answer = choice(chat(client, schema))
    assert answer["finish_reason"] == "stop"
    assert violations(json.loads(answer["message"]["content"]), schema) != []


def test_schema_violation_fails_pydantic(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("schema_violation"))
    with pytest.raises(ValidationError):
        Person.model_validate_json(content(chat(client, PERSON)))


def test_empty_answers_with_empty_content(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("empty"))
    answer = choice(chat(client, CLASSIFY))
    assert answer["finish_reason"] == "stop" and answer["message"]["content"] == ""


def test_disconnect_closes_the_connection_without_a_response(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("disconnect", times=1))
    with pytest.raises(httpx.RemoteProtocolError):
        chat(client, CLASSIFY, key="drop-1")
    assert choice(chat(client, CLASSIFY, key="drop-1"))["finish_reason"] == "stop"
    stats = fake.stats()
    assert stats["faults"] == {"disconnect": 1}
    assert stats["by_key"] == {"drop-1": 2} and stats["completions_by_key"] == {"drop-1": 1}


def test_latency_fault_delays_a_normal_answer(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("latency", delay_s=0.3))
    started = time.monotonic()
    value = json.loads(content(chat(client, CLASSIFY)))
    assert time.monotonic() - started >= 0.3
    assert violations(value, CLASSIFY) == []
    assert fake.stats()["valid_completions"] == 1


def test_other_faults_wait_delay_s_first(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("error", status=503, delay_s=0.2))
    started = time.monotonic()
    assert chat(client, CLASSIFY).status_code == 503
    assert time.monotonic() - started >= 0.2


def test_slow_success_is_counted_before_the_client_gives_up(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("slow_success", delay_s=1.0, times=1))
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        chat(client, CLASSIFY, key="slow-1", timeout=0.2)
    assert time.monotonic() - started < 0.9
    stats = fake.stats()
    assert stats["valid_completions"] == 1 and stats["completions"] == 1
    assert stats["completions_by_key"] == {"slow-1": 1}
    assert stats["faults"] == {"slow_success": 1}


def test_times_runs_out(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("error", status=503, times=2))
    assert chat(client, CLASSIFY).status_code == 503
    assert fake.faults() == [FaultRule("error", status=503, times=1)]
    assert chat(client, CLASSIFY).status_code == 503
    assert fake.faults() == []
    assert chat(client, CLASSIFY).status_code == 200
    assert fake.stats()["faults"] == {"error": 2}


def test_match_targets_only_the_matching_key(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("error", match="bad", status=500))
    assert chat(client, CLASSIFY, key="task-bad-1:classify").status_code == 500
    assert chat(client, CLASSIFY, key="task-good-1:classify").status_code == 200
    assert chat(client, CLASSIFY).status_code == 200  # no key: the body does not contain "bad"
    assert chat(client, CLASSIFY, text="a bad prompt").status_code == 500  # no key: the body does
    assert chat(client, CLASSIFY, key="good", text="a bad prompt").status_code == 200  # the key wins


def test_first_matching_rule_wins(fake: FakeLLM, client: httpx.Client) -> None:
    fake.set_faults([
        FaultRule("error", probability=0.0),  # never hits
        {"fault": "refuse", "match": "x-"},
        FaultRule("empty"),
    ])
    assert choice(chat(client, CLASSIFY, key="x-1"))["finish_reason"] == "content_filter"
    assert content(chat(client, CLASSIFY, key="y-1")) == ""
    assert fake.stats()["faults"] == {"refuse": 1, "empty": 1}


def test_global_latency_delays_every_answer(fake: FakeLLM, client: httpx.Client) -> None:
    fake.latency_s = 0.25
    started = time.monotonic()
    assert chat(client, CLASSIFY).status_code == 200
    assert time.monotonic() - started >= 0.25


def test_stop_cuts_injected_waits_short() -> None:
    server = FakeLLM()
    server.start()
    try:
        server.add_fault(FaultRule("latency", delay_s=30))
        with httpx.Client(base_url=server.base_url) as http, pytest.raises(httpx.ReadTimeout):
            chat(http, CLASSIFY, timeout=0.1)
    finally:
        started = time.monotonic()
        server.stop()
    assert time.monotonic() - started < 2.0
    assert not server.running
    with httpx.Client(base_url=server.base_url) as http, pytest.raises(httpx.ConnectError):
        http.get("/models")


# ----------------------------------------------------------------------------- stats and modes


def settled(fake: FakeLLM) -> dict[str, Any]:
    """The statistics once every request has left the server: a client reads the answer before the
    server's handler has returned, and ``open`` counts until it has."""
    deadline = time.monotonic() + 5
    while fake.stats()["open"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return fake.stats()


def test_stats_count_requests_per_key(fake: FakeLLM, client: httpx.Client) -> None:
    fake.add_fault(FaultRule("error", match="order-2", status=503, times=1))
    for key in ("order-1:classify", "order-1:classify", "order-2:classify:1", "order-2:classify:2", "order-22:x"):
        chat(client, CLASSIFY, key=key)
    chat(client, CLASSIFY)
    stats = settled(fake)
    assert stats["requests"] == 6
    assert stats["by_key"] == {"order-1:classify": 2, "order-2:classify:1": 1, "order-2:classify:2": 1, "order-22:x": 1}
    assert stats["completions_by_key"] == {"order-1:classify": 2, "order-2:classify:2": 1, "order-22:x": 1}
    # per task step: the service sends one key per attempt, <task>:<step>:<attempt>
    assert stats["by_step"] == {"order-1:classify": 2, "order-2:classify": 2, "order-22:x": 1}
    assert stats["completions_by_step"] == {"order-1:classify": 2, "order-2:classify": 1, "order-22:x": 1}
    assert fake.last_request("order-2:classify") == fake.last_request("order-2:classify:2") is not None
    assert stats["completions"] == stats["valid_completions"] == 5
    assert fake.calls_for("order-2") == 3 and fake.calls_for("order-1:") == 2 and fake.calls_for("zzz") == 0
    fake.reset()
    assert fake.stats() == {
        "requests": 0, "completions": 0, "valid_completions": 0, "replayed": 0, "bad_requests": 0,
        "faults": {}, "by_key": {}, "completions_by_key": {}, "by_step": {}, "completions_by_step": {},
        "tool_calls": 0, "tool_calls_by_name": {},
        "open": 0, "peak_open": 0, "over_concurrency": 0, "refused_by_key": {},
    }


def test_stats_say_how_many_requests_were_open_at_once(fake: FakeLLM) -> None:
    from concurrent.futures import ThreadPoolExecutor

    fake.latency_s = 0.3

    def one(i: int) -> int:
        with httpx.Client(base_url=fake.base_url, timeout=5.0) as http:
            return chat(http, CLASSIFY, key=f"open-{i}").status_code

    with ThreadPoolExecutor(5) as pool:
        assert list(pool.map(one, range(5))) == [200] * 5
    stats = settled(fake)
    assert stats["peak_open"] == 5 and stats["open"] == 0
    fake.reset()
    assert fake.stats()["peak_open"] == 0


def test_over_its_concurrency_limit_the_server_answers_429_without_retry_after(fake: FakeLLM) -> None:
    from concurrent.futures import ThreadPoolExecutor

    fake.latency_s = 0.5
    fake.max_concurrency = 2

    def one(i: int) -> httpx.Response:
        time.sleep(0.1 * (i >= 2))  # the first two are open when the others arrive
        with httpx.Client(base_url=fake.base_url, timeout=5.0) as http:
            return chat(http, CLASSIFY, key=f"c-{i}")

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(one, range(5)))
    assert [a.status_code for a in answers] == [200, 200, 429, 429, 429]
    assert all("retry-after" not in a.headers for a in answers[2:])
    assert_openai_error(answers[2], 429)
    stats = settled(fake)
    assert stats["over_concurrency"] == 3 and stats["peak_open"] == 2
    assert stats["requests"] == 5 and stats["by_key"]["c-4"] == 1 and stats["valid_completions"] == 2
    fake.max_concurrency = 0
    with httpx.Client(base_url=fake.base_url, timeout=5.0) as http:
        assert chat(http, CLASSIFY).status_code == 200


def test_without_idempotent_mode_a_repeated_key_gets_a_new_answer(client: httpx.Client) -> None:
    assert content(chat(client, PERSON, key="k")) != content(chat(client, PERSON, key="k"))


def test_idempotent_mode_replays_the_stored_body(fake: FakeLLM, client: httpx.Client) -> None:
    fake.idempotent = True
    fake.add_fault(FaultRule("error", match="job-1", status=503, times=1))
    assert chat(client, PERSON, key="job-1").status_code == 503  # failures are not stored
    first = chat(client, PERSON, key="job-1")
    again = chat(client, PERSON, key="job-1")
    other = chat(client, PERSON, key="job-2")
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert content(other) != content(first)
    stats = fake.stats()
    assert stats["replayed"] == 1 and stats["valid_completions"] == 2
    assert stats["by_key"] == {"job-1": 3, "job-2": 1}
    assert stats["completions_by_key"] == {"job-1": 1, "job-2": 1}


# ----------------------------------------------------------------------------- control endpoints


def test_control_endpoints(fake: FakeLLM, client: httpx.Client) -> None:
    control = httpx.Client(base_url=fake.base_url.removesuffix("/v1"), timeout=5.0)
    with control:
        rules: list[dict[str, Any]] = [{"fault": "error", "match": "ctl", "status": 502, "times": 1}, {"fault": "empty", "match": "e-"}]
        response = control.post("/_faults", json=rules)
        assert response.status_code == 200
        assert response.json()["faults"][0] == {**FaultRule("error").to_dict(), **rules[0]}
        assert chat(client, CLASSIFY, key="ctl-1").status_code == 502
        assert content(chat(client, CLASSIFY, key="e-1")) == ""
        assert control.get("/_faults").json()["faults"] == [FaultRule("empty", match="e-").to_dict()]

        stats = control.get("/_stats").json()
        assert stats == fake.stats()
        assert stats["requests"] == 2 and stats["faults"] == {"error": 1, "empty": 1}

        assert control.delete("/_faults").json() == {"faults": []}
        assert fake.faults() == []

        assert control.post("/_latency", json={"latency_s": 0.2}).json() == {"latency_s": 0.2}
        assert fake.latency_s == 0.2
        started = time.monotonic()
        chat(client, CLASSIFY)
        assert time.monotonic() - started >= 0.2
        assert control.post("/_latency", json={"latency_s": 0}).status_code == 200

        assert control.post("/_config", json={"idempotent": True}).json() == {
            "idempotent": True, "latency_s": 0.0, "latency_max_s": 0.0, "tool_rounds": 1, "tool_calls_per_round": 1, "tool_arguments": [],
            "max_concurrency": 0,
        }
        assert fake.idempotent
        assert chat(client, CLASSIFY, key="r").content == chat(client, CLASSIFY, key="r").content

        assert control.post("/_reset").json() == {"ok": True}
        assert fake.stats()["requests"] == 0
        assert control.get("/health").json() == {"status": "ok"}


def test_control_endpoints_also_answer_below_the_base_url(fake: FakeLLM, client: httpx.Client) -> None:
    assert client.post("/_faults", json=[{"fault": "refuse"}]).status_code == 200
    assert choice(chat(client, CLASSIFY))["finish_reason"] == "content_filter"
    assert client.get("/_stats").json()["faults"] == {"refuse": 1}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/_faults", [{"fault": "explode"}]),
        ("/_faults", [{"fault": "error", "times": 0}]),
        ("/_faults", [{"fault": "error", "colour": "red"}]),
        ("/_faults", {"fault": "error"}),
        ("/_latency", {"latency_s": -1}),
        ("/_latency", {}),
        ("/_config", {"idempotent": "yes"}),
        ("/_config", {"max_concurrency": -1}),
    ],
)
def test_control_endpoints_refuse_bad_input(fake: FakeLLM, client: httpx.Client, path: str, body: Any) -> None:
    fake.add_fault(FaultRule("empty", match="keep"))
    assert_openai_error(client.post(path, json=body), 400)
    assert fake.faults() == [FaultRule("empty", match="keep")]
    assert fake.latency_s == 0.0 and not fake.idempotent


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fault": "explode"},
        {"fault": "error", "times": 0},
        {"fault": "error", "probability": 1.5},
        {"fault": "error", "status": 200},
        {"fault": "latency", "delay_s": -1.0},
        {"fault": "rate_limit", "retry_after_s": math.inf},
    ],
)
def test_fault_rules_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FaultRule(**kwargs)


def test_command_line_serves_in_the_foreground() -> None:
    command = [sys.executable, "-m", "service.devtools.fakellm", "--host", "127.0.0.1", "--port", "0", "--latency-s", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("fakellm listening on http://127.0.0.1:")
            base_url = line.removeprefix("fakellm listening on ")
            assert base_url.endswith("/v1")
            with httpx.Client(base_url=base_url, timeout=5.0) as http:
                assert http.get("/models").status_code == 200
                assert http.post("/_latency", json={"latency_s": 0.01}).status_code == 200
                assert choice(chat(http, CLASSIFY))["finish_reason"] == "stop"
        finally:
            assert processes.stop(process, grace_s=10) == 0  # SIGTERM; SIGKILLed (and reaped) after 10 s


# ----------------------------------------------------------------------------- the generator


def test_generator_is_reproducible_with_a_seeded_rng() -> None:
    first = [random_instance(PERSON, random.Random(3)) for _ in range(2)]
    assert first[0] == first[1]
    rng = random.Random(3)
    assert random_instance(PERSON, rng) != random_instance(PERSON, rng)


def test_generated_instances_pass_pydantic() -> None:
    rng = random.Random(11)
    for _ in range(300):
        Person.model_validate(random_instance(PERSON, rng))


def test_plain_strings_are_short() -> None:
    rng = random.Random(5)
    counts = {len(random_instance({"type": "string"}, rng).split()) for _ in range(300)}
    assert counts == {1, 2, 3, 4, 5, 6}


@pytest.mark.parametrize(
    "schema",
    [
        False,
        {"type": "integer", "minimum": 3, "maximum": 2},
        {"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2},
        {"type": "number", "exclusiveMinimum": 1, "maximum": 1},
        {"type": "string", "minLength": 5, "maxLength": 4},
        {"type": "array", "minItems": 3, "maxItems": 1},
        {"type": "array", "items": {"enum": [1, 2]}, "minItems": 3, "uniqueItems": True},
        {"enum": []},
        {"type": "decimal"},
        {"$ref": "#/$defs/missing"},
        {"$ref": "https://example.com/schema.json"},
        {"$ref": "#/$defs/loop", "$defs": {"loop": {"$ref": "#/$defs/loop"}}},
    ],
)
def test_unsatisfiable_schemas_raise(schema: Any) -> None:
    with pytest.raises(SchemaError):
        random_instance(schema, random.Random(0))


_NAMES = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)


@st.composite
def _string_schemas(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if draw(st.booleans()):
        schema["minLength"] = draw(st.integers(0, 60))
    if draw(st.booleans()):
        schema["maxLength"] = schema.get("minLength", 0) + draw(st.integers(0, 20))
    return schema


@st.composite
def _integer_schemas(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.integers(-10_000, 10_000))
    high = low + draw(st.integers(2, 500))
    schema: dict[str, Any] = {"type": "integer"}
    if draw(st.booleans()):
        schema["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = low
    if draw(st.booleans()):
        schema["exclusiveMaximum" if draw(st.booleans()) else "maximum"] = high
    return schema


@st.composite
def _number_schemas(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.floats(-1e6, 1e6))
    high = low + draw(st.floats(1e-6, 1e3))
    schema: dict[str, Any] = {"type": "number"}
    if draw(st.booleans()):
        schema["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = low
    if draw(st.booleans()):
        schema["exclusiveMaximum" if draw(st.booleans()) else "maximum"] = high
    return schema


_ENUMS = st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), min_size=1, max_size=5, unique=True)
_TYPED_LEAVES: st.SearchStrategy[dict[str, Any]] = st.one_of(
    _string_schemas(), _integer_schemas(), _number_schemas(), st.just({"type": "boolean"}),
)


def _nullable_type(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "type": [schema["type"], "null"]}


def _nullable_any_of(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_LEAVES = st.one_of(
    _TYPED_LEAVES,
    _ENUMS.map(lambda values: {"enum": values}),
    _TYPED_LEAVES.map(_nullable_type),  # nullable as a type list
    _TYPED_LEAVES.map(_nullable_any_of),  # nullable as pydantic writes it
)


@st.composite
def _object_schemas(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    properties = draw(st.dictionaries(_NAMES, children, max_size=5))
    required = [name for name in properties if draw(st.booleans())]
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if draw(st.booleans()):
        schema["additionalProperties"] = False
    return schema


_SCHEMAS = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        _object_schemas(children),
        st.builds(lambda items, low: {"type": "array", "items": items, "minItems": low, "maxItems": low + 2},
                  children, st.integers(0, 2)),
    ),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(schema=_object_schemas(_SCHEMAS), seed=st.integers(0, 2**32))
def test_generated_instances_always_conform(schema: dict[str, Any], seed: int) -> None:
    value = random_instance(schema, random.Random(seed))
    assert violations(value, schema) == []
    json.dumps(value, allow_nan=False)  # plain JSON
